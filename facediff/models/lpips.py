"""LPIPS, the learned perceptual image patch similarity (Zhang et al., "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018), VGG16 variant, v0.1,
in Flax Linen, NHWC.

d(x, y) = sum_l mean_{h,w} sum_c w_l,c (f^l_hwc(x) - f^l_hwc(y))^2, where f^l is the l-th
VGG16 feature map (relu1_2 ... relu5_3, see ``facediff.models.vgg16``) of the shifted and
scaled input, unit-normalised over channels, and w_l the non-negative 1x1 "linear
head" of layer l (``lin0`` ... ``lin4``, no bias). Images are in [-1, 1].

Params: ``{"vgg": <VGG16Features params>, "lin0": {"kernel": (1, 1, 64, 1)}, ...,
"lin4": {"kernel": (1, 1, 512, 1)}}``. The released heads (lpips package,
``weights/v0.1/vgg.pth``) and a torchvision VGG16 trunk are read by
``facediff.convert.lpips``. All weights are frozen: ``apply_lpips`` stops their
gradients; the distance is differentiable with respect to both images.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers
from facediff.models.vgg16 import VGG16Config, VGG16Features

# lpips v0.1 ``ScalingLayer``: ImageNet mean / std re-expressed for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
  """LPIPS-VGG v0.1. ``vgg``: the trunk (its ``dtype`` is the trunk's compute dtype;
  normalisation, heads and the distance are float32). ``shift`` / ``scale``: the input
  scaling layer; ``eps``: added to the channel norm before dividing."""

  vgg: VGG16Config = VGG16Config()
  shift: tuple[float, ...] = LPIPS_SHIFT
  scale: tuple[float, ...] = LPIPS_SCALE
  eps: float = 1e-10

  def __post_init__(self):
    n = self.vgg.in_channels
    if len(self.shift) != n or len(self.scale) != n:
      raise ValueError(
        f"LPIPSConfig: shift {self.shift} and scale {self.scale} need {n} values (vgg.in_channels)"
      )


def scale_input(x: jax.Array, shift, scale) -> jax.Array:
  """lpips v0.1 ``ScalingLayer``: (x - shift) / scale per channel, x in [-1, 1] (NHWC)."""
  shift = jnp.asarray(shift, jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)
  return (x.astype(jnp.float32) - shift) / scale


def unit_normalize(f: jax.Array, eps: float) -> jax.Array:
  """Zhang et al. 2018 Eq. 1, y-hat: features divided by their L2 norm over channels
  (lpips ``normalize_tensor``: f / (sqrt(sum_c f^2) + eps)), float32, NHWC."""
  f = f.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True))
  return f / (norm + eps)


def upsample_bilinear(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize to ``hw`` with half-pixel centres (torch ``F.interpolate(mode=
  "bilinear", align_corners=False)`` for upsampling, as lpips' spatial output uses)."""
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, *hw, c), method="bilinear")


class LPIPS(nn.Module):
  """(x, y) in [-1, 1], both (B, H, W, 3) -> LPIPS distance (B,), float32; with
  ``spatial=True`` the per-pixel map (B, H, W) instead (each layer's map upsampled
  bilinearly to (H, W), then summed; its mean is close to, not exactly, the distance)."""

  config: LPIPSConfig = LPIPSConfig()

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, spatial: bool = False) -> jax.Array:
    cfg = self.config
    if x.shape != y.shape:
      raise ValueError(f"LPIPS needs two batches of the same shape, got {x.shape} and {y.shape}")
    b, h, w, _ = x.shape
    # x and y in one pass of the trunk. d(x, x) is 0 up to float rounding (~1e-16): XLA's
    # vectorised reductions need not round every batch row or pixel the same way.
    scaled = scale_input(jnp.concatenate([x, y], axis=0), cfg.shift, cfg.scale)
    feats = VGG16Features(cfg.vgg, name="vgg")(scaled)
    total = jnp.zeros((b, h, w) if spatial else (b,), jnp.float32)
    for i, f in enumerate(feats):
      f = unit_normalize(f, cfg.eps)
      diff = jnp.square(f[:b] - f[b:])
      head = layers.Conv(1, 1, padding=0, use_bias=False, name=f"lin{i}")(diff)
      if spatial:
        total = total + upsample_bilinear(head, (h, w))[..., 0]
      else:
        total = total + jnp.mean(head, axis=(1, 2, 3))
    return total


def init_params(config: LPIPSConfig, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape (see facediff.partitioning.init_sharded)."""
  s = config.vgg.min_size
  x = jnp.zeros((1, s, s, config.vgg.in_channels), jnp.float32)
  return LPIPS(config).init(key, x, x)["params"]


def abstract_params(config: LPIPSConfig):
  """The param tree's shapes and dtypes (``jax.eval_shape``, nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def apply_lpips(
  config: LPIPSConfig, params, x: jax.Array, y: jax.Array, *, spatial: bool = False
) -> jax.Array:
  """LPIPS distance (B,) (or map (B, H, W)) between image batches in [-1, 1], NHWC.
  The weights are frozen (``stop_gradient``); gradients flow to ``x`` and ``y``."""
  params = jax.lax.stop_gradient(params)
  return LPIPS(config).apply({"params": params}, x, y, spatial=spatial)
