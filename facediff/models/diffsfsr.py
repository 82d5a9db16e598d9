"""DiffSFSR's conditioned denoiser (DiffSFSR Sec. 3.2, Fig. 2).

``apply(params, z_t, t, cond) -> eps`` with

* input: z_t concatenated with the latent of the face-masked background M * I_bkg and
  the mask M resized to the latent size (SD: 4 + 4 + 1 = 9 channels; in the ``pixels``
  latent space 3 + 3 + 1 = 7);
* cross-attention context: one token per identity embedding of the compound (each
  through its own 2-layer MLP to the cross-attention width), then one expression
  token (its own 2-layer MLP);
* optional condition dropout: ``cond["drop_id"]`` / ``cond["drop_exp"]`` (bool (B,))
  replace the tokens with learned null tokens, so that inference can scale identity
  and expression guidance separately.

Params: ``{"unet": <SD UNet params>, "id_mlp_<i>": ..., "exp_mlp": ..., "null_id":
(n_id, D), "null_exp": (1, D)}``; the UNet part loads from SD-1.x weights with
``facediff.convert.unet.widen_conv_in`` (new input channels zero: step 0 reproduces
SD's prediction).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers
from facediff.models.unet import UNet2DConditionModel, UNetConfig


@dataclasses.dataclass(frozen=True)
class DiffSFSRConfig:
  """``unet.in_channels`` must be 2 * latent_channels + 1; ``id_dims`` are the sizes
  of the identity compound's embeddings in order, ``exp_dim`` the expression's."""

  unet: UNetConfig
  latent_channels: int = 4
  id_dims: tuple[int, ...] = (512, 512, 128)
  exp_dim: int = 16
  mlp_hidden: int | None = None  # hidden width of the condition MLPs (None: context width)

  def __post_init__(self):
    object.__setattr__(self, "id_dims", tuple(int(d) for d in self.id_dims))
    want = 2 * self.latent_channels + 1
    if self.unet.in_channels != want:
      raise ValueError(
        f"DiffSFSRConfig: unet.in_channels is {self.unet.in_channels}; latent, masked "
        f"background latent and mask need {want}"
      )
    if self.unet.out_channels != self.latent_channels:
      raise ValueError(
        f"DiffSFSRConfig: unet.out_channels {self.unet.out_channels} != latent_channels "
        f"{self.latent_channels}"
      )
    if not self.id_dims:
      raise ValueError("DiffSFSRConfig: id_dims needs at least one identity embedding")

  @property
  def num_tokens(self) -> int:
    return len(self.id_dims) + 1


class ConditionMLP(nn.Module):
  """2-layer MLP embedding -> one cross-attention token (DiffSFSR Sec. 3.2)."""

  hidden: int
  out: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.Dense(self.hidden, ("embed", "mlp"), name="fc1")(x.astype(jnp.float32))
    return layers.Dense(self.out, ("mlp", "cross_embed"), name="fc2")(nn.silu(h))


class DiffSFSRDenoiser(nn.Module):
  config: DiffSFSRConfig

  def setup(self):
    cfg = self.config
    width = cfg.unet.cross_attention_dim
    hidden = cfg.mlp_hidden or width
    self.id_mlps = [
      ConditionMLP(hidden, width, name=f"id_mlp_{i}") for i in range(len(cfg.id_dims))
    ]
    self.exp_mlp = ConditionMLP(hidden, width, name="exp_mlp")
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "cross_embed"))
    self.null_id = self.param("null_id", init, (len(cfg.id_dims), width))
    self.null_exp = self.param("null_exp", init, (1, width))
    self.unet = UNet2DConditionModel(cfg.unet, name="unet")

  def context(self, cond: dict[str, Any]) -> jax.Array:
    """(B, n_id + 1, D) tokens: identity compound, then expression."""
    ids = cond["id"]
    if len(ids) != len(self.config.id_dims):
      raise ValueError(
        f"cond['id'] has {len(ids)} embeddings, the config {len(self.config.id_dims)}"
      )
    id_tokens = jnp.stack([mlp(emb) for mlp, emb in zip(self.id_mlps, ids, strict=True)], 1)
    if "drop_id" in cond:
      id_tokens = jnp.where(cond["drop_id"][:, None, None], self.null_id[None], id_tokens)
    exp_token = self.exp_mlp(cond["exp"])[:, None]
    if "drop_exp" in cond:
      exp_token = jnp.where(cond["drop_exp"][:, None, None], self.null_exp[None], exp_token)
    return jnp.concatenate([id_tokens, exp_token], axis=1)

  def __call__(self, z_t: jax.Array, t: jax.Array, cond: dict[str, Any], deterministic=True):
    """z_t (B, h, w, C); t int (B,); cond: ``bkg`` (B, h, w, C) latent of M * I_bkg,
    ``mask`` (B, h, w, 1), ``id`` list of (B, d_i), ``exp`` (B, d_exp)."""
    x = jnp.concatenate(
      [z_t, cond["bkg"].astype(z_t.dtype), cond["mask"].astype(z_t.dtype)], axis=-1
    )
    return self.unet(x, t, self.context(cond), deterministic=deterministic)


def dummy_cond(config: DiffSFSRConfig, batch: int, hw: tuple[int, int]) -> dict[str, Any]:
  c = config.latent_channels
  return {
    "bkg": jnp.zeros((batch, *hw, c), jnp.float32),
    "mask": jnp.zeros((batch, *hw, 1), jnp.float32),
    "id": [jnp.zeros((batch, d), jnp.float32) for d in config.id_dims],
    "exp": jnp.zeros((batch, config.exp_dim), jnp.float32),
  }


def init_params(config: DiffSFSRConfig, key: jax.Array, sample_hw: tuple[int, int] | None = None):
  """Random params (boxed with logical axes). Traceable (use under jit / eval_shape)."""
  hw = sample_hw or (config.unet.sample_size, config.unet.sample_size)
  z = jnp.zeros((1, *hw, config.latent_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return DiffSFSRDenoiser(config).init(key, z, t, dummy_cond(config, 1, hw))["params"]


def abstract_params(config: DiffSFSRConfig, sample_hw: tuple[int, int] | None = None):
  """Shapes/dtypes (and logical axes) of the params without allocating them."""
  return jax.eval_shape(lambda k: init_params(config, k, sample_hw), jax.random.key(0))


def apply(config: DiffSFSRConfig, params, z_t, t, cond) -> jax.Array:
  """eps = denoiser(z_t, t, cond), float32."""
  return DiffSFSRDenoiser(config).apply({"params": params}, z_t, t, cond)
