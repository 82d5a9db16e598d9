"""FaceNet's InceptionResnetV1 (facenet-pytorch layout) in Flax Linen, NHWC, inference only.

Architecture of facenet-pytorch ``models/inception_resnet_v1.py`` (itself a port of
David Sandberg's TensorFlow facenet): a stem of seven BasicConv2d (conv without bias,
BatchNorm eps 1e-3, ReLU) and one 3x3/2 max pool (160 -> 17 px, 256 ch), 5 x Block35
(scale 0.17), Mixed_6a (-> 8 px, 896 ch), 10 x Block17 (scale 0.10), Mixed_7a
(-> 3 px, 1792 ch), 5 x Block8 (scale 0.20), one Block8 (scale 1, no ReLU), global
average pool, (dropout: identity at inference), ``last_linear`` 1792 -> 512 without
bias, ``last_bn`` (BatchNorm1d, eps 1e-3), L2 normalisation. Input 160x160 RGB,
standardised as ``(x - 127.5) / 128`` (FACTS.md "Face networks").

BatchNorm runs in inference mode only: its running mean and variance are ordinary
parameters (``mean``, ``var``) next to ``scale`` and ``bias``, so the whole frozen
network is one params tree. Everything is differentiable with respect to the input
image (ReLU and max pool almost everywhere), for identity losses.

Module names follow facenet-pytorch's (``conv2d_1a/conv``, ``conv2d_1a/bn``,
``repeat_1_0/branch1_1/conv``, ``mixed_7a/branch2_2/bn``, ``last_linear``,
``last_bn``; items of a torch ``nn.Sequential`` are written ``<name>_<index>``), so
``facediff/convert/facenet.py`` is a renaming plus transposes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers

EMBEDDING_DIM = 512
IMAGE_SIZE = 160


@dataclasses.dataclass(frozen=True)
class FaceNetConfig:
  """Shape of an InceptionResnetV1; the defaults are facenet-pytorch's network.

  ``repeats`` = the number of Block35, Block17 and Block8 units in ``repeat_1``,
  ``repeat_2`` and ``repeat_3`` (5, 10, 5). Fewer only for tests (a truncated
  reference network gives the same layout with fewer keys).
  """

  repeats: tuple[int, int, int] = (5, 10, 5)
  image_size: int = IMAGE_SIZE
  embedding_dim: int = EMBEDDING_DIM
  bn_eps: float = 1e-3
  # Compute dtype; parameters stay float32. BatchNorm, the pooling and the L2 norm run
  # in float32 at least ("float64" under jax.enable_x64 computes everything in float64).
  dtype: str = "float32"

  def __post_init__(self):
    repeats = tuple(int(r) for r in self.repeats)
    if len(repeats) != 3 or min(repeats) < 1:
      raise ValueError(f"FaceNetConfig.repeats must be three positive ints, got {self.repeats}")
    object.__setattr__(self, "repeats", repeats)  # hashable even when given a list


# ----------------------------------------------------------------------------- equations


def fixed_image_standardization(x: jax.Array) -> jax.Array:
  """facenet-pytorch ``fixed_image_standardization``: RGB in [0, 255] -> (x - 127.5) / 128."""
  return (x - 127.5) / 128.0


def _wide(dtype) -> jnp.dtype:
  """The dtype for statistics: float32, or the compute dtype if wider."""
  return jnp.promote_types(jnp.float32, jnp.dtype(dtype))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch ``F.normalize(x, p=2, dim=1)`` on the last axis: x / max(||x||_2, eps)."""
  x = x.astype(_wide(x.dtype))
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch ``nn.MaxPool2d(3, stride=2)``: no padding, floor mode (facenet-pytorch's
  ``maxpool_3a`` and the max-pool branches of Mixed_6a / Mixed_7a)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


# ----------------------------------------------------------------------------- layers


