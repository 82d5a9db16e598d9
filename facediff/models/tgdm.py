"""TGDM's Texture-Geometry-aware denoiser (TGDM Sec. 4.3, Fig. 2; face swap Sec. 4.4).

``apply(config, params, x_t, t, cond) -> eps`` with

* input: the noisy target x_t concatenated channel-wise with the rendered 3DMM face
  I_3d (3 + 3 = 6 channels at 256 x 256, TGDM 4.3 "fed to the first layer");
* a texture encoder Phi_E over the source image gives F_s at 1/8 and 1/16 of the image
  (32 x 32 and 16 x 16 at 256 px); every ResNet block of the UNet at those resolutions
  is followed by a TexAtt (Eq. 15-16) reading the F_s of its resolution;
* every ResNet block normalises with AdaIN (Eq. 17) conditioned on
  C = Linear(rho_hat) + Linear(t) (t: sinusoidal embedding), in ``swap`` mode plus
  Linear(z_id) (TGDM 4.4 adds the identity embedding as a further condition; the paper
  does not say where, we add it into C);
* ``swap`` mode (TGDM 4.4): the texture encoder sees the source with its face region
  masked out, I_m = I_s * (1 - M), so the identity can come only from I_3d, rho and z_id.

``cond``: ``i3d`` (B, H, W, 3) in [-1, 1], ``source`` (B, H, W, 3) in [-1, 1], ``rho``
(B, rho_dim) 3DMM coefficients; swap also ``id`` (B, id_dim) and ``source_mask``
(B, H, W, 1) (1 = face, masked out).

The paper fixes only the input, the 16x downsampling at 256 px, the TexAtt resolutions
and reduction (C/4), the AdaIN condition and T = 1000; widths and depths are ours
(``TGDMConfig.tgdm256``). Params carry logical axis names (facediff.models.layers), so
the model shards like the SD UNet under facediff.partitioning's rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers

MODES = ("reenact", "swap")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TGDMConfig:
  """Shapes of the TGDM denoiser.

  ``block_channels``: UNet width per resolution level, level i at 1 / 2**i of the image
  (5 levels = 16x downsampling, as TGDM at 256 px). ``texatt_factors``: downsampling
  factors whose blocks get TexAtt (TGDM: 8 and 16); the texture encoder produces features
  at exactly those. ``rho_dim``: length of the coefficient vector rho_hat (261 = TGDM's
  layout, Eq. 6; a video window of radius k concatenates 2k + 1 of them). ``id_dim``: the
  identity embedding (swap mode only; CurricularFace: 512). ``cond_dim``: width of the
  AdaIN condition C. ``dtype``: compute dtype; parameters are ``param_dtype``.
  """

  mode: str = "reenact"
  image_size: int = 256
  image_channels: int = 3
  block_channels: tuple[int, ...] = (64, 128, 256, 256, 512)
  layers_per_block: int = 2
  encoder_layers: int = 1
  texatt_factors: tuple[int, ...] = (8, 16)
  texatt_reduction: int = 4
  rho_dim: int = 261
  id_dim: int = 512
  cond_dim: int = 512
  norm_num_groups: int = 32
  adain_eps: float = 1e-5
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for f in ("block_channels", "texatt_factors"):
      object.__setattr__(self, f, tuple(int(v) for v in getattr(self, f)))
    if self.mode not in MODES:
      raise ValueError(f"TGDMConfig.mode must be one of {MODES}, got {self.mode!r}")
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in _DTYPES:
        raise ValueError(
          f"TGDMConfig.{f} must be one of {sorted(_DTYPES)}, got {getattr(self, f)!r}"
        )
    n = len(self.block_channels)
    if self.image_size % self.downsample:
      raise ValueError(
        f"TGDMConfig: image_size {self.image_size} not divisible by the downsampling "
        f"{self.downsample} of {n} levels"
      )
    for c in self.block_channels:
      if c % self.norm_num_groups or c % self.texatt_reduction:
        raise ValueError(
          f"TGDMConfig: block channel {c} not divisible by norm_num_groups "
          f"{self.norm_num_groups} and texatt_reduction {self.texatt_reduction}"
        )
    for f in self.texatt_factors:
      level = int(round(math.log2(f))) if f > 0 else -1
      if f <= 0 or 2**level != f or level >= n:
        raise ValueError(
          f"TGDMConfig.texatt_factors: {f} is not a power of two below the "
          f"downsampling {self.downsample}"
        )
    if self.mode == "swap" and self.id_dim <= 0:
      raise ValueError("TGDMConfig: swap mode needs id_dim > 0 (the identity embedding)")

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.block_channels) - 1)

  @property
  def texatt_levels(self) -> tuple[int, ...]:
    """UNet level indices (resolution 1 / 2**level) that carry TexAtt."""
    return tuple(sorted(int(round(math.log2(f))) for f in self.texatt_factors))

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **kw) -> TGDMConfig:
    return dataclasses.replace(self, **kw)

  @classmethod
  def tgdm256(cls, **overrides) -> TGDMConfig:
    """TGDM at 256 x 256: 5 levels (256 ... 16, 16x downsampling), TexAtt at 32 and 16."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> TGDMConfig:
    """Same topology for CPU tests and demos: 64 px, 5 levels (64 ... 4), small widths."""
    base = dict(
      image_size=64,
      block_channels=(16, 32, 32, 64, 64),
      layers_per_block=1,
      cond_dim=64,
      id_dim=32,
      norm_num_groups=8,
    )
    base.update(overrides)
    return cls(**base)


