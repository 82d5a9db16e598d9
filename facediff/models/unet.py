"""Stable Diffusion 1.x conditional UNet (diffusers ``UNet2DConditionModel``) in Flax Linen.

Layout: the module works in NHWC: ``sample`` (B, H, W, C_in) -> eps (B, H, W, C_out).
``apply_unet(..., layout="NCHW")`` converts at the boundary for callers holding
PyTorch-layout (B, C, H, W) latents.

Structure and parameter names mirror diffusers (``conv_in``, ``time_embedding``,
``down_blocks_<i>/{resnets,attentions,downsamplers}_<j>``, ``mid_block``,
``up_blocks_<i>/...``, ``conv_norm_out``, ``conv_out``) so facediff.convert.unet maps
diffusers state dicts one to one.

Supported subset of diffusers' config: positional time embedding, CrossAttnDownBlock2D /
DownBlock2D / UNetMidBlock2DCrossAttn / UpBlock2D / CrossAttnUpBlock2D, GroupNorm +
SiLU ResNets, Transformer2DModel with self + cross attention and GEGLU feed-forward,
conv or linear projections. That covers SD 1.x and 2.x UNets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _per_block(value, n: int, field: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"UNetConfig.{field} has {len(value)} entries, expected {n} (one per block)")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters, named as in diffusers' ``UNet2DConditionModel`` config.json.

  ``attention_head_dim`` keeps diffusers' legacy meaning for SD 1.x: it is the NUMBER OF
  HEADS per block (8 for SD-1.x), unless ``num_attention_heads`` is given; each block's
  head width is then channels // heads. ``dtype`` is the compute dtype ("float32" or
  "bfloat16"); parameters are always ``param_dtype`` (float32).
  ``remat``: rematerialise each ResNet / transformer block in the backward pass.
  ``attention_impl``: None (automatic: blocked attention for large CPU attention, else
  ``jax.nn.dot_product_attention``), "xla", "cudnn" (GPU) or "blocked"
  (layers.multi_head_attention).
  """

  in_channels: int = 4
  out_channels: int = 4
  sample_size: int = 64
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  cross_attention_dim: int = 768
  down_block_types: tuple[str, ...] = (
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
  )
  up_block_types: tuple[str, ...] = (
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
  )
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  transformer_layers_per_block: int | tuple[int, ...] = 1
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str | None = None

  def __post_init__(self):
    n = len(self.block_out_channels)
    for f in ("block_out_channels", "down_block_types", "up_block_types"):
      v = getattr(self, f)
      if isinstance(v, list):
        object.__setattr__(self, f, tuple(v))
    for f in (
      "layers_per_block",
      "attention_head_dim",
      "num_attention_heads",
      "transformer_layers_per_block",
    ):
      v = getattr(self, f)
      if isinstance(v, list):
        object.__setattr__(self, f, tuple(v))
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(
        f"UNetConfig: down_block_types ({len(self.down_block_types)}) and up_block_types "
        f"({len(self.up_block_types)}) must both have one entry per block_out_channels ({n})"
      )
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(f"UNetConfig.down_block_types: unsupported {t!r} (use {DOWN_BLOCK_TYPES})")
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise ValueError(f"UNetConfig.up_block_types: unsupported {t!r} (use {UP_BLOCK_TYPES})")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"UNetConfig: block_out_channels {c} not divisible by norm_num_groups "
          f"{self.norm_num_groups}"
        )
    if self.attention_impl not in (None, "xla", "cudnn", "blocked"):
      raise ValueError(
        "UNetConfig.attention_impl must be None, 'xla', 'cudnn' or 'blocked', got "
        f"{self.attention_impl!r}"
      )
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in _DTYPES:
        raise ValueError(
          f"UNetConfig.{f} must be one of {sorted(_DTYPES)}, got {getattr(self, f)!r}"
        )
    heads = self.heads_per_block()
    for c, h in zip(self.block_out_channels, heads, strict=True):
      if c % h:
        raise ValueError(f"UNetConfig: {c} channels not divisible by {h} attention heads")
    self.layers_per_block_list()
    self.transformer_layers_list()

  # Per-block views (diffusers accepts an int or one value per block).
  def heads_per_block(self) -> tuple[int, ...]:
    n = len(self.block_out_channels)
    heads = (
      self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
    )
    field = "num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim"
    return _per_block(heads, n, field)

  def layers_per_block_list(self) -> tuple[int, ...]:
    return _per_block(self.layers_per_block, len(self.block_out_channels), "layers_per_block")

  def transformer_layers_list(self) -> tuple[int, ...]:
    return _per_block(
      self.transformer_layers_per_block,
      len(self.block_out_channels),
      "transformer_layers_per_block",
    )

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **kw) -> "UNetConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def sd14(cls, **overrides) -> "UNetConfig":
    """Stable Diffusion 1.4 / 1.5 UNet shapes (859,520,964 parameters with in_channels=4)."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> "UNetConfig":
    """A small UNet of the same topology for tests (2 blocks, 32/64 channels)."""
    base = dict(
      block_out_channels=(32, 64),
      layers_per_block=1,
      attention_head_dim=2,
      cross_attention_dim=32,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      norm_num_groups=8,
      sample_size=16,
    )
    base.update(overrides)
    return cls(**base)


# ----------------------------------------------------------------------------- blocks


class BasicTransformerBlock(nn.Module):
  """diffusers ``BasicTransformerBlock`` (layer_norm): x += attn1(norm1 x);
  x += attn2(norm2 x, context); x += ff(norm3 x)."""

  dim: int
  heads: int
  dropout: float = 0.0
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hd = self.dim // self.heads
    impl = self.attention_impl
    x = x + layers.Attention(self.heads, hd, implementation=impl, name="attn1", **kw)(
      layers.LayerNorm(1e-5, name="norm1", **kw)(x)
    )
    x = x + layers.Attention(self.heads, hd, implementation=impl, name="attn2", **kw)(
      layers.LayerNorm(1e-5, name="norm2", **kw)(x), context
    )
    x = x + layers.FeedForward(self.dim, dropout=self.dropout, name="ff", **kw)(
      layers.LayerNorm(1e-5, name="norm3", **kw)(x), deterministic=deterministic
    )
    return x


class Transformer2D(nn.Module):
  """diffusers ``Transformer2DModel`` on continuous NHWC input: GroupNorm(eps 1e-6) ->
  proj_in (1x1 conv, or Linear if ``use_linear_projection``) -> blocks -> proj_out -> + x."""

  channels: int
  heads: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  dropout: float = 0.0
  remat: bool = False
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    y = layers.GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      y = y.reshape(b, h * w, c)
      y = layers.Dense(self.channels, ("embed", "heads"), name="proj_in", **kw)(y)
    else:
      y = layers.Conv(self.channels, 1, padding=0, name="proj_in", **kw)(y)
      y = y.reshape(b, h * w, self.channels)
    block_cls = BasicTransformerBlock
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(3,))
    for i in range(self.num_layers):
      y = block_cls(
        self.channels,
        self.heads,
        self.dropout,
        self.attention_impl,
        name=f"transformer_blocks_{i}",
        **kw,
      )(y, context, deterministic)
    if self.use_linear_projection:
      y = layers.Dense(self.channels, ("heads", "embed"), name="proj_out", **kw)(y).reshape(
        b, h, w, self.channels
      )
    else:
      y = layers.Conv(self.channels, 1, padding=0, name="proj_out", **kw)(
        y.reshape(b, h, w, self.channels)
      )
    return y + x.astype(y.dtype)


def _resnet(cfg: UNetConfig, out_channels: int, name: str):
  cls = layers.ResnetBlock2D
  if cfg.remat:
    cls = nn.remat(cls, static_argnums=(3,))
  return cls(
    out_channels,
    use_time_emb=True,
    groups=cfg.norm_num_groups,
    eps=cfg.norm_eps,
    dropout=cfg.dropout,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.params_dtype,
    name=name,
  )


def _transformer(cfg: UNetConfig, channels: int, heads: int, num_layers: int, name: str):
  return Transformer2D(
    channels,
    heads,
    num_layers,
    cfg.norm_num_groups,
    cfg.use_linear_projection,
    cfg.dropout,
    cfg.remat,
    cfg.attention_impl,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.params_dtype,
    name=name,
  )


def _constrain(x):
  """Logical sharding hint for NHWC activations (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(
    x, ("activation_batch", "activation_height", "activation_width", "activation_embed")
  )


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D / DownBlock2D: (resnet [+ transformer]) x layers [+ downsampler].
  Returns the hidden state and the skip connections it produced."""

  config: UNetConfig
  index: int

  @nn.compact
  def __call__(self, h, temb, context, deterministic: bool = True):
    cfg, i = self.config, self.index
    ch = cfg.block_out_channels[i]
    cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
    skips = []
    for j in range(cfg.layers_per_block_list()[i]):
      h = _resnet(cfg, ch, f"resnets_{j}")(h, temb, deterministic)
      if cross:
        h = _transformer(
          cfg, ch, cfg.heads_per_block()[i], cfg.transformer_layers_list()[i], f"attentions_{j}"
        )(h, context, deterministic)
      h = _constrain(h)
      skips.append(h)
    if i < len(cfg.block_out_channels) - 1:
      h = layers.Downsample2D(
        ch, padding=1, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name="downsamplers_0"
      )(h)
      h = _constrain(h)
      skips.append(h)
    return h, skips


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) x transformer layers groups."""

  config: UNetConfig

  @nn.compact
  def __call__(self, h, temb, context, deterministic: bool = True):
    cfg = self.config
    ch = cfg.block_out_channels[-1]
    h = _resnet(cfg, ch, "resnets_0")(h, temb, deterministic)
    h = _transformer(
      cfg, ch, cfg.heads_per_block()[-1], cfg.transformer_layers_list()[-1], "attentions_0"
    )(h, context, deterministic)
    h = _resnet(cfg, ch, "resnets_1")(h, temb, deterministic)
    return _constrain(h)


class UpBlock(nn.Module):
  """UpBlock2D / CrossAttnUpBlock2D: (concat skip, resnet [+ transformer]) x (layers + 1)
  [+ upsampler]. ``index`` counts up blocks from the bottom (diffusers' order)."""

  config: UNetConfig
  index: int

  @nn.compact
  def __call__(self, h, skips, temb, context, upsample_size=None, deterministic: bool = True):
    cfg, i = self.config, self.index
    n = len(cfg.block_out_channels)
    ch = cfg.block_out_channels[n - 1 - i]
    cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
    skips = list(skips)
    for j in range(cfg.layers_per_block_list()[n - 1 - i] + 1):
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = _resnet(cfg, ch, f"resnets_{j}")(h, temb, deterministic)
      if cross:
        h = _transformer(
          cfg,
          ch,
          cfg.heads_per_block()[n - 1 - i],
          cfg.transformer_layers_list()[n - 1 - i],
          f"attentions_{j}",
        )(h, context, deterministic)
      h = _constrain(h)
    if i < n - 1:
      h = layers.Upsample2D(
        ch, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name="upsamplers_0"
      )(h, upsample_size)
      h = _constrain(h)
    return h


class UNet2DConditionModel(nn.Module):
  """eps = UNet(z_t, t, context). NHWC in and out.

  sample: (B, H, W, in_channels); timesteps: int or float, (B,) or scalar (broadcast);
  encoder_hidden_states: (B, L, cross_attention_dim). Returns float32 (B, H, W, out_channels).
  ``deterministic=False`` enables dropout (needs a 'dropout' rng) when config.dropout > 0.
  """

  config: UNetConfig

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, deterministic: bool = True):
    cfg = self.config
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(
        f"UNet sample must be NHWC (B, H, W, {cfg.in_channels}), got shape {sample.shape}"
      )
    ctx_shape = encoder_hidden_states.shape
    if len(ctx_shape) != 3 or ctx_shape[-1] != cfg.cross_attention_dim:
      raise ValueError(
        f"encoder_hidden_states must be (B, L, {cfg.cross_attention_dim}), "
        f"got shape {encoder_hidden_states.shape}"
      )
    batch = sample.shape[0]
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim == 0 or timesteps.shape[0] == 1:
      timesteps = jnp.broadcast_to(timesteps.reshape(-1), (batch,))
    elif timesteps.shape != (batch,):
      raise ValueError(f"timesteps must be a scalar or ({batch},), got shape {timesteps.shape}")
    channels = cfg.block_out_channels
    n = len(channels)
    context = encoder_hidden_states.astype(cfg.compute_dtype)

    # 1. time: sinusoidal embedding (float32) -> MLP
    t_emb = layers.timestep_embedding(timesteps, channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = layers.TimestepEmbedding(channels[0] * 4, name="time_embedding", **kw)(
      t_emb.astype(cfg.compute_dtype)
    )

    # 2. conv_in
    h = layers.Conv(channels[0], 3, padding=1, name="conv_in", **kw)(
      _constrain(sample.astype(cfg.compute_dtype))
    )
    skips = [h]

    # 3. down
    for i in range(n):
      h, s = DownBlock(cfg, i, name=f"down_blocks_{i}")(h, temb, context, deterministic)
      skips += s

    # 4. mid
    h = MidBlock(cfg, name="mid_block")(h, temb, context, deterministic)

    # 5. up (force the upsampled size when H or W is not a multiple of 2**(n-1))
    forward_size = any(d % (2 ** (n - 1)) for d in sample.shape[1:3])
    for i in range(n):
      num = cfg.layers_per_block_list()[n - 1 - i] + 1
      res, skips = skips[-num:], skips[:-num]
      size = tuple(skips[-1].shape[1:3]) if (forward_size and i < n - 1) else None
      h = UpBlock(cfg, i, name=f"up_blocks_{i}")(h, res, temb, context, size, deterministic)

    # 6. out
    h = layers.GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h)
    h = nn.silu(h)
    h = layers.Conv(cfg.out_channels, 3, padding=1, name="conv_out", **kw)(h)
    return _constrain(h.astype(jnp.float32))