class FrozenBatchNorm(nn.Module):
  """torch BatchNorm (eval mode): (x - mean) / sqrt(var + eps) * scale + bias, last axis.

  The running statistics are parameters (``mean``, ``var``; torch's ``running_mean``,
  ``running_var``), all four with logical axis ``norm``; computed in float32 (or in
  ``dtype`` if wider), returned in ``dtype``.
  """

  eps: float = 1e-3
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]

    def param(name: str, init: Callable) -> jax.Array:
      return self.param(name, nn.with_logical_partitioning(init, ("norm",)), (c,), jnp.float32)

    scale = param("scale", nn.initializers.ones_init())
    bias = param("bias", nn.initializers.zeros_init())
    mean = param("mean", nn.initializers.zeros_init())
    var = param("var", nn.initializers.ones_init())
    wide = _wide(self.dtype)
    mean, var, scale, bias = (a.astype(wide) for a in (mean, var, scale, bias))
    y = (x.astype(wide) - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(jnp.dtype(self.dtype))


def conv(
  features: int,
  kernel: int | tuple[int, int],
  stride: int = 1,
  padding: int | tuple[int, int] = 0,
  *,
  use_bias: bool,
  dtype: str,
  name: str,
) -> nn.Conv:
  """torch ``nn.Conv2d`` in NHWC with (possibly non-square) ``kernel`` and symmetric
  per-axis ``padding`` (torch's ``padding=(ph, pw)``). Params as ``layers.Conv``:
  ``kernel`` (kh, kw, in, out) with logical axes ``layers.CONV_AXES``, ``bias``."""
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return nn.Conv(
    features,
    (kh, kw),
    strides=(stride, stride),
    padding=((ph, ph), (pw, pw)),
    use_bias=use_bias,
    dtype=jnp.dtype(dtype),
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(layers.torch_default_kernel_init(), layers.CONV_AXES),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    name=name,
  )


class BasicConv2d(nn.Module):
  """facenet-pytorch ``BasicConv2d``: ``conv`` (no bias) -> ``bn`` (eps 1e-3) -> ReLU."""

  features: int
  kernel: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0
  eps: float = 1e-3
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = conv(
      self.features,
      self.kernel,
      self.stride,
      self.padding,
      use_bias=False,
      dtype=self.dtype,
      name="conv",
    )(x)
    x = FrozenBatchNorm(self.eps, self.dtype, name="bn")(x)
    return nn.relu(x)


class _Net(nn.Module):
  """Base of the Inception blocks: a BasicConv2d factory bound to the config."""

  config: FaceNetConfig

  def basic(self, features, kernel, stride=1, padding=0, *, name):
    cfg = self.config
    return BasicConv2d(features, kernel, stride, padding, cfg.bn_eps, cfg.dtype, name=name)

  def up_projection(self, x: jax.Array, features: int) -> jax.Array:
    """The blocks' ``conv2d``: a 1x1 conv with bias back to the trunk's width."""
    return conv(features, 1, use_bias=True, dtype=self.config.dtype, name="conv2d")(x)


class Block35(_Net):
  """facenet-pytorch ``Block35`` (17x17x256): branches 1x1/32; 1x1/32 -> 3x3/32;
  1x1/32 -> 3x3/32 -> 3x3/32; concat (96) -> 1x1 conv2d (256, bias);
  relu(x + scale * out)."""

  scale: float = 0.17

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b0 = self.basic(32, 1, name="branch0")(x)
    b1 = self.basic(32, 1, name="branch1_0")(x)
    b1 = self.basic(32, 3, padding=1, name="branch1_1")(b1)
    b2 = self.basic(32, 1, name="branch2_0")(x)
    b2 = self.basic(32, 3, padding=1, name="branch2_1")(b2)
    b2 = self.basic(32, 3, padding=1, name="branch2_2")(b2)
    out = self.up_projection(jnp.concatenate([b0, b1, b2], axis=-1), x.shape[-1])
    return nn.relu(out * self.scale + x)


class Block17(_Net):
  """facenet-pytorch ``Block17`` (8x8x896): branches 1x1/128; 1x1/128 -> 1x7/128
  (pad 0,3) -> 7x1/128 (pad 3,0); concat (256) -> 1x1 conv2d (896, bias);
  relu(x + scale * out)."""

  scale: float = 0.10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b0 = self.basic(128, 1, name="branch0")(x)
    b1 = self.basic(128, 1, name="branch1_0")(x)
    b1 = self.basic(128, (1, 7), padding=(0, 3), name="branch1_1")(b1)
    b1 = self.basic(128, (7, 1), padding=(3, 0), name="branch1_2")(b1)
    out = self.up_projection(jnp.concatenate([b0, b1], axis=-1), x.shape[-1])
    return nn.relu(out * self.scale + x)


class Block8(_Net):
  """facenet-pytorch ``Block8`` (3x3x1792): branches 1x1/192; 1x1/192 -> 1x3/192
  (pad 0,1) -> 3x1/192 (pad 1,0); concat (384) -> 1x1 conv2d (1792, bias);
  x + scale * out, then ReLU unless ``no_relu`` (the final ``block8``)."""

  scale: float = 0.20
  no_relu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b0 = self.basic(192, 1, name="branch0")(x)
    b1 = self.basic(192, 1, name="branch1_0")(x)
    b1 = self.basic(192, (1, 3), padding=(0, 1), name="branch1_1")(b1)
    b1 = self.basic(192, (3, 1), padding=(1, 0), name="branch1_2")(b1)
    out = self.up_projection(jnp.concatenate([b0, b1], axis=-1), x.shape[-1])
    out = out * self.scale + x
    return out if self.no_relu else nn.relu(out)


class Mixed6a(_Net):
  """facenet-pytorch ``Mixed_6a`` (17 -> 8 px, 256 -> 896 ch): 3x3/2 conv (384);
  1x1/192 -> 3x3/192 (pad 1) -> 3x3/2 (256); 3x3/2 max pool (256); concat."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b0 = self.basic(384, 3, 2, name="branch0")(x)
    b1 = self.basic(192, 1, name="branch1_0")(x)
    b1 = self.basic(192, 3, padding=1, name="branch1_1")(b1)
    b1 = self.basic(256, 3, 2, name="branch1_2")(b1)
    return jnp.concatenate([b0, b1, max_pool_3x3_s2(x)], axis=-1)


class Mixed7a(_Net):
  """facenet-pytorch ``Mixed_7a`` (8 -> 3 px, 896 -> 1792 ch): 1x1/256 -> 3x3/2 (384);
  1x1/256 -> 3x3/2 (256); 1x1/256 -> 3x3/256 (pad 1) -> 3x3/2 (256); 3x3/2 max pool
  (896); concat."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b0 = self.basic(256, 1, name="branch0_0")(x)
    b0 = self.basic(384, 3, 2, name="branch0_1")(b0)
    b1 = self.basic(256, 1, name="branch1_0")(x)
    b1 = self.basic(256, 3, 2, name="branch1_1")(b1)
    b2 = self.basic(256, 1, name="branch2_0")(x)
    b2 = self.basic(256, 3, padding=1, name="branch2_1")(b2)
    b2 = self.basic(256, 3, 2, name="branch2_2")(b2)
    return jnp.concatenate([b0, b1, b2, max_pool_3x3_s2(x)], axis=-1)


class InceptionResnetV1(_Net):
  """facenet-pytorch ``InceptionResnetV1(classify=False)`` in eval mode, NHWC.

  ``__call__(images)``: (B, H, W, 3) float RGB in [0, 255] (160x160 for the released
  weights) -> (B, 512) L2-normalised embeddings, float32 (float64 if that is the
  compute dtype). With ``normalize=False``
  returns ``last_bn``'s output instead (the pre-normalisation embedding).
  """

  @nn.compact
  def __call__(self, images: jax.Array, normalize: bool = True) -> jax.Array:
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"InceptionResnetV1 expects (B, H, W, 3) RGB images, got {images.shape}")
    dtype, wide = jnp.dtype(cfg.dtype), _wide(cfg.dtype)
    x = fixed_image_standardization(images.astype(wide)).astype(dtype)
    x = self.basic(32, 3, 2, name="conv2d_1a")(x)
    x = self.basic(32, 3, name="conv2d_2a")(x)
    x = self.basic(64, 3, padding=1, name="conv2d_2b")(x)
    x = max_pool_3x3_s2(x)
    x = self.basic(80, 1, name="conv2d_3b")(x)
    x = self.basic(192, 3, name="conv2d_4a")(x)
    x = self.basic(256, 3, 2, name="conv2d_4b")(x)
    for i in range(cfg.repeats[0]):
      x = Block35(cfg, scale=0.17, name=f"repeat_1_{i}")(x)
    x = Mixed6a(cfg, name="mixed_6a")(x)
    for i in range(cfg.repeats[1]):
      x = Block17(cfg, scale=0.10, name=f"repeat_2_{i}")(x)
    x = Mixed7a(cfg, name="mixed_7a")(x)
    for i in range(cfg.repeats[2]):
      x = Block8(cfg, scale=0.20, name=f"repeat_3_{i}")(x)
    x = Block8(cfg, scale=1.0, no_relu=True, name="block8")(x)
    x = jnp.mean(x.astype(wide), axis=(1, 2))  # avgpool_1a; dropout is off
    x = layers.Dense(
      cfg.embedding_dim, ("mlp", "embed"), use_bias=False, dtype=dtype, name="last_linear"
    )(x.astype(dtype))
    x = FrozenBatchNorm(cfg.bn_eps, str(wide), name="last_bn")(x)
    return l2_normalize(x) if normalize else x


# ----------------------------------------------------------------------------- functional API


def init_params(config: FaceNetConfig, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape (see facediff.partitioning.init_sharded)."""
  x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return InceptionResnetV1(config).init(key, x)["params"]


def abstract_params(config: FaceNetConfig):
  """The param tree's shapes and dtypes (``jax.eval_shape``, nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
