"""CLIP text encoder (the conditioning model of Stable Diffusion 1.x) in Flax Linen.

Numerics follow transformers' ``CLIPTextModel``: token + learned position
embeddings, pre-LayerNorm encoder layers (causal self-attention, MLP with
quick_gelu), a final LayerNorm. ``pooled`` is the final hidden state at the EOS
token, picked exactly as transformers picks it (see ``CLIPTextTransformer``).

Parameter names mirror transformers' module names (``embeddings``,
``layers_{i}/self_attn/q_proj``, ...) so the converter in
``facediff/convert/clip.py`` is a plain renaming plus transposes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from facediff.models import layers


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Shapes of a CLIP text transformer; field names are transformers' config keys."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  # SD-1.4's text_encoder/config.json carries the pre-2023 value 2, which makes
  # transformers pool at argmax(input_ids) (the EOT id is the largest id).
  eos_token_id: int = 2
  bos_token_id: int = 0
  pad_token_id: int = 1
  # Compute dtype (parameters stay float32); LayerNorm and softmax run in float32.
  dtype: str = "float32"

  @classmethod
  def sd14(cls) -> "CLIPTextConfig":
    """CLIP ViT-L/14 text tower as shipped in CompVis/stable-diffusion-v1-4."""
    return cls()

  @classmethod
  def tiny(cls) -> "CLIPTextConfig":
    """A small configuration for tests."""
    return cls(
      vocab_size=1000,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=4,
      eos_token_id=2,
    )

  def validate(self, source: str = "config") -> None:
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"{source}: hidden_size {self.hidden_size} is not divisible by "
        f"num_attention_heads {self.num_attention_heads}"
      )
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(
        f"{source}: hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}"
      )


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x), the activation of OpenAI CLIP."""
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
  "quick_gelu": quick_gelu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


def _dense(features: int, axes: tuple[str | None, str | None], dtype, name: str) -> nn.Dense:
  return layers.Dense(features, axes, dtype=dtype, name=name)


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  return layers.LayerNorm(eps, dtype=jnp.float32, name=name)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with q/k/v/out projections (all with bias)."""

  config: CLIPTextConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    d = x.shape[-1]
    q = _dense(d, ("embed", "heads"), dtype, "q_proj")(x)
    k = _dense(d, ("embed", "heads"), dtype, "k_proj")(x)
    v = _dense(d, ("embed", "heads"), dtype, "v_proj")(x)
    # Scale 1/sqrt(head_dim); softmax in float32 inside dot_product_attention.
    out = layers.multi_head_attention(q, k, v, cfg.num_attention_heads, mask=mask, causal=True)
    return _dense(d, ("heads", "embed"), dtype, "out_proj")(out)


class CLIPMLP(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x = _dense(cfg.intermediate_size, ("embed", "mlp"), dtype, "fc1")(x)
    x = _ACTIVATIONS[cfg.hidden_act](x)
    return _dense(cfg.hidden_size, ("mlp", "embed"), dtype, "fc2")(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN1 x), then x + mlp(LN2 x)."""

  config: CLIPTextConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = _layer_norm(cfg.layer_norm_eps, "layer_norm1")(x).astype(dtype)
    x = x + CLIPAttention(cfg, name="self_attn")(h, mask)
    h = _layer_norm(cfg.layer_norm_eps, "layer_norm2")(x).astype(dtype)
    return x + CLIPMLP(cfg, name="mlp")(h)


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    tok = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      param_dtype=jnp.float32,
      name="token_embedding",
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    pos = self.param(
      "position_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
      (cfg.max_position_embeddings, cfg.hidden_size),
      jnp.float32,
    )
    n = input_ids.shape[-1]
    return tok(input_ids) + pos[None, :n]


class CLIPTextModel(nn.Module):
  """CLIP text transformer.

  ``__call__(input_ids (B, L) int, attention_mask (B, L) or None)`` returns
  ``(last_hidden_state (B, L, D), pooled (B, D))``. Like Stable Diffusion's
  pipeline, callers normally pass no attention mask (causal mask only).
  """

  config: CLIPTextConfig

  @nn.compact
  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    b, n = input_ids.shape
    if n > cfg.max_position_embeddings:
      raise ValueError(
        f"sequence length {n} exceeds max_position_embeddings {cfg.max_position_embeddings}"
      )
    x = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids)
    # Causal masking happens in the attention; a padding mask is optional.
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    x = x.astype(jnp.dtype(cfg.dtype))
    for i in range(cfg.num_hidden_layers):
      x = CLIPEncoderLayer(cfg, name=f"layers_{i}")(x, mask)
    x = _layer_norm(cfg.layer_norm_eps, "final_layer_norm")(x)
    pooled = x[jnp.arange(b), eos_positions(input_ids, cfg.eos_token_id)]
    return x, pooled


def init_params(config: CLIPTextConfig, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape (see facediff.partitioning.init_sharded)."""
  ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
  return CLIPTextModel(config).init(key, ids)["params"]


def abstract_params(config: CLIPTextConfig):
  """The param tree's shapes and dtypes (``jax.eval_shape``, nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Index of the pooled token per sequence, as transformers picks it.

  With the legacy ``eos_token_id == 2`` (SD-1.4's config) it is the argmax of the
  ids (the end-of-text id is the largest in the vocabulary); otherwise it is the
  first position holding ``eos_token_id``.
  """
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTokenizer:
  """Wraps ``transformers.CLIPTokenizer`` loaded from a local folder.

  ``__call__(prompts)`` returns int32 ids of shape (B, max_length), padded to
  ``max_length`` (77 for SD) and truncated, as Stable Diffusion's pipeline does.
  """

  def __init__(self, path: str | os.PathLike, max_length: int | None = None):
    import transformers  # lazy: only needed where text is tokenised

    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
    has = lambda f: os.path.isfile(os.path.join(path, f))  # noqa: E731
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
      raise FileNotFoundError(
        f"tokenizer folder {path!r} has neither tokenizer.json nor vocab.json + merges.txt"
      )
    self.path = path
    self.tokenizer = transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)
    self.max_length = int(max_length or self.tokenizer.model_max_length)
    if self.max_length > 10_000:  # transformers' "no limit" sentinel
      self.max_length = 77

  def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    enc = self.tokenizer(
      list(prompts),
      padding="max_length",
      max_length=self.max_length,
      truncation=True,
      return_tensors="np",
    )
    return np.asarray(enc["input_ids"], dtype=np.int32)
