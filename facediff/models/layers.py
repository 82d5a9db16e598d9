"""Shared Flax Linen building blocks for the latent-diffusion models (UNet, VAE, CLIP).

Layout: images are NHWC everywhere inside facediff; sequences are (B, L, C).

Numerics follow diffusers (UNet / VAE building blocks) so that weights converted
from diffusers' PyTorch state dicts give the same outputs (see facediff/convert/).
Parameter names follow diffusers' module names where a converter needs them
(``to_q``, ``to_out_0``, ``norm1``, ``conv_shortcut``, ...; list items are named
``<list>_<index>``, e.g. ``resnets_0``).

Dtypes: every module takes ``dtype`` (the compute dtype, float32 or bfloat16) and
``param_dtype`` (always float32 by default). Normalisation statistics are computed
in float32 whatever the compute dtype.

Logical axis names (the vocabulary ``facediff.partitioning.LOGICAL_RULES`` maps to
mesh axes). Every parameter carries one name per dimension:

==============  =====================================================================
``conv_h``      convolution kernel height
``conv_w``      convolution kernel width
``conv_in``     convolution input channels
``conv_out``    convolution output channels (also conv bias)
``embed``       model width of a dense layer's input or output (token / channel dim)
``mlp``         hidden width of a feed-forward / time-embedding MLP
``heads``       fused attention projection width (num_heads * head_dim)
``cross_embed`` width of the cross-attention context (e.g. CLIP's 768)
``norm``        GroupNorm / LayerNorm scale and bias
``vocab``       token-embedding rows (for text encoders)
==============  =====================================================================

Activations are annotated with ``activation_batch``, ``activation_length``,
``activation_height``, ``activation_width`` and ``activation_embed`` where a
sharding constraint helps (only inside ``jax.jit`` with a mesh and rules set).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def _init(fn: Callable, axes: Sequence[str | None]) -> Callable:
  return nn.with_logical_partitioning(fn, tuple(axes))


# torch's default init for Conv2d/Linear weights is kaiming_uniform(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); this matches it (biases here start at zero), so
# freshly initialised facediff models have diffusers-like activation scales.
def torch_default_kernel_init() -> Callable:
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def Conv(
  features: int,
  kernel_size: int = 3,
  strides: int = 1,
  padding: int | str | tuple[tuple[int, int], tuple[int, int]] = 1,
  *,
  use_bias: bool = True,
  feature_group_count: int = 1,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  kernel_init: Callable | None = None,
  bias_init: Callable | None = None,
  name: str | None = None,
) -> nn.Conv:
  """2-D convolution, NHWC; params ``kernel`` (kh, kw, in, out) with logical axes
  CONV_AXES and ``bias`` ('conv_out',).

  ``padding`` is the symmetric padding per side (torch ``padding=``), an explicit
  ((top, bottom), (left, right)) pair, or ``"SAME"`` / ``"VALID"`` (lax's SAME is
  TensorFlow's: the odd extra pixel goes to the bottom / right).
  ``feature_group_count`` = input channels makes a depthwise convolution (kernel
  (kh, kw, 1, out)).
  """
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding=padding,
    use_bias=use_bias,
    feature_group_count=feature_group_count,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_init(kernel_init or torch_default_kernel_init(), CONV_AXES),
    bias_init=_init(bias_init or nn.initializers.zeros_init(), ("conv_out",)),
    name=name,
  )


def Dense(
  features: int,
  axes: tuple[str | None, str | None] = ("embed", "mlp"),
  *,
  use_bias: bool = True,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  kernel_init: Callable | None = None,
  bias_init: Callable | None = None,
  name: str | None = None,
) -> nn.Dense:
  """Linear layer; ``kernel`` (in, out) carries logical ``axes`` = (in_axis, out_axis),
  ``bias`` carries (out_axis,)."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_init(kernel_init or torch_default_kernel_init(), axes),
    bias_init=_init(bias_init or nn.initializers.zeros_init(), (axes[1],)),
    name=name,
  )


