"""Face-recognition IResNets in Flax Linen, NHWC: ArcFace (insightface) and CurricularFace.

Two published networks share one skeleton (FACTS.md "Face networks"):

* ArcFace IResNet (insightface ``recognition/arcface_torch/backbones/iresnet.py``),
  r50 = (3, 4, 14, 3), r100 = (3, 13, 30, 3) blocks per stage.
* CurricularFace IR-101 (``HuangYG123/CurricularFace`` ``backbone/model_irse.py``,
  ``Backbone(112, 100, 'ir')``), the same block counts as r100.

Both: stem conv3x3(3 -> 64) + BN + PReLU; four stages of 64/128/256/512 channels whose
first block has stride 2 (112 -> 7); head BN2d, flatten, (dropout), Linear(512*7*7, 512),
BN1d. The per-variant differences live in ``block_has_mid_bn``, ``block_has_projection``
and ``head_bn_is_affine``.

Input: (B, 112, 112, 3) RGB in [0, 255]; the model applies the published normalisation
(``normalise_input``). Output: the (B, 512) embedding, NOT L2-normalised.

Inference only: batch norms use their running statistics, which are stored in the
``params`` collection next to the affine parameters (``scale``, ``bias``, ``mean``,
``var``), so a converted checkpoint is one plain tree; dropout is the identity and is
left out. The networks are frozen feature extractors (identity losses): the output is
differentiable with respect to the input image.

Parameter names (converted by facediff.convert.iresnet): ``conv1``, ``bn1``, ``prelu``,
``layer<i>_<j>/{bn1, conv1, bn2, prelu, conv2, bn3, downsample_conv, downsample_bn}``
(stage i = 1..4, block j from 0), ``bn2``, ``fc``, ``features``. ``fc``'s kernel rows
are in NHWC flatten order (h, w, c).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers

Dtype = Any

VARIANTS = ("arcface", "curricularface")
# Output channels of the four stages (both variants).
STAGE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64
BN_EPS = 1e-5

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class IResNetConfig:
  """Shape of an IResNet.

  ``layers``: blocks per stage. ``variant``: "arcface" (insightface IResNet) or
  "curricularface" (face.evoLVe / CurricularFace IR backbone). ``image_size``: the
  square input side (112 for every published checkpoint; must divide by 16).
  ``dtype``: compute dtype ("float32" or "bfloat16"); parameters stay float32 and batch
  norms compute in float32.
  """

  layers: tuple[int, ...] = (3, 4, 14, 3)
  variant: str = "arcface"
  embedding_size: int = 512
  image_size: int = 112
  dtype: str = "float32"

  def __post_init__(self):
    if len(self.layers) != len(STAGE_WIDTHS) or any(int(n) < 1 for n in self.layers):
      raise ValueError(
        f"IResNetConfig.layers must be {len(STAGE_WIDTHS)} positive block counts, got {self.layers}"
      )
    if self.variant not in VARIANTS:
      raise ValueError(f"IResNetConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
    if self.image_size % 16:
      raise ValueError(f"IResNetConfig.image_size must divide by 16, got {self.image_size}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"IResNetConfig.dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
    object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))

  @classmethod
  def arcface_r50(cls) -> "IResNetConfig":
    """insightface ``iresnet50``: (3, 4, 14, 3) blocks."""
    return cls(layers=(3, 4, 14, 3), variant="arcface")

  @classmethod
  def arcface_r100(cls) -> "IResNetConfig":
    """insightface ``iresnet100``: (3, 13, 30, 3) blocks."""
    return cls(layers=(3, 13, 30, 3), variant="arcface")

  @classmethod
  def curricularface_ir101(cls) -> "IResNetConfig":
    """CurricularFace ``IR_101`` (``Backbone(112, 100, 'ir')``): (3, 13, 30, 3) blocks."""
    return cls(layers=(3, 13, 30, 3), variant="curricularface")

  @property
  def feature_size(self) -> int:
    """Side of the last feature map (7 at 112 px): four stride-2 stages."""
    return self.image_size // 16


def normalise_input(images: jax.Array) -> jax.Array:
  """RGB in [0, 255] -> [-1, 1]: (x / 255 - 0.5) / 0.5.

  ArcFace: insightface ``arcface_torch/inference.py`` (``img.div_(255).sub_(0.5)
  .div_(0.5)`` after BGR -> RGB). CurricularFace: its training transform
  ``Normalize(mean=[0.5]*3, std=[0.5]*3)`` on RGB PIL images (FACTS.md: [-1, 1]).
  """
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def block_has_mid_bn(variant: str) -> bool:
  """Residual branch with a BN between conv1 and the PReLU.

  insightface ``IBasicBlock``: BN, conv3x3, BN, PReLU, conv3x3(stride), BN (yes).
  CurricularFace ``bottleneck_IR.res_layer``: BN, conv3x3, PReLU, conv3x3(stride), BN (no).
  """
  return variant == "arcface"


def block_has_projection(variant: str, in_channels: int, out_channels: int, stride: int) -> bool:
  """Shortcut = conv1x1(stride) + BN (True) or the input subsampled by ``stride`` (False).

  insightface ``IResNet._make_layer``: ``downsample`` when stride != 1 or the channels
  change, i.e. on the first block of every stage (stage 1 included: 64 -> 64, stride 2).
  CurricularFace ``bottleneck_IR``: conv1x1 + BN only when the channels change; otherwise
  ``MaxPool2d(1, stride)``, which keeps every stride-th pixel (stage 1's first block).
  """
  if variant == "arcface":
    return stride != 1 or in_channels != out_channels
  return in_channels != out_channels


def head_bn_is_affine(variant: str) -> bool:
  """The final BatchNorm1d (``features`` / ``output_layer.4``) has weight and bias.

  insightface: ``nn.BatchNorm1d(num_features)`` (affine; weight fixed at 1 in training).
  CurricularFace: ``BatchNorm1d(512, affine=False)``.
  """
  return variant == "arcface"


def _vector_init(value: float):
  """Constant init of a per-channel vector, logical axis ``norm`` (replicated)."""
  return nn.with_logical_partitioning(nn.initializers.constant(value), ("norm",))


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm (torch ``BatchNorm{1,2}d.eval()``) over the last axis.

  y = (x - mean) / sqrt(var + eps) * scale + bias, computed in float32 as
  x * a + (bias - mean * a) with a = scale / sqrt(var + eps). Params ``mean`` and ``var``
  (the running statistics) and, when ``affine``, ``scale`` and ``bias``; all (C,) with
  logical axis ``norm``.
  """

  epsilon: float = BN_EPS
  affine: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    mean = self.param("mean", _vector_init(0.0), (c,), jnp.float32)
    var = self.param("var", _vector_init(1.0), (c,), jnp.float32)
    a = jax.lax.rsqrt(var + self.epsilon)
    b = -mean * a
    if self.affine:
      scale = self.param("scale", _vector_init(1.0), (c,), jnp.float32)
      bias = self.param("bias", _vector_init(0.0), (c,), jnp.float32)
      a = a * scale
      b = b * scale + bias
    return (x.astype(jnp.float32) * a + b).astype(self.dtype)


class PReLU(nn.Module):
  """torch ``nn.PReLU(C)``: max(0, x) + slope_c * min(0, x), one slope per channel
  (param ``negative_slope`` (C,), logical axis ``norm``, initialised to torch's 0.25)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param("negative_slope", _vector_init(0.25), (x.shape[-1],), jnp.float32)
    return jnp.where(x >= 0, x, x * slope.astype(self.dtype))


class IRBlock(nn.Module):
  """One improved-residual block (insightface ``IBasicBlock`` / CurricularFace
  ``bottleneck_IR``).

  branch = bn1 -> conv1 3x3 -> [bn2] -> prelu -> conv2 3x3 (stride) -> bn3;
  shortcut = downsample_conv 1x1 (stride) -> downsample_bn, or x[:, ::s, ::s];
  out = branch + shortcut (no activation after the sum).
  """

  features: int
  stride: int
  variant: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=False, dtype=self.dtype)
    s = self.stride
    y = FrozenBatchNorm(dtype=self.dtype, name="bn1")(x)
    y = layers.Conv(self.features, 3, padding=1, name="conv1", **kw)(y)
    if block_has_mid_bn(self.variant):
      y = FrozenBatchNorm(dtype=self.dtype, name="bn2")(y)
    y = PReLU(dtype=self.dtype, name="prelu")(y)
    y = layers.Conv(self.features, 3, strides=s, padding=1, name="conv2", **kw)(y)
    y = FrozenBatchNorm(dtype=self.dtype, name="bn3")(y)
    if block_has_projection(self.variant, x.shape[-1], self.features, s):
      shortcut = layers.Conv(self.features, 1, strides=s, padding=0, name="downsample_conv", **kw)(
        x
      )
      shortcut = FrozenBatchNorm(dtype=self.dtype, name="downsample_bn")(shortcut)
    else:
      shortcut = x[:, ::s, ::s, :]
    return y + shortcut.astype(y.dtype)


class IResNet(nn.Module):
  """ArcFace / CurricularFace IResNet: (B, S, S, 3) RGB in [0, 255] -> (B, 512) float32.

  stem (conv1, bn1, prelu) -> stages ``layer<i>_<j>`` -> bn2 -> flatten (NHWC order)
  -> fc -> features (BN1d). Dropout (identity at inference) is omitted.
  """

  config: IResNetConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = _DTYPES[cfg.dtype]
    want = (cfg.image_size, cfg.image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(
        f"IResNet expects images of shape (B, {', '.join(map(str, want))}), "
        f"got {tuple(images.shape)}"
      )
    x = normalise_input(images).astype(dtype)
    x = layers.Conv(STEM_WIDTH, 3, padding=1, use_bias=False, dtype=dtype, name="conv1")(x)
    x = FrozenBatchNorm(dtype=dtype, name="bn1")(x)
    x = PReLU(dtype=dtype, name="prelu")(x)
    for i, (blocks, width) in enumerate(zip(cfg.layers, STAGE_WIDTHS, strict=True)):
      for j in range(blocks):
        stride = 2 if j == 0 else 1
        x = IRBlock(width, stride, cfg.variant, dtype=dtype, name=f"layer{i + 1}_{j}")(x)
    x = FrozenBatchNorm(dtype=dtype, name="bn2")(x)
    x = x.reshape(x.shape[0], -1)
    x = layers.Dense(cfg.embedding_size, ("mlp", "embed"), dtype=dtype, name="fc")(x)
    x = FrozenBatchNorm(affine=head_bn_is_affine(cfg.variant), dtype=dtype, name="features")(x)
    return x.astype(jnp.float32)


# ----------------------------------------------------------------------------- functional API


def init_params(config: IResNetConfig, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them; ``nn.unbox``
  gives the plain dict). Traceable: use under jax.jit / jax.eval_shape."""
  x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return IResNet(config).init(key, x)["params"]


def abstract_params(config: IResNetConfig):
  """The param tree's shapes and dtypes (``jax.eval_shape``, nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
