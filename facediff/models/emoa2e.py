"""EmoA2E: emotional audio to expression (TGDM Sec. 4.2, Eq. 9-11, Fig. 3).

A non-autoregressive transformer encoder maps a sequence of per-video-frame MFCC clips
A_1..A_F (facediff.audio) to per-frame 3DMM expression coefficients beta_hat (64-D):

    phi       = eta * phi_base                                         (Eq. 9)
    beta_bar  = T([phi, MLP(alpha), MLP(A)] + PE + MLP(z_emo))         (Eq. 10)
    beta_hat  = MLP(beta_bar)                                          (Eq. 11)

* MLP(A): each frame's clip (clip_frames x n_mfcc) flattened, through a 2-layer MLP;
* MLP(alpha): the identity token, from the source's 80 identity coefficients;
* phi: the learnable intensity token phi_base scaled by eta (1, 2, 3 in training, any
  value in [1, 3] at test time);
* MLP(z_emo): the emotion text embedding (a frozen text encoder's vector, computed
  outside the model; the paper uses CLIP, facediff's default is MiniLM, 384-D) through
  a 2-layer MLP, added to every token;
* PE: the sinusoidal positions of Vaswani et al. (TGDM's "standard positional PE");
* T: a bidirectional transformer encoder (Vaswani et al., post-LN by default);
* Eq. 11's MLP reads the audio positions only (the prefix tokens are dropped), so
  beta_hat has one row per video frame.

The emotion-free variant (Fig. 3 caption; ``EmoA2EConfig.emotion = False``) drops
phi and z_emo: T([MLP(alpha), MLP(A)] + PE). The paper predicts expression only
(pose comes from elsewhere), and so does this module.

Not given by the paper (our choices, in the config): the widths and depth of T, the
MLPs' hidden width and activation (GELU), the clip width.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from facediff.models import layers


@dataclasses.dataclass(frozen=True)
class EmoA2EConfig:
  """Shapes of EmoA2E.

  Attributes:
    clip_frames, n_mfcc: one video frame's MFCC clip (facediff.audio.MFCCConfig).
    identity_dim: alpha (80 in the BFM / D3DFR).
    expression_dim: beta (64).
    text_dim: the emotion embedding z_emo (MiniLM 384; CLIP ViT-L/14 768).
    hidden: transformer width d (tokens and PE).
    num_layers, num_heads, mlp_dim: the encoder layers (self-attention, ReLU FFN).
    token_mlp_dim: hidden width of the input/output MLPs (None: ``hidden``).
    emotion: False = the emotion-free variant (no phi, no z_emo).
    dropout: dropout rate inside the encoder layers (training only).
    norm_first: pre-LN layers (plus a final LayerNorm) instead of Vaswani's post-LN.
    dtype: compute dtype ("float32" / "bfloat16"); params and LayerNorm stay float32.
  """

  clip_frames: int = 32
  n_mfcc: int = 13
  identity_dim: int = 80
  expression_dim: int = 64
  text_dim: int = 384
  hidden: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 1024
  token_mlp_dim: int | None = None
  emotion: bool = True
  dropout: float = 0.0
  norm_first: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    if self.hidden % self.num_heads:
      raise ValueError(
        f"EmoA2EConfig: hidden {self.hidden} is not divisible by num_heads {self.num_heads}"
      )
    if self.hidden % 2:
      raise ValueError(f"EmoA2EConfig: hidden {self.hidden} must be even (sinusoidal PE)")

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the audio: [phi, identity] with emotion, [identity] without."""
    return 2 if self.emotion else 1


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """Vaswani et al. (2017) Sec. 3.5, TGDM Eq. 10's PE: PE(p, 2i) = sin(p / 10000^(2i/d)),
  PE(p, 2i + 1) = cos(p / 10000^(2i/d)); (length, dim) float32."""
  pos = np.arange(length, dtype=np.float64)[:, None]
  freq = 1.0 / 10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  pe = np.zeros((length, dim))
  pe[:, 0::2] = np.sin(pos * freq)
  pe[:, 1::2] = np.cos(pos * freq)
  return pe.astype(np.float32)