def GroupNorm(
  num_groups: int = 32,
  epsilon: float = 1e-5,
  *,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> nn.GroupNorm:
  """GroupNorm over the last (channel) axis, statistics in float32, two-pass variance
  (torch.nn.GroupNorm). Params ``scale``/``bias`` with logical axis ('norm',)."""
  return nn.GroupNorm(
    num_groups=num_groups,
    epsilon=epsilon,
    dtype=dtype,
    param_dtype=param_dtype,
    use_fast_variance=False,
    scale_init=_init(nn.initializers.ones_init(), ("norm",)),
    bias_init=_init(nn.initializers.zeros_init(), ("norm",)),
    name=name,
  )


def LayerNorm(
  epsilon: float = 1e-5,
  *,
  use_bias: bool = True,
  use_scale: bool = True,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> nn.LayerNorm:
  """LayerNorm over the last axis, statistics in float32, two-pass variance
  (torch.nn.LayerNorm). Params ``scale``/``bias`` with logical axis ('norm',)."""
  return nn.LayerNorm(
    epsilon=epsilon,
    use_bias=use_bias,
    use_scale=use_scale,
    dtype=dtype,
    param_dtype=param_dtype,
    use_fast_variance=False,
    scale_init=_init(nn.initializers.ones_init(), ("norm",)),
    bias_init=_init(nn.initializers.zeros_init(), ("norm",)),
    name=name,
  )


def timestep_embedding(
  timesteps: jax.Array,
  dim: int,
  flip_sin_to_cos: bool = False,
  downscale_freq_shift: float = 1.0,
  scale: float = 1.0,
  max_period: float = 10000.0,
) -> jax.Array:
  """Sinusoidal timestep embedding (DDPM / diffusers ``get_timestep_embedding``).

  freq_i = exp(-ln(max_period) * i / (dim/2 - downscale_freq_shift)), i < dim/2;
  emb = [sin(scale * t * freq), cos(scale * t * freq)], or [cos, sin] when
  ``flip_sin_to_cos``; zero-padded by one column when ``dim`` is odd. Float32.
  """
  timesteps = jnp.asarray(timesteps)
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be 1-D (batch,), got shape {timesteps.shape}")
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  args = scale * timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers ``TimestepEmbedding``: linear_1 -> SiLU -> linear_2."""

  time_embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_emb: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.time_embed_dim, ("embed", "mlp"), name="linear_1", **kw)(t_emb)
    h = nn.silu(h)
    return Dense(self.time_embed_dim, ("mlp", "embed"), name="linear_2", **kw)(h)


class ResnetBlock2D(nn.Module):
  """diffusers ``ResnetBlock2D`` (time_embedding_norm="default", output_scale_factor).

  h = conv1(silu(norm1(x))); h += time_emb_proj(silu(temb)) if temb is given;
  h = conv2(dropout(silu(norm2(h)))); out = (shortcut(x) + h) / output_scale_factor.
  The shortcut is a 1x1 ``conv_shortcut`` when channels change (or ``use_conv_shortcut``
  is True: then a 3x3 conv, as diffusers' ``conv_shortcut=True``), else identity.
  ``use_time_emb=False`` (the VAE) omits ``time_emb_proj`` entirely.
  """

  out_channels: int
  use_time_emb: bool = True
  groups: int = 32
  groups_out: int | None = None
  eps: float = 1e-5
  dropout: float = 0.0
  use_conv_shortcut: bool = False
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_channels = x.shape[-1]
    h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)
    h = nn.silu(h)
    h = Conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
    if self.use_time_emb:
      if temb is None:
        raise ValueError("ResnetBlock2D(use_time_emb=True) needs a time embedding")
      t = Dense(self.out_channels, ("mlp", "embed"), name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = GroupNorm(self.groups_out or self.groups, self.eps, name="norm2", **kw)(h)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = Conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
    if self.use_conv_shortcut:
      x = Conv(self.out_channels, 3, padding=1, name="conv_shortcut", **kw)(x)
    elif in_channels != self.out_channels:
      x = Conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
    out = x.astype(h.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nn.Module):
  """diffusers ``Downsample2D`` with a conv: 3x3 stride-2 conv named ``conv``.

  ``padding=1`` (UNet) pads one pixel per side; ``padding=0`` (VAE encoder) pads
  (0, 1) on the bottom/right first, as diffusers does.
  """

  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding not in (0, 1):
      raise ValueError(f"Downsample2D padding must be 0 or 1, got {self.padding}")
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return Conv(
      self.out_channels,
      3,
      strides=2,
      padding=pad,
      name="conv",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """Nearest-neighbour upsampling (torch ``F.interpolate(mode="nearest")``), NHWC.

  With ``size=None`` doubles H and W; otherwise source index = floor(dst * in / out).
  """
  _, h, w, _ = x.shape
  if size is None or tuple(size) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  oh, ow = size
  iy = jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32)
  ix = jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32)
  return x[:, iy][:, :, ix]


class Upsample2D(nn.Module):
  """diffusers ``Upsample2D`` (interpolate + conv): nearest x2 (or to ``size``), 3x3 ``conv``."""

  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    x = upsample_nearest(x, size)
    return Conv(
      self.out_channels,
      3,
      padding=1,
      name="conv",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)


# Score blocks of at most this many elements (8 MiB in float32) and at most this many
# query rows per block.
_BLOCK_ELEMS = 1 << 21
_BLOCK_MAX_QUERIES = 512


def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v, one head and ``cq`` queries at a time (q, k, v: (B, L, H, D)).

  Same result as the plain form; for CPUs, where writing the whole (H, Lq, Lk) score
  tensor to memory and reading it back several times (max, exp, sum, matmul) costs far
  more than the arithmetic. Logits and exp in float32; the softmax denominator comes out
  of the same matmul as the output (a column of ones appended to v).
  """
  b, lq, h, d = q.shape
  lk = k.shape[1]
  cq = max(8, min(lq, _BLOCK_MAX_QUERIES, _BLOCK_ELEMS // max(lk, 1)))
  nq = -(-lq // cq)
  pad = nq * cq - lq
  qh = jnp.transpose(q, (0, 2, 1, 3)).reshape(b * h, lq, d)
  if pad:
    qh = jnp.pad(qh, ((0, 0), (0, pad), (0, 0)))
  qh = qh.reshape(b * h, nq, cq, d)
  kh = jnp.transpose(k, (0, 2, 1, 3)).reshape(b * h, lk, d)
  vh = jnp.transpose(v, (0, 2, 1, 3)).reshape(b * h, lk, d)
  vh = jnp.concatenate([vh, jnp.ones_like(vh[..., :1])], axis=-1)  # (.., lk, d + 1)

  qh = qh * jnp.asarray(scale, qh.dtype)  # scale the (cq, d) queries, not the (cq, lk) logits
  f32 = jnp.float32

  def one_head(args):
    qq, kk, vv = args

    def block(qb):
      s = jnp.einsum("qd,kd->qk", qb, kk, preferred_element_type=f32)
      e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
      o = jnp.einsum("qk,kd->qd", e.astype(vv.dtype), vv, preferred_element_type=f32)
      return (o[:, :d] / o[:, d:]).astype(q.dtype)

    return jax.lax.map(block, qq)

  out = jax.lax.map(one_head, (qh, kh, vh)).reshape(b, h, nq * cq, d)[:, :, :lq]
  return jnp.transpose(out, (0, 2, 1, 3))


def multi_head_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  heads: int,
  *,
  mask: jax.Array | None = None,
  causal: bool = False,
  implementation: str | None = None,
) -> jax.Array:
  """softmax(Q K^T / sqrt(d)) V per head, on fused (B, L, heads*d) projections.

  Splits heads, attends, merges heads back. ``mask``: boolean, broadcastable to
  (B, heads, Lq, Lk), True = attend. ``implementation``: "xla" =
  ``jax.nn.dot_product_attention`` (XLA's implementation); "cudnn" = the same call
  with cuDNN's fused kernel (GPUs, bf16/fp16); "blocked" = query blocks per head (see
  ``_blocked_attention``; no mask / causal); None = "blocked" on CPU for large
  unmasked attention (score tensor over 2 Mi elements, e.g. SD's 4096- and 1024-token
  self-attentions), else "xla". All give the same result up to float rounding.
  """
  b, lq, inner = q.shape
  lk = k.shape[1]
  d = inner // heads
  if d * heads != inner:
    raise ValueError(f"attention width {inner} is not divisible by heads={heads}")
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  q4 = q.reshape(b, lq, heads, d)
  k4 = k.reshape(b, lk, heads, d)
  v4 = v.reshape(b, lk, heads, d)
  if implementation is None:
    big = b * heads * lq * lk > _BLOCK_ELEMS
    implementation = (
      "blocked"
      if (big and mask is None and not causal and jax.default_backend() == "cpu")
      else "xla"
    )
  if implementation == "blocked":
    if mask is not None or causal:
      raise ValueError("blocked attention supports neither mask nor causal")
    out = _blocked_attention(q4, k4, v4, 1.0 / math.sqrt(d))
  elif implementation in ("xla", "cudnn"):
    # "cudnn": the fused cuDNN flash-attention kernel (GPU only, fp16/bf16 inputs).
    out = jax.nn.dot_product_attention(
      q4,
      k4,
      v4,
      mask=mask,
      is_causal=causal,
      scale=1.0 / math.sqrt(d),
      implementation=implementation,
    )
  else:
    raise ValueError(f"unknown attention implementation {implementation!r}")
  return out.reshape(b, lq, inner)


class Attention(nn.Module):
  """Multi-head attention (self or cross), diffusers ``Attention`` / CLIP-style.

  Projections ``to_q``, ``to_k``, ``to_v`` (bias optional: off in the UNet, on in the
  VAE and CLIP) and ``to_out_0`` (bias on by default). Query width = x's last dim;
  key/value come from ``context`` (cross-attention) or from x. Scale 1/sqrt(head_dim).
  ``mask``: boolean, broadcastable to (B, heads, Lq, Lk), True = attend.
  ``causal``: causal self-attention (CLIP's text encoder).
  ``out_features`` defaults to the query width. The key/value kernels' input axis is
  ``cross_embed`` for cross-attention and ``embed`` for self-attention.
  ``implementation``: see ``multi_head_attention`` (None = automatic).
  """

  heads: int
  head_dim: int
  out_features: int | None = None
  qkv_bias: bool = False
  out_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    context: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
  ) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.head_dim
    ctx_axis = "embed" if context is None else "cross_embed"
    ctx = x if context is None else context
    q = Dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name="to_q", **kw)(x)
    k = Dense(inner, (ctx_axis, "heads"), use_bias=self.qkv_bias, name="to_k", **kw)(ctx)
    v = Dense(inner, (ctx_axis, "heads"), use_bias=self.qkv_bias, name="to_v", **kw)(ctx)
    out = multi_head_attention(
      q, k, v, self.heads, mask=mask, causal=causal, implementation=self.implementation
    )
    return Dense(
      self.out_features or x.shape[-1],
      ("heads", "embed"),
      use_bias=self.out_bias,
      name="to_out_0",
      **kw,
    )(out)


class SpatialSelfAttention(nn.Module):
  """VAE-style attention over an NHWC feature map (diffusers ``Attention`` with
  ``norm_num_groups`` and ``residual_connection=True``, as in the VAE mid-block):
  ``group_norm`` -> self-attention over the H*W tokens (``to_q/to_k/to_v`` with bias)
  -> ``to_out_0`` -> + x -> / rescale_output_factor. ``heads`` = C // head_dim.
  """

  heads: int = 1
  groups: int = 32
  eps: float = 1e-6
  rescale_output_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    y = GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x).reshape(b, h * w, c)
    q = Dense(c, ("embed", "heads"), name="to_q", **kw)(y)
    k = Dense(c, ("embed", "heads"), name="to_k", **kw)(y)
    v = Dense(c, ("embed", "heads"), name="to_v", **kw)(y)
    y = multi_head_attention(q, k, v, self.heads)
    y = Dense(c, ("heads", "embed"), name="to_out_0", **kw)(y).reshape(b, h, w, c)
    out = y + x.astype(y.dtype)
    if self.rescale_output_factor != 1.0:
      out = out / self.rescale_output_factor
    return out


class GEGLU(nn.Module):
  """diffusers ``GEGLU``: ``proj`` to 2*hidden, split (value, gate), value * gelu(gate).

  gelu is the exact (erf) one, as torch's F.gelu default.
  """

  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Dense(
      2 * self.hidden, ("embed", "mlp"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype
    )(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers ``FeedForward`` with GEGLU: ``net_0`` (GEGLU) -> dropout -> ``net_2`` (Linear)."""

  dim: int
  mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(self.dim * self.mult, name="net_0", **kw)(x)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return Dense(self.dim, ("mlp", "embed"), name="net_2", **kw)(h)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """(F - mu(F)) / sigma(F) per example and channel over H and W (NHWC), float32 statistics,
  sigma = sqrt(var + eps) with the biased (two-pass) variance, as torch's InstanceNorm2d."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=(1, 2), keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class AdaIN(nn.Module):
  """TGDM Eq. 17, adaptive instance normalisation of a feature map by a condition vector:

      AdaIN(F_d, C) = sigma_c(C) * (F_d - mu(F_d)) / sigma(F_d) + mu_c(C),

  with mu(.) / sigma(.) the per-example, per-channel mean and standard deviation over H and
  W (``instance_norm``; the paper calls sigma "the variance operation": we use the standard
  AdaIN's sqrt(var + eps)), and sigma_c(C) = ``scale``(C), mu_c(C) = ``shift``(C) two linear
  maps of the condition C = Linear(rho_hat) + Linear(t) (TGDM 4.3; the model computes C
  once and every AdaIN maps it to its own channels). ``scale``'s bias starts at 1 and
  ``shift``'s at 0, so a fresh layer is close to plain instance normalisation.

  x: (B, H, W, C_x) NHWC; cond: (B, D). Params ``scale`` and ``shift``: Dense kernels
  (D, C_x) with logical axes ('mlp', 'embed').
  """

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    sigma_c = Dense(c, ("mlp", "embed"), bias_init=nn.initializers.ones_init(), name="scale", **kw)(
      cond
    )
    mu_c = Dense(c, ("mlp", "embed"), name="shift", **kw)(cond)
    h = instance_norm(x, self.eps).astype(self.dtype)
    return sigma_c[:, None, None, :] * h + mu_c[:, None, None, :]


class TexAtt(nn.Module):
  """TGDM Eq. 15-16, the Texture Attention module (TGDM 4.3, Fig. 2):

      Q_d = q(F_d),  K_s = k(F_s),  V_s = v(F_s)     (1x1 convs to C/``reduction`` channels)
      F_{s->d} = softmax(Q_d K_s^T) V_s = M V_s        (Eq. 15; M: (H_d W_d) x (H_s W_s))
      F_hat_d = tau * out(F_{s->d}) + F_d              (Eq. 16)

  The query comes from the noisy branch's features F_d (B, H, W, C), key and value from
  the source texture features F_s (B, H_s, W_s, C_s) of the texture encoder; Eq. 15 has
  no 1/sqrt(d) temperature and neither has this. ``out`` is a 1x1 conv projecting the
  C/4 channels of F_{s->d} back to C (Eq. 16 adds it to F_d, which has C channels).
  ``tau`` is a learned scalar initialised to 0, so a fresh TexAtt is the identity.

  Params: ``query``, ``key``, ``value``, ``out`` (layers.Conv, 1x1) and ``tau`` (shape ()).
  """

  reduction: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_d: jax.Array, f_s: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = f_d.shape
    inner = c // self.reduction
    if inner * self.reduction != c or inner == 0:
      raise ValueError(f"TexAtt: {c} channels not divisible by reduction {self.reduction}")
    q = Conv(inner, 1, padding=0, name="query", **kw)(f_d).reshape(b, h * w, inner)
    f_s = f_s.astype(self.dtype)
    k = Conv(inner, 1, padding=0, name="key", **kw)(f_s).reshape(b, -1, inner)
    v = Conv(inner, 1, padding=0, name="value", **kw)(f_s).reshape(b, -1, inner)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    m = jax.nn.softmax(logits, axis=-1)
    f_sd = jnp.einsum("bqk,bkc->bqc", m.astype(v.dtype), v).reshape(b, h, w, inner)
    f_sd = Conv(c, 1, padding=0, name="out", **kw)(f_sd)
    tau = self.param("tau", _init(nn.initializers.zeros_init(), ()), (), self.param_dtype)
    return tau.astype(f_sd.dtype) * f_sd + f_d.astype(f_sd.dtype)
