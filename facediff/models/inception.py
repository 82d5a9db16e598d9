"""The FID Inception-v3 (pytorch-fid's ``FIDInceptionV3``) in Flax Linen, NHWC, inference only.

FID (Heusel et al. 2017) is defined on the 2048-D ``pool_3`` features of one specific
network: the TensorFlow Inception graph ``inception-2015-12-05``. pytorch-fid
(``src/pytorch_fid/inception.py``) ports it to torchvision's ``Inception3`` layout and
ships the weights as ``pt_inception-2015-12-05-6726825d.pth``; this module is that
network, so those weights convert one to one (``facediff.convert.inception``).

Architecture (torchvision ``models/inception.py``, ``Inception3(num_classes=1008,
aux_logits=False, transform_input=False)``), every conv a ``BasicConv2d`` (conv without
bias, BatchNorm eps 1e-3, ReLU):

    299 -> Conv2d_1a_3x3 (32, /2) -> Conv2d_2a_3x3 (32) -> Conv2d_2b_3x3 (64, pad 1)
        -> max pool 3/2 -> Conv2d_3b_1x1 (80) -> Conv2d_4a_3x3 (192) -> max pool 3/2 (35 px)
        -> Mixed_5b, 5c, 5d (InceptionA) -> Mixed_6a (InceptionB, 17 px)
        -> Mixed_6b .. 6e (InceptionC) -> Mixed_7a (InceptionD, 8 px)
        -> Mixed_7b, 7c (InceptionE) -> global average pool (2048 = pool_3) -> fc (1008)

and pytorch-fid's patches of the TF graph (``fid_inception_v3``): the average-pool branch
of InceptionA, InceptionC and the first InceptionE (``FIDInceptionA``, ``FIDInceptionC``,
``FIDInceptionE_1``) does not count the zero padding (TF's ``AVG`` pooling,
``count_include_pad=False``); the second InceptionE (``FIDInceptionE_2``, Mixed_7c) max-pools
in that branch instead. InceptionB / InceptionD are unpatched.

Input: pytorch-fid resizes its [0, 1] input to 299x299 with ``F.interpolate(mode=
"bilinear", align_corners=False)`` (no antialiasing) and then maps it to [-1, 1]. Here
images come in [-1, 1] (facediff's convention) and are resized the same way; bilinear
weights sum to one, so resizing commutes with the affine map and the two agree.

``width_divisor`` > 1 divides every channel count (a narrow network of the same layout,
for tests only); 1 is the FID network. Batch norms use their running statistics, stored
as ``mean`` / ``var`` next to ``scale`` / ``bias`` in ``params``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from facediff.models import layers
from facediff.models.facenet import BasicConv2d

FID_IMAGE_SIZE = 299
FID_NUM_CLASSES = 1008
FEATURE_DIM = 2048
BN_EPS = 1e-3
# Smallest input side the network takes (five stride-2 stages leave 1x1): torchvision
# documents 75x75 as Inception3's minimum.
MIN_IMAGE_SIZE = 75
# Every channel count of the network is a multiple of 16.
_DIVISORS = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  """Shape of the FID Inception; the defaults are pytorch-fid's network.

  ``image_size``: side the input is resized to (299). ``resize_input``: False feeds the
  images as they are (they must then be at least 75x75). ``num_classes``: width of the
  ``fc`` head (1008 in the TF graph). ``width_divisor``: 1, 2, 4, 8 or 16, dividing every
  channel count (tests only). ``dtype``: compute dtype ("float32" or "bfloat16");
  parameters stay float32, batch norms compute in float32.
  """

  image_size: int = FID_IMAGE_SIZE
  resize_input: bool = True
  num_classes: int = FID_NUM_CLASSES
  width_divisor: int = 1
  dtype: str = "float32"

  def __post_init__(self):
    if self.width_divisor not in _DIVISORS:
      raise ValueError(
        f"InceptionConfig.width_divisor must be one of {_DIVISORS}, got {self.width_divisor}"
      )
    if self.image_size < MIN_IMAGE_SIZE:
      raise ValueError(
        f"InceptionConfig.image_size must be at least {MIN_IMAGE_SIZE}, got {self.image_size}"
      )
    if self.num_classes < 1:
      raise ValueError(f"InceptionConfig.num_classes must be positive, got {self.num_classes}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"InceptionConfig.dtype must be float32 or bfloat16, got {self.dtype!r}")

  @property
  def feature_dim(self) -> int:
    """Width of the pool_3 features (2048 / width_divisor)."""
    return FEATURE_DIM // self.width_divisor


# ----------------------------------------------------------------------------- equations


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) interpolation weights of torch's 1-D bilinear resize with
  ``align_corners=False`` and no antialiasing (ATen ``upsample_bilinear2d``): output
  pixel o reads the input at src = max((o + 0.5) * n_in / n_out - 0.5, 0), i.e. pixels
  i0 = floor(src) and i1 = min(i0 + 1, n_in - 1) with weights 1 - (src - i0) and
  src - i0. Rounded as ATen does for float32 images (checked on identity images): the
  scale n_in / n_out in float32, src = scale * (o + 0.5) - 0.5 with one rounding (a fused
  multiply-add) to float32, the weights in float32. Exact float64 weights would differ by
  up to ~n_in * 6e-8."""
  f32 = np.float32
  scale = np.float64(f32(n_in) / f32(n_out))
  src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(f32)
  src = np.maximum(src, f32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = (src - i0.astype(f32)).astype(f32)
  m = np.zeros((n_out, n_in), f32)
  rows = np.arange(n_out)
  np.add.at(m, (rows, i0), f32(1.0) - lam)
  np.add.at(m, (rows, i1), lam)
  return m


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
  """pytorch-fid's input resize, ``F.interpolate(x, size=(size, size), mode="bilinear",
  align_corners=False)`` (no antialiasing even when shrinking), on NHWC float32 images:
  one (size x H) and one (size x W) weight matrix (``bilinear_matrix``). Identity when
  the images already have that size."""
  _, h, w, _ = x.shape
  x = x.astype(jnp.float32)
  if (h, w) == (size, size):
    return x
  mh = jnp.asarray(bilinear_matrix(h, size), jnp.float32)
  mw = jnp.asarray(bilinear_matrix(w, size), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch ``MaxPool2d(3, stride=2)`` / ``F.max_pool2d(x, 3, stride=2)``: no padding,
  floor mode (the stem's two pools, InceptionB / InceptionD's pool branch)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def avg_pool_3x3_tf(x: jax.Array) -> jax.Array:
  """pytorch-fid's patched pool branch of FIDInceptionA / C / E_1: ``F.avg_pool2d(x, 3,
  stride=1, padding=1, count_include_pad=False)``, TF's SAME average pool, which divides
  each window's sum by the number of pixels inside the image (4 at a corner, 6 on an
  edge, 9 inside) instead of torchvision's 9."""
  pooled = nn.avg_pool(
    x.astype(jnp.float32), (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False
  )
  return pooled.astype(x.dtype)


def max_pool_3x3_s1(x: jax.Array) -> jax.Array:
  """pytorch-fid's FIDInceptionE_2 (Mixed_7c) pool branch: ``F.max_pool2d(x, 3, stride=1,
  padding=1)`` (padding never wins a max) where torchvision averages."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


# ----------------------------------------------------------------------------- blocks


class _Block(nn.Module):
  """Base of the Inception blocks: a BasicConv2d factory (torchvision's ``BasicConv2d``,
  the same unit as facenet-pytorch's: conv, BN eps 1e-3, ReLU) whose widths are divided
  by the config's ``width_divisor``."""

  config: InceptionConfig

  def basic(self, features, kernel, stride=1, padding=0, *, name):
    cfg = self.config
    return BasicConv2d(
      features // cfg.width_divisor, kernel, stride, padding, BN_EPS, cfg.dtype, name=name
    )


class InceptionA(_Block):
  """torchvision ``InceptionA`` as pytorch-fid's ``FIDInceptionA`` (35 px): 1x1/64;
  1x1/48 -> 5x5/64; 1x1/64 -> 3x3/96 -> 3x3/96; TF average pool -> 1x1/pool_features;
  concat (224 + pool_features)."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.basic(64, 1, name="branch1x1")(x)
    b5 = self.basic(48, 1, name="branch5x5_1")(x)
    b5 = self.basic(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = self.basic(64, 1, name="branch3x3dbl_1")(x)
    b3 = self.basic(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = self.basic(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = self.basic(self.pool_features, 1, name="branch_pool")(avg_pool_3x3_tf(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """torchvision ``InceptionB`` (Mixed_6a, 35 -> 17 px): 3x3/384 stride 2;
  1x1/64 -> 3x3/96 -> 3x3/96 stride 2; 3x3/2 max pool; concat (480 + input)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.basic(384, 3, 2, name="branch3x3")(x)
    bd = self.basic(64, 1, name="branch3x3dbl_1")(x)
    bd = self.basic(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = self.basic(96, 3, 2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  """torchvision ``InceptionC`` as pytorch-fid's ``FIDInceptionC`` (17 px, c7 =
  ``channels_7x7``): 1x1/192; 1x1/c7 -> 1x7/c7 -> 7x1/192; 1x1/c7 -> 7x1/c7 -> 1x7/c7 ->
  7x1/c7 -> 1x7/192; TF average pool -> 1x1/192; concat (768)."""

  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) along W / along H
    b1 = self.basic(192, 1, name="branch1x1")(x)
    b7 = self.basic(c7, 1, name="branch7x7_1")(x)
    b7 = self.basic(c7, row[0], padding=row[1], name="branch7x7_2")(b7)
    b7 = self.basic(192, col[0], padding=col[1], name="branch7x7_3")(b7)
    bd = self.basic(c7, 1, name="branch7x7dbl_1")(x)
    for i, (k, p) in enumerate((col, row, col), start=2):
      bd = self.basic(c7, k, padding=p, name=f"branch7x7dbl_{i}")(bd)
    bd = self.basic(192, row[0], padding=row[1], name="branch7x7dbl_5")(bd)
    bp = self.basic(192, 1, name="branch_pool")(avg_pool_3x3_tf(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """torchvision ``InceptionD`` (Mixed_7a, 17 -> 8 px): 1x1/192 -> 3x3/320 stride 2;
  1x1/192 -> 1x7/192 -> 7x1/192 -> 3x3/192 stride 2; 3x3/2 max pool; concat
  (512 + input)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.basic(192, 1, name="branch3x3_1")(x)
    b3 = self.basic(320, 3, 2, name="branch3x3_2")(b3)
    b7 = self.basic(192, 1, name="branch7x7x3_1")(x)
    b7 = self.basic(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = self.basic(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = self.basic(192, 3, 2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """torchvision ``InceptionE`` as pytorch-fid's ``FIDInceptionE_1`` (``pool="avg"``,
  Mixed_7b: TF average pool) or ``FIDInceptionE_2`` (``pool="max"``, Mixed_7c) (8 px):
  1x1/320; 1x1/384 -> [1x3/384, 3x1/384]; 1x1/448 -> 3x3/384 -> [1x3/384, 3x1/384];
  pool -> 1x1/192; concat (2048)."""

  pool: str = "avg"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.basic(320, 1, name="branch1x1")(x)
    b3 = self.basic(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        self.basic(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        self.basic(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = self.basic(448, 1, name="branch3x3dbl_1")(x)
    bd = self.basic(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        self.basic(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        self.basic(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.pool == "avg":
      pooled = avg_pool_3x3_tf(x)
    elif self.pool == "max":
      pooled = max_pool_3x3_s1(x)
    else:
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
    bp = self.basic(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# ----------------------------------------------------------------------------- network


class FIDInceptionV3(_Block):
  """pytorch-fid's FID Inception in eval mode, NHWC.

  ``__call__(images)``: (B, H, W, 3) RGB in [-1, 1] -> (pool_3 (B, 2048), logits
  (B, 1008)), both float32. pool_3 is the global average of Mixed_7c (pytorch-fid's
  default block 3, the FID features); the logits (``fc``, dropout off) are the TF graph's
  1008-way classifier (Inception Score). Module names are torchvision's (``Conv2d_1a_3x3``,
  ``Mixed_5b/branch1x1/conv``, ``fc``).
  """

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FIDInceptionV3 expects (B, H, W, 3) RGB images, got {images.shape}")
    x = images.astype(jnp.float32)
    if cfg.resize_input:
      x = resize_bilinear(x, cfg.image_size)
    if min(x.shape[1:3]) < MIN_IMAGE_SIZE:
      raise ValueError(f"FIDInceptionV3 needs images of at least 75x75, got {x.shape[1:3]}")
    x = x.astype(jnp.dtype(cfg.dtype))
    x = self.basic(32, 3, 2, name="Conv2d_1a_3x3")(x)
    x = self.basic(32, 3, name="Conv2d_2a_3x3")(x)
    x = self.basic(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = max_pool_3x3_s2(x)
    x = self.basic(80, 1, name="Conv2d_3b_1x1")(x)
    x = self.basic(192, 3, name="Conv2d_4a_3x3")(x)
    x = max_pool_3x3_s2(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(cfg, pool_features=pool_features, name=name)(x)
    x = InceptionB(cfg, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(cfg, channels_7x7=c7, name=name)(x)
    x = InceptionD(cfg, name="Mixed_7a")(x)
    x = InceptionE(cfg, pool="avg", name="Mixed_7b")(x)
    x = InceptionE(cfg, pool="max", name="Mixed_7c")(x)
    pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = layers.Dense(cfg.num_classes, ("mlp", "embed"), dtype=jnp.float32, name="fc")(pool3)
    return pool3, logits


# ----------------------------------------------------------------------------- functional API


def init_params(config: InceptionConfig, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them; ``nn.unbox``
  gives the plain dict). Traceable: use under jax.jit / jax.eval_shape."""
  x = jnp.zeros((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), jnp.float32)
  return FIDInceptionV3(dataclasses.replace(config, resize_input=False)).init(key, x)["params"]


def abstract_params(config: InceptionConfig):
  """The param tree's shapes and dtypes (``jax.eval_shape``, nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def apply_inception(
  config: InceptionConfig, params, images: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(pool_3 features (B, 2048), logits (B, 1008)) of images (B, H, W, 3) in [-1, 1]."""
  return FIDInceptionV3(config).apply({"params": params}, images)
