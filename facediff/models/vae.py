"""Stable Diffusion's KL autoencoder (diffusers ``AutoencoderKL``) in Flax Linen, NHWC.

Encoder: conv_in -> DownEncoderBlock2D x N (resnets, stride-2 conv with (0,1) padding
except the last) -> mid-block (resnet, single-head spatial attention, resnet) ->
GroupNorm -> SiLU -> conv_out (2 * latent channels). ``quant_conv`` (1x1) gives the
moments, split into mean / logvar of a diagonal Gaussian. Decoder mirrors it with
``post_quant_conv``, UpDecoderBlock2D (layers_per_block + 1 resnets, nearest x2 +
conv). Building blocks come from ``facediff.models.layers``; parameter names follow
diffusers (``down_blocks_0/resnets_1/conv1``), so conversion is a generic renaming.

Use through ``apply(..., method=...)``:
    vae = AutoencoderKL(cfg)
    post = vae.apply(v, x, method=vae.encode)            # DiagonalGaussian
    z = vae.apply(v, x, key, method=vae.encode_latents)  # scaled latents for the UNet
    x = vae.apply(v, z, method=vae.decode_latents)       # image in [-1, 1]-ish
"""

from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers

SD_SCALING_FACTOR = 0.18215


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Shapes of an ``AutoencoderKL``; field names are diffusers' config keys."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  act_fn: str = "silu"
  sample_size: int = 512
  scaling_factor: float = SD_SCALING_FACTOR
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  # Compute dtype; parameters stay float32, norms compute statistics in float32.
  dtype: str = "float32"

  @classmethod
  def sd14(cls) -> "VAEConfig":
    """SD-1.x VAE: 4 levels 128/256/512/512, 2 resnets per level, 4 latent channels."""
    return cls()

  @classmethod
  def tiny(cls) -> "VAEConfig":
    return cls(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def validate(self, source: str = "config") -> None:
    if self.act_fn != "silu":
      raise ValueError(f"{source}: act_fn {self.act_fn!r} is not supported (only 'silu')")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"{source}: block_out_channels {self.block_out_channels} not divisible "
          f"by norm_num_groups {self.norm_num_groups}"
        )


@flax.struct.dataclass
class DiagonalGaussian:
  """The VAE posterior N(mean, exp(logvar)); logvar is clamped to [-30, 20] as in diffusers."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Splits (..., 2C) moments on the channel axis into mean and logvar."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    """mean + std * eps, eps ~ N(0, I) drawn with ``key``."""
    eps = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
    return self.mean + self.std * eps

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(N(mean, var) || N(0, I)) summed over H, W, C (per batch element)."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _resnet(cfg: VAEConfig, out_channels: int, name: str) -> layers.ResnetBlock2D:
  return layers.ResnetBlock2D(
    out_channels,
    use_time_emb=False,
    groups=cfg.norm_num_groups,
    eps=1e-6,
    dtype=jnp.dtype(cfg.dtype),
    name=name,
  )


class MidBlock(nn.Module):
  """diffusers ``UNetMidBlock2D`` without time embedding: resnet, (attention, resnet)."""

  config: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    c = x.shape[-1]
    x = _resnet(cfg, c, "resnets_0")(x)
    if cfg.mid_block_add_attention:
      x = layers.SpatialSelfAttention(
        heads=1,
        groups=cfg.norm_num_groups,
        eps=1e-6,
        dtype=jnp.dtype(cfg.dtype),
        name="attentions_0",
      )(x)
    return _resnet(cfg, c, "resnets_1")(x)


class DownEncoderBlock(nn.Module):
  """diffusers ``DownEncoderBlock2D``: resnets, then a stride-2 conv unless last."""

  config: VAEConfig
  out_channels: int
  add_downsample: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    for j in range(cfg.layers_per_block):
      x = _resnet(cfg, self.out_channels, f"resnets_{j}")(x)
    if self.add_downsample:
      x = layers.Downsample2D(
        self.out_channels, padding=0, dtype=jnp.dtype(cfg.dtype), name="downsamplers_0"
      )(x)
    return x


class UpDecoderBlock(nn.Module):
  """diffusers ``UpDecoderBlock2D``: layers_per_block + 1 resnets, then nearest x2 + conv."""

  config: VAEConfig
  out_channels: int
  add_upsample: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    for j in range(cfg.layers_per_block + 1):
      x = _resnet(cfg, self.out_channels, f"resnets_{j}")(x)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, dtype=jnp.dtype(cfg.dtype), name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""

  config: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    chans = cfg.block_out_channels
    x = layers.Conv(chans[0], 3, padding=1, dtype=dtype, name="conv_in")(x.astype(dtype))
    for i, c in enumerate(chans):
      x = DownEncoderBlock(cfg, c, i < len(chans) - 1, name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg, name="mid_block")(x)
    x = layers.GroupNorm(cfg.norm_num_groups, 1e-6, dtype=dtype, name="conv_norm_out")(x)
    x = nn.silu(x)
    return layers.Conv(2 * cfg.latent_channels, 3, padding=1, dtype=dtype, name="conv_out")(x)


class Decoder(nn.Module):
  """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""

  config: VAEConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    chans = tuple(reversed(cfg.block_out_channels))
    x = layers.Conv(chans[0], 3, padding=1, dtype=dtype, name="conv_in")(z.astype(dtype))
    x = MidBlock(cfg, name="mid_block")(x)
    for i, c in enumerate(chans):
      x = UpDecoderBlock(cfg, c, i < len(chans) - 1, name=f"up_blocks_{i}")(x)
    x = layers.GroupNorm(cfg.norm_num_groups, 1e-6, dtype=dtype, name="conv_norm_out")(x)
    x = nn.silu(x)
    return layers.Conv(cfg.out_channels, 3, padding=1, dtype=dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """diffusers ``AutoencoderKL`` (SD's first stage), NHWC.

  ``__call__(x, key=None)`` reconstructs x through the posterior's mode (or a sample
  when a key is given); ``init`` through it creates every parameter.
  """

  config: VAEConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = layers.Conv(2 * cfg.latent_channels, 1, padding=0, dtype=dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = layers.Conv(cfg.latent_channels, 1, padding=0, dtype=dtype)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """Image (B, H, W, C) in [-1, 1] -> posterior over unscaled latents (float32)."""
    h = self.encoder(x)
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    return DiagonalGaussian.from_moments(h.astype(jnp.float32))

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latent (B, h, w, latent_channels) -> image (B, H, W, C), float32."""
    z = z.astype(jnp.dtype(self.config.dtype))
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def encode_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Image -> the UNet's latent: scaling_factor * (sample with ``key``, or the mode)."""
    post = self.encode(x)
    z = post.mode() if key is None else post.sample(key)
    return z * self.config.scaling_factor

  def decode_latents(self, z: jax.Array) -> jax.Array:
    """The UNet's latent -> image: decode(z / scaling_factor)."""
    return self.decode(z / self.config.scaling_factor)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    post = self.encode(x)
    return self.decode(post.mode() if key is None else post.sample(key))


# ----------------------------------------------------------------------------- functional API


def init_params(config: VAEConfig, key: jax.Array, sample_hw: tuple[int, int] | None = None):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape (see facediff.partitioning.init_sharded)."""
  f = config.downsample_factor
  hw = sample_hw or (2 * f, 2 * f)
  x = jnp.zeros((1, *hw, config.in_channels), jnp.float32)
  return AutoencoderKL(config).init(key, x)["params"]


def abstract_params(config: VAEConfig):
  """The param tree's shapes and dtypes (``jax.eval_shape``, nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
