"""VGG16's convolutional trunk (Simonyan & Zisserman 2015, configuration "D") in Flax
Linen, NHWC, returning the five feature maps LPIPS reads.

Five stages of 3x3 convolutions (padding 1, stride 1, bias) each followed by ReLU:
64 x 2, 128 x 2, 256 x 3, 512 x 3, 512 x 3 channels, with a 2x2 stride-2 max-pool
between stages. ``VGG16Features`` returns the last ReLU of every stage:
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (full, 1/2, 1/4, 1/8, 1/16 resolution;
pooling floors odd sizes, as torch's ``MaxPool2d(2, 2)`` does). The pool after stage 5
and the classifier are not part of it.

Parameters are named as in the paper's tables (``conv1_1`` ... ``conv5_3``); the
mapping from torchvision's ``features.<index>`` layout lives in
``facediff.convert.lpips``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers

LAYER_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


@dataclasses.dataclass(frozen=True)
class VGG16Config:
  """Shapes of the trunk. ``stage_channels`` / ``stage_depths``: output width and number
  of 3x3 convolutions per stage (VGG16 = configuration D). ``dtype``: compute dtype
  ("float32" or "bfloat16"); parameters stay float32."""

  in_channels: int = 3
  stage_channels: tuple[int, ...] = (64, 128, 256, 512, 512)
  stage_depths: tuple[int, ...] = (2, 2, 3, 3, 3)
  dtype: str = "float32"

  def __post_init__(self):
    if len(self.stage_channels) != len(self.stage_depths):
      raise ValueError(
        f"VGG16Config: stage_channels {self.stage_channels} and stage_depths "
        f"{self.stage_depths} must have the same length"
      )

  @property
  def min_size(self) -> int:
    """Smallest input height/width that leaves the last stage at least 1x1."""
    return 2 ** (len(self.stage_channels) - 1)


def conv_names(config: VGG16Config) -> tuple[tuple[str, ...], ...]:
  """Per stage, the names of its convolutions: (("conv1_1", "conv1_2"), ...)."""
  return tuple(
    tuple(f"conv{s + 1}_{i + 1}" for i in range(depth))
    for s, depth in enumerate(config.stage_depths)
  )


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, no padding (torch ``MaxPool2d(2, 2)``: odd sizes floor)."""
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class VGG16Features(nn.Module):
  """x (B, H, W, 3), already normalised as the caller's weights expect ->
  tuple of the stages' last ReLU maps (see ``LAYER_NAMES``), each (B, H_s, W_s, C_s)
  in the compute dtype."""

  config: VGG16Config = VGG16Config()

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"VGG16Features wants (B, H, W, {cfg.in_channels}), got {x.shape}")
    if min(x.shape[1:3]) < cfg.min_size:
      raise ValueError(
        f"VGG16Features needs H, W >= {cfg.min_size} ({len(cfg.stage_channels) - 1} "
        f"2x2 pools), got {x.shape[1:3]}"
      )
    h = x.astype(dtype)
    outs = []
    for s, (channels, names) in enumerate(zip(cfg.stage_channels, conv_names(cfg), strict=True)):
      if s > 0:
        h = max_pool_2x2(h)
      for name in names:
        h = layers.Conv(channels, 3, padding=1, dtype=dtype, name=name)(h)
        h = nn.relu(h)
      outs.append(h)
    return tuple(outs)


def init_params(config: VGG16Config, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape (see facediff.partitioning.init_sharded)."""
  x = jnp.zeros((1, config.min_size, config.min_size, config.in_channels), jnp.float32)
  return VGG16Features(config).init(key, x)["params"]


def abstract_params(config: VGG16Config):
  """The param tree's shapes and dtypes (``jax.eval_shape``, nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