def compound_emotion(
  embeddings: Sequence[jax.Array] | jax.Array | np.ndarray,
  weights: Sequence[float] | None = None,
) -> jax.Array | np.ndarray:
  """An unseen compound emotion style (TGDM Fig. 9 a) as the (weighted) mean of the
  text embeddings of its parts: sum_j w_j z_j / sum_j w_j over the first axis (equal
  weights by default). numpy in, numpy out."""
  z = embeddings
  xp = jnp if isinstance(z, jax.Array) or any(isinstance(e, jax.Array) for e in z) else np
  z = xp.stack([xp.asarray(e) for e in z]) if not hasattr(z, "ndim") else xp.asarray(z)
  if z.shape[0] == 0:
    raise ValueError("compound_emotion: no embeddings")
  w = xp.ones((z.shape[0],), z.dtype) if weights is None else xp.asarray(weights, z.dtype)
  if w.shape != (z.shape[0],):
    raise ValueError(f"compound_emotion: {w.shape[0]} weights for {z.shape[0]} embeddings")
  return xp.tensordot(w / w.sum(), z, axes=1)


class TokenMLP(nn.Module):
  """The 2-layer MLPs of Eq. 10-11: Dense -> GELU -> Dense."""

  hidden: int
  out: int
  out_axis: str = "embed"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = jnp.dtype(self.dtype)
    h = layers.Dense(self.hidden, ("embed", "mlp"), dtype=dtype, name="fc1")(x.astype(dtype))
    return layers.Dense(self.out, ("mlp", self.out_axis), dtype=dtype, name="fc2")(nn.gelu(h))


class EncoderLayer(nn.Module):
  """A transformer encoder layer (Vaswani et al.): x + Drop(SelfAttn), x + Drop(FFN(ReLU)),
  LayerNorm after each residual (post-LN) or before each branch (pre-LN)."""

  config: EmoA2EConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    d = cfg.hidden
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)

    def attention(h):
      h = h.astype(dtype)
      q = layers.Dense(d, ("embed", "heads"), dtype=dtype, name="to_q")(h)
      k = layers.Dense(d, ("embed", "heads"), dtype=dtype, name="to_k")(h)
      v = layers.Dense(d, ("embed", "heads"), dtype=dtype, name="to_v")(h)
      out = layers.multi_head_attention(q, k, v, cfg.num_heads, implementation="xla")
      return drop(layers.Dense(d, ("heads", "embed"), dtype=dtype, name="to_out")(out))

    def feed_forward(h):
      h = layers.Dense(cfg.mlp_dim, ("embed", "mlp"), dtype=dtype, name="ff_1")(h.astype(dtype))
      h = drop(nn.relu(h))
      return drop(layers.Dense(d, ("mlp", "embed"), dtype=dtype, name="ff_2")(h))

    norm1, norm2 = layers.LayerNorm(name="norm1"), layers.LayerNorm(name="norm2")
    if cfg.norm_first:
      x = x + attention(norm1(x))
      return x + feed_forward(norm2(x))
    x = norm1(x + attention(x))
    return norm2(x + feed_forward(x))