# ----------------------------------------------------------------------------- functional API


def nchw_to_nhwc(x: jax.Array) -> jax.Array:
  return jnp.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x: jax.Array) -> jax.Array:
  return jnp.transpose(x, (0, 3, 1, 2))


def init_params(
  config: UNetConfig,
  key: jax.Array,
  sample_hw: tuple[int, int] | None = None,
  context_len: int = 77,
  batch: int = 1,
):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape (see facediff.partitioning.init_sharded)."""
  hw = sample_hw or (config.sample_size, config.sample_size)
  model = UNet2DConditionModel(config)
  sample = jnp.zeros((batch, *hw, config.in_channels), jnp.float32)
  ctx = jnp.zeros((batch, context_len, config.cross_attention_dim), jnp.float32)
  return model.init(key, sample, jnp.zeros((batch,), jnp.int32), ctx)["params"]


def abstract_params(
  config: UNetConfig, sample_hw: tuple[int, int] | None = None, context_len: int = 77
):
  """Shapes/dtypes (and logical axes) of the params without allocating them."""
  return jax.eval_shape(lambda k: init_params(config, k, sample_hw, context_len), jax.random.key(0))


def apply_unet(
  config: UNetConfig,
  params,
  sample: jax.Array,
  timesteps: jax.Array,
  encoder_hidden_states: jax.Array,
  *,
  layout: str = "NHWC",
  deterministic: bool = True,
  rngs=None,
) -> jax.Array:
  """eps = UNet(sample, t, context). ``layout`` is the layout of ``sample`` and of the
  result: "NHWC" (facediff's) or "NCHW" (PyTorch / diffusers)."""
  if layout not in ("NHWC", "NCHW"):
    raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
  if layout == "NCHW":
    sample = nchw_to_nhwc(sample)
  out = UNet2DConditionModel(config).apply(
    {"params": params}, sample, timesteps, encoder_hidden_states, deterministic, rngs=rngs
  )
  return nhwc_to_nchw(out) if layout == "NCHW" else out


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))
