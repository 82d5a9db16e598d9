"""dlib's 128-D face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) in Flax.

The network of dlib's ``examples/dnn_face_recognition_ex.cpp`` (``anet_type``), run on
dlib's 150x150 face chip (``dlib.get_face_chip(img, shape, size=150, padding=0.25)``):

  input (RGB - mean) / 256
  stem: conv 7x7/32 stride 2 (VALID, 150 -> 72), affine, relu, max-pool 3x3 stride 2 (-> 35)
  stage 0: 3 blocks of 32 channels (35x35)
  stage 1: a down block then 3 blocks of 64 (17x17)
  stage 2: a down block then 2 blocks of 128 (8x8 -> 4x4, see ``add_zero_padded``)
  stage 3: a down block then 2 blocks of 256 (2x2)
  stage 4: one down block of 256 (2x2)
  global mean over H, W; fc 256 -> 128 without bias. Not L2-normalised.

A block is conv3x3, affine, relu, conv3x3, affine, + skip, relu. A down block's first
conv has stride 2 and no padding, and its skip is a 2x2 average pool of the block input
with no projection (``add_zero_padded`` fills the missing channels with zeros). The
affine layers are dlib's batch norms folded into a per-channel scale and bias.

The weights are frozen (load them with ``facediff.convert.dlib_dat.load_dlib_resnet``);
the module is differentiable with respect to the input chip, for identity losses.
Matmuls and convolutions run at ``config.precision`` ("highest" by default: full float32
on GPUs/TPUs, so that descriptors match dlib's to ~1e-6).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers


@dataclasses.dataclass(frozen=True)
class DlibResNetConfig:
  """Shapes of dlib's face-recognition ResNet. ``mean_rgb`` and ``image_size`` are stored
  in the ``.dat`` file (``input_rgb_image_sized``); the converter fills them in from it."""

  image_size: int = 150
  mean_rgb: tuple[float, float, float] = (122.782, 117.001, 104.298)
  stem_features: int = 32
  stem_kernel: int = 7
  # stage s has stage_blocks[s] blocks of stage_features[s] channels; every stage but the
  # first starts with a down block.
  stage_features: tuple[int, ...] = (32, 64, 128, 256, 256)
  stage_blocks: tuple[int, ...] = (3, 4, 3, 3, 1)
  embed_dim: int = 128
  # Compute dtype; parameters are float32.
  dtype: str = "float32"
  # Matmul / convolution precision (jax.default_matmul_precision); None = JAX's default.
  precision: str | None = "highest"

  def validate(self, source: str = "config") -> None:
    if len(self.stage_features) != len(self.stage_blocks):
      raise ValueError(
        f"{source}: stage_features {self.stage_features} and stage_blocks "
        f"{self.stage_blocks} differ in length"
      )
    if any(b < 1 for b in self.stage_blocks):
      raise ValueError(f"{source}: every stage needs a block, got {self.stage_blocks}")


def normalize_input(images: jax.Array, mean_rgb: tuple[float, float, float]) -> jax.Array:
  """dlib ``input_rgb_image_sized::to_tensor`` (dlib/dnn/input.h): (pixel - mean) / 256.

  The divisor is 256, not 255. ``images``: RGB in [0, 255], float32.
  """
  return (images.astype(jnp.float32) - jnp.asarray(mean_rgb, jnp.float32)) / 256.0


def conv_padding(kernel: int, stride: int) -> int:
  """dlib ``con_``'s default padding (dlib/dnn/layers.h): 0 when the stride is not 1
  (a VALID strided conv), else kernel // 2 ("same" for odd kernels)."""
  return 0 if stride != 1 else kernel // 2


def add_zero_padded(a: jax.Array, b: jax.Array) -> jax.Array:
  """dlib ``add_prev_`` (dlib/dnn/layers.h) through ``tt::add(dest, src1, src2)``
  (dlib/cuda/cpu_dlib.cpp): the sum has the larger of each input's sizes; each input is
  zero-filled at the end of every axis it lacks (bottom rows, right columns, last
  channels). So a down block's pooled skip gains zero channels, and where the strided
  conv gives 3x3 but the pool 4x4 (or 1x1 vs 2x2) the conv branch is zero-padded at the
  bottom/right instead of the pool being cropped."""
  shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape, strict=True))

  def pad(x):
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape, strict=True)])

  return pad(a) + pad(b)


class Affine(nn.Module):
  """dlib ``affine_`` in CONV_MODE (dlib/dnn/layers.h): y = scale[c] * x + bias[c], a batch
  norm with its statistics folded in. Params ``scale`` and ``bias`` (logical 'norm')."""

  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (c,)
    )
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (c,)
    )
    return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, dtype: str, name: str) -> nn.Conv:
  return layers.Conv(
    features,
    kernel,
    strides=stride,
    padding=conv_padding(kernel, stride),
    dtype=dtype,
    name=name,
  )


class ResidualBlock(nn.Module):
  """dlib's ``ares`` / ``ares_down`` (examples/dnn_face_recognition_ex.cpp):
  relu(conv3x3 -> affine -> relu -> conv3x3 -> affine, + skip). With ``down`` the first
  conv has stride 2 (VALID) and the skip is ``avg_pool<2,2,2,2>`` of the input (VALID, no
  projection); otherwise the skip is the input. Sums via ``add_zero_padded``."""

  features: int
  down: bool = False
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    stride = 2 if self.down else 1
    h = _conv(self.features, 3, stride, self.dtype, "conv1")(x)
    h = nn.relu(Affine(self.dtype, name="affine1")(h))
    h = _conv(self.features, 3, 1, self.dtype, "conv2")(h)
    h = Affine(self.dtype, name="affine2")(h)
    skip = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID") if self.down else x
    return nn.relu(add_zero_padded(h, skip.astype(h.dtype)))


class DlibResNet(nn.Module):
  """dlib ``anet_type`` (examples/dnn_face_recognition_ex.cpp): (B, S, S, 3) RGB chips
  in [0, 255] (S = ``config.image_size``, 150) -> (B, 128) float32 descriptors, as
  ``dlib.face_recognition_model_v1.compute_face_descriptor`` (num_jitters=0) gives them:
  not L2-normalised; dlib calls two faces the same person below distance 0.6."""

  config: DlibResNetConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    size = cfg.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"DlibResNet expects (B, {size}, {size}, 3) RGB chips, got {images.shape}")
    # Set here rather than per layer: every conv and the fc follow it while tracing.
    with jax.default_matmul_precision(cfg.precision):
      x = normalize_input(images, cfg.mean_rgb).astype(cfg.dtype)
      x = _conv(cfg.stem_features, cfg.stem_kernel, 2, cfg.dtype, "stem_conv")(x)
      x = nn.relu(Affine(cfg.dtype, name="stem_affine")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
      for s, (features, blocks) in enumerate(
        zip(cfg.stage_features, cfg.stage_blocks, strict=True)
      ):
        for b in range(blocks):
          x = ResidualBlock(
            features, down=(s > 0 and b == 0), dtype=cfg.dtype, name=f"stage{s}_block{b}"
          )(x)
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      x = layers.Dense(cfg.embed_dim, ("embed", "mlp"), use_bias=False, name="fc")(x)
    return x.astype(jnp.float32)


def init_params(config: DlibResNetConfig, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape (see facediff.partitioning.init_sharded)."""
  config.validate()
  x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return DlibResNet(config).init(key, x)["params"]


def abstract_params(config: DlibResNetConfig):
  """The param tree's shapes and dtypes (``jax.eval_shape``, nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