def _constrain(x):
  """Logical sharding hint for NHWC activations (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(
    x, ("activation_batch", "activation_height", "activation_width", "activation_embed")
  )


class AdaINResBlock(nn.Module):
  """ResNet block of the noise predictor with AdaIN (Eq. 17) in place of its norms:
  h = conv1(silu(AdaIN(x, C))); h = conv2(dropout(silu(AdaIN(h, C)))); out = skip(x) + h
  (skip: 1x1 conv when the width changes)."""

  out_channels: int
  eps: float = 1e-5
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cond, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(layers.AdaIN(self.eps, name="norm1", **kw)(x, cond))
    h = layers.Conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
    h = nn.silu(layers.AdaIN(self.eps, name="norm2", **kw)(h, cond))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = layers.Conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.Conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
    return x.astype(h.dtype) + h


class TextureEncoder(nn.Module):
  """Phi_E (TGDM 4.3): source image -> {level: F_s} at the TexAtt levels, each with the
  UNet's width at that level. conv_in, then per level ``encoder_layers`` GroupNorm ResNet
  blocks (no time input) and a stride-2 conv down to the next level."""

  config: TGDMConfig

  @nn.compact
  def __call__(self, image):
    cfg = self.config
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    chans = cfg.block_channels
    h = layers.Conv(chans[0], 3, padding=1, name="conv_in", **kw)(image.astype(cfg.compute_dtype))
    feats = {}
    last = max(cfg.texatt_levels)
    for i in range(last + 1):
      for j in range(cfg.encoder_layers):
        h = layers.ResnetBlock2D(
          chans[i], use_time_emb=False, groups=cfg.norm_num_groups, name=f"level_{i}_res_{j}", **kw
        )(h)
      if i in cfg.texatt_levels:
        feats[i] = _constrain(h)
      if i < last:
        h = layers.Downsample2D(chans[i + 1], padding=1, name=f"level_{i}_down", **kw)(h)
    return feats


class TGDMDenoiser(nn.Module):
  """eps_theta(Z_t, F_s, I_3d, rho_hat, t) (TGDM 4.3), NHWC in and out."""

  config: TGDMConfig

  def condition(self, t, cond) -> jax.Array:
    """C = Linear(rho_hat) + Linear(t_emb) (+ Linear(z_id) in swap mode), (B, cond_dim)."""
    cfg = self.config
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    rho = cond["rho"]
    if rho.ndim != 2 or rho.shape[-1] != cfg.rho_dim:
      raise ValueError(f"cond['rho'] must be (B, {cfg.rho_dim}), got shape {rho.shape}")
    t_emb = layers.timestep_embedding(t, cfg.cond_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    c = layers.Dense(cfg.cond_dim, ("embed", "mlp"), name="rho_proj", **kw)(
      rho.astype(cfg.compute_dtype)
    )
    c = c + layers.Dense(cfg.cond_dim, ("embed", "mlp"), name="time_proj", **kw)(
      t_emb.astype(cfg.compute_dtype)
    )
    if cfg.mode == "swap":
      z_id = cond["id"]
      if z_id.ndim != 2 or z_id.shape[-1] != cfg.id_dim:
        raise ValueError(f"cond['id'] must be (B, {cfg.id_dim}), got shape {z_id.shape}")
      c = c + layers.Dense(cfg.cond_dim, ("embed", "mlp"), name="id_proj", **kw)(
        z_id.astype(cfg.compute_dtype)
      )
    return c

  @nn.compact
  def __call__(self, x_t, t, cond, deterministic: bool = True):
    cfg = self.config
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    b = x_t.shape[0]
    if x_t.ndim != 4 or x_t.shape[-1] != cfg.image_channels:
      raise ValueError(f"x_t must be NHWC (B, H, W, {cfg.image_channels}), got {x_t.shape}")
    if cond["i3d"].shape != x_t.shape:
      raise ValueError(f"cond['i3d'] has shape {cond['i3d'].shape}, x_t {x_t.shape}")
    t = jnp.asarray(t)
    t = jnp.broadcast_to(t.reshape(-1), (b,)) if t.ndim == 0 or t.shape[0] == 1 else t

    c = self.condition(t, cond)
    source = cond["source"]
    if cfg.mode == "swap":
      source = source * (1.0 - cond["source_mask"].astype(source.dtype))  # I_m (TGDM 4.4)
    f_s = TextureEncoder(cfg, name="texture_encoder")(source)

    def res(ch, name):
      return AdaINResBlock(ch, cfg.adain_eps, cfg.dropout, name=name, **kw)

    def texatt(h, level, name):
      if level not in f_s:
        return h
      return layers.TexAtt(cfg.texatt_reduction, name=name, **kw)(h, f_s[level])

    chans = cfg.block_channels
    n = len(chans)
    x = jnp.concatenate([x_t, cond["i3d"].astype(x_t.dtype)], axis=-1).astype(cfg.compute_dtype)
    h = layers.Conv(chans[0], 3, padding=1, name="conv_in", **kw)(_constrain(x))
    skips = [h]
    for i in range(n):
      for j in range(cfg.layers_per_block):
        h = res(chans[i], f"down_{i}_res_{j}")(h, c, deterministic)
        h = _constrain(texatt(h, i, f"down_{i}_texatt_{j}"))
        skips.append(h)
      if i < n - 1:
        h = layers.Downsample2D(chans[i + 1], padding=1, name=f"down_{i}_downsample", **kw)(h)
        skips.append(h)
    h = res(chans[-1], "mid_res_0")(h, c, deterministic)
    h = texatt(h, n - 1, "mid_texatt")
    h = _constrain(res(chans[-1], "mid_res_1")(h, c, deterministic))
    for i in reversed(range(n)):
      for j in range(cfg.layers_per_block + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = res(chans[i], f"up_{i}_res_{j}")(h, c, deterministic)
        h = _constrain(texatt(h, i, f"up_{i}_texatt_{j}"))
      if i > 0:
        h = layers.Upsample2D(chans[i - 1], name=f"up_{i}_upsample", **kw)(h)
    h = nn.silu(layers.GroupNorm(cfg.norm_num_groups, name="norm_out", **kw)(h))
    h = layers.Conv(cfg.image_channels, 3, padding=1, name="conv_out", **kw)(h)
    return _constrain(h.astype(jnp.float32))


# ----------------------------------------------------------------------------- functional API


def dummy_cond(config: TGDMConfig, batch: int = 1) -> dict[str, jax.Array]:
  s, ch = config.image_size, config.image_channels
  cond = {
    "i3d": jnp.zeros((batch, s, s, ch), jnp.float32),
    "source": jnp.zeros((batch, s, s, ch), jnp.float32),
    "rho": jnp.zeros((batch, config.rho_dim), jnp.float32),
  }
  if config.mode == "swap":
    cond["id"] = jnp.zeros((batch, config.id_dim), jnp.float32)
    cond["source_mask"] = jnp.zeros((batch, s, s, 1), jnp.float32)
  return cond


def init_params(config: TGDMConfig, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape (see facediff.partitioning.init_sharded)."""
  s = config.image_size
  x = jnp.zeros((1, s, s, config.image_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return TGDMDenoiser(config).init(key, x, t, dummy_cond(config))["params"]


def abstract_params(config: TGDMConfig):
  """Shapes/dtypes (and logical axes) of the params without allocating them."""
  return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))


def apply(
  config: TGDMConfig, params, x_t, t, cond, *, deterministic: bool = True, rngs=None
) -> jax.Array:
  """eps = TGDM denoiser(x_t, t, cond), float32 (B, H, W, 3). ``params`` boxed or not."""
  return TGDMDenoiser(config).apply(
    {"params": nn.unbox(params)}, x_t, t, cond, deterministic, rngs=rngs
  )