class EmoA2E(nn.Module):
  config: EmoA2EConfig

  def setup(self):
    cfg = self.config
    mlp = cfg.token_mlp_dim or cfg.hidden
    self.audio_mlp = TokenMLP(mlp, cfg.hidden, dtype=cfg.dtype, name="audio_mlp")
    self.identity_mlp = TokenMLP(mlp, cfg.hidden, dtype=cfg.dtype, name="identity_mlp")
    if cfg.emotion:
      self.emotion_mlp = TokenMLP(mlp, cfg.hidden, dtype=cfg.dtype, name="emotion_mlp")
      init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",))
      self.intensity_base = self.param("intensity_base", init, (cfg.hidden,))
    self.encoder = [EncoderLayer(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    if cfg.norm_first:
      self.final_norm = layers.LayerNorm(name="final_norm")
    self.out_mlp = TokenMLP(mlp, cfg.expression_dim, dtype=cfg.dtype, name="out_mlp")

  def _check(self, mfcc, identity, emotion, intensity):
    cfg = self.config
    want = (cfg.clip_frames, cfg.n_mfcc)
    if mfcc.ndim != 4 or tuple(mfcc.shape[2:]) != want:
      raise ValueError(f"EmoA2E: mfcc clips have shape {mfcc.shape}, expected (B, F, *{want})")
    if identity.shape[-1] != cfg.identity_dim:
      raise ValueError(f"EmoA2E: identity has {identity.shape[-1]} values, not {cfg.identity_dim}")
    if not cfg.emotion:
      if emotion is not None or intensity is not None:
        raise ValueError("EmoA2E: the emotion-free variant takes no emotion / intensity")
      return
    if emotion is None or intensity is None:
      raise ValueError("EmoA2E: the emotional variant needs emotion (B, D) and intensity (B,)")
    if emotion.shape[-1] != cfg.text_dim:
      raise ValueError(f"EmoA2E: emotion embedding is {emotion.shape[-1]}-D, not {cfg.text_dim}")

  def intensity_token(self, intensity: jax.Array) -> jax.Array:
    """TGDM Eq. 9: phi = eta * phi_base, (B, 1, d) for eta (B,)."""
    return intensity.astype(jnp.float32)[:, None, None] * self.intensity_base[None, None, :]

  def tokens(self, mfcc, identity, emotion=None, intensity=None) -> jax.Array:
    """TGDM Eq. 10's input: [phi, MLP(alpha), MLP(A)] + PE + MLP(z_emo), (B, P + F, d)."""
    cfg = self.config
    self._check(mfcc, identity, emotion, intensity)
    b, f = mfcc.shape[:2]
    audio = self.audio_mlp(mfcc.reshape(b, f, -1)).astype(jnp.float32)
    parts = [self.identity_mlp(identity)[:, None].astype(jnp.float32), audio]
    if cfg.emotion:
      parts.insert(0, self.intensity_token(intensity))
    x = jnp.concatenate(parts, axis=1)
    x = x + sinusoidal_positions(x.shape[1], cfg.hidden)[None]
    if cfg.emotion:
      x = x + self.emotion_mlp(emotion)[:, None].astype(jnp.float32)
    return x

  def __call__(self, mfcc, identity, emotion=None, intensity=None, deterministic=True):
    """mfcc (B, F, clip_frames, n_mfcc), identity (B, 80), emotion (B, text_dim),
    intensity eta (B,) -> beta_hat (B, F, 64) float32 (TGDM Eq. 10-11)."""
    x = self.tokens(mfcc, identity, emotion, intensity)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    for layer in self.encoder:
      x = layer(x, deterministic)
    if self.config.norm_first:
      x = self.final_norm(x)
    return self.out_mlp(x[:, self.config.num_prefix_tokens :]).astype(jnp.float32)


def dummy_inputs(config: EmoA2EConfig, batch: int = 1, frames: int = 4) -> dict[str, jax.Array]:
  inputs = {
    "mfcc": jnp.zeros((batch, frames, config.clip_frames, config.n_mfcc), jnp.float32),
    "identity": jnp.zeros((batch, config.identity_dim), jnp.float32),
  }
  if config.emotion:
    inputs["emotion"] = jnp.zeros((batch, config.text_dim), jnp.float32)
    inputs["intensity"] = jnp.ones((batch,), jnp.float32)
  return inputs


def init_params(config: EmoA2EConfig, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape. The params do not depend on the sequence length."""
  return EmoA2E(config).init(key, **dummy_inputs(config))["params"]


def abstract_params(config: EmoA2EConfig):
  """Shapes/dtypes (and logical axes) of the params without allocating them."""
  return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))


def apply(
  config: EmoA2EConfig,
  params,
  mfcc: jax.Array,
  identity: jax.Array,
  emotion: jax.Array | None = None,
  intensity: jax.Array | None = None,
  *,
  deterministic: bool = True,
  rngs=None,
) -> jax.Array:
  """beta_hat (B, F, 64) = EmoA2E(A, alpha, z_emo, eta) (TGDM Eq. 9-11). Pass
  ``deterministic=False`` and ``rngs={"dropout": key}`` to train with dropout."""
  return EmoA2E(config).apply(
    {"params": params}, mfcc, identity, emotion, intensity, deterministic, rngs=rngs
  )


def embed_tokens(config: EmoA2EConfig, params, mfcc, identity, emotion=None, intensity=None):
  """The transformer's input tokens (Eq. 10 before T), (B, P + F, d), for inspection."""
  return EmoA2E(config).apply(
    {"params": params}, mfcc, identity, emotion, intensity, method=EmoA2E.tokens
  )
