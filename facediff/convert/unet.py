"""diffusers ``UNet2DConditionModel`` <-> facediff UNet params.

* ``config_from_diffusers`` / ``config_to_diffusers``: config.json dict <-> UNetConfig
  (unsupported diffusers features raise an error naming the field).
* ``convert_unet_state_dict``: diffusers state dict (keys as ``save_pretrained`` writes
  them, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``) ->
  facediff params, checked strictly against the model's expected tree.
* ``load_unet(path)``: a diffusers pipeline folder (``<path>/unet/``) or a UNet folder
  (config.json + diffusion_pytorch_model[.variant].safetensors / .bin, sharded or not).
* ``widen_conv_in``: more input channels (DiffSFSR: 4 -> 9 for the masked-background
  latent), new channels zero-initialised so the widened model equals the original.
* ``unet_params_to_diffusers`` / ``save_unet_pretrained``: export back to a folder that
  ``diffusers.UNet2DConditionModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from facediff.convert import common
from facediff.models.unet import UNetConfig, abstract_params

WEIGHT_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
DIFFUSERS_VERSION = "0.42.1"

# diffusers config fields that facediff's UNet reproduces only at these values.
_REQUIRED_DEFAULTS: dict[str, Any] = {
  "center_input_sample": False,
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "only_cross_attention": False,
  "downsample_padding": 1,
  "mid_block_scale_factor": 1,
  "act_fn": "silu",
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "dual_cross_attention": False,
  "class_embed_type": None,
  "addition_embed_type": None,
  "num_class_embeds": None,
  "resnet_time_scale_shift": "default",
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "time_cond_proj_dim": None,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "projection_class_embeddings_input_dim": None,
  "attention_type": "default",
  "class_embeddings_concat": False,
  "mid_block_only_cross_attention": None,
  "cross_attention_norm": None,
  "reverse_transformer_layers_per_block": None,
}

_CONFIG_FIELDS = (
  "in_channels",
  "out_channels",
  "sample_size",
  "block_out_channels",
  "layers_per_block",
  "attention_head_dim",
  "num_attention_heads",
  "cross_attention_dim",
  "down_block_types",
  "up_block_types",
  "norm_num_groups",
  "norm_eps",
  "transformer_layers_per_block",
  "use_linear_projection",
  "flip_sin_to_cos",
  "freq_shift",
  "dropout",
)


def _tuplify(v):
  return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def config_from_diffusers(
  cfg: Mapping[str, Any], source: str = "config", **overrides
) -> UNetConfig:
  """UNetConfig from a diffusers UNet2DConditionModel config.json dict.

  ``overrides`` set facediff-only fields (dtype, param_dtype, remat)."""
  for field, want in _REQUIRED_DEFAULTS.items():
    got = cfg.get(field, want)
    if isinstance(got, (list, tuple)) and not isinstance(want, (list, tuple)):
      ok = all(g == want for g in got)
    else:
      ok = got == want
    if not ok:
      raise ValueError(
        f"{source}: UNet config field {field!r} = {got!r} is not supported by facediff "
        f"(only {want!r})"
      )
  kw: dict[str, Any] = {}
  for f in _CONFIG_FIELDS:
    if f in cfg and cfg[f] is not None:
      kw[f] = _tuplify(cfg[f])
  if "num_attention_heads" in cfg:
    kw["num_attention_heads"] = _tuplify(cfg["num_attention_heads"])
  cad = kw.get("cross_attention_dim")
  if isinstance(cad, tuple):
    if len(set(cad)) != 1:
      raise ValueError(f"{source}: per-block cross_attention_dim {cad} is not supported")
    kw["cross_attention_dim"] = cad[0]
  if isinstance(kw.get("sample_size"), tuple):
    raise ValueError(f"{source}: non-square sample_size {kw['sample_size']} is not supported")
  tl = kw.get("transformer_layers_per_block")
  if isinstance(tl, tuple) and any(isinstance(x, tuple) for x in tl):
    raise ValueError(f"{source}: nested transformer_layers_per_block {tl} is not supported")
  kw.update(overrides)
  try:
    return UNetConfig(**kw)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
  """diffusers UNet2DConditionModel config.json dict for ``config``."""

  def lst(v):
    return list(v) if isinstance(v, tuple) else v

  out: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": DIFFUSERS_VERSION,
  }
  for f in _CONFIG_FIELDS:
    out[f] = lst(getattr(config, f))
  out.update({k: v for k, v in _REQUIRED_DEFAULTS.items()})
  out["upcast_attention"] = False
  # diffusers' UNet2DConditionModel refuses num_attention_heads; it reads the head count
  # from attention_head_dim (its legacy naming, which facediff keeps).
  heads = config.heads_per_block()
  out["attention_head_dim"] = heads[0] if len(set(heads)) == 1 else list(heads)
  out["num_attention_heads"] = None
  return out


def convert_unet_state_dict(
  state_dict: Mapping[str, np.ndarray], config: UNetConfig, source: str = "<state dict>"
) -> dict:
  """diffusers UNet state dict -> facediff params (float32 numpy, nested dict).

  Raises common.StateDictMismatchError listing every missing / unexpected / mis-shaped key
  (in facediff naming, e.g. ``down_blocks_0/resnets_0/conv1/kernel``) together with
  ``source``.
  """
  flat = common.torch_to_flax_generic(state_dict)
  return common.match_params(abstract_params(config), flat, source)


def unet_params_to_diffusers(params) -> dict[str, np.ndarray]:
  """facediff UNet params (boxed or plain, any array type) -> diffusers state dict."""
  return common.flax_to_torch_generic(params)


def _unet_dir(path: str) -> str:
  has_unet_dir = os.path.isdir(os.path.join(path, "unet"))
  if os.path.isfile(os.path.join(path, CONFIG_NAME)) and not has_unet_dir:
    return path
  if has_unet_dir:
    return os.path.join(path, "unet")
  raise FileNotFoundError(
    f"{path} is neither a diffusers UNet folder (config.json + {WEIGHT_NAME}.*) nor a "
    "pipeline folder with a unet/ sub-folder"
  )


def load_unet_config(path: str, **overrides) -> UNetConfig:
  folder = _unet_dir(os.fspath(path))
  cfg_path = os.path.join(folder, CONFIG_NAME)
  try:
    with open(cfg_path) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read UNet config {cfg_path}: {e}") from e
  return config_from_diffusers(cfg, source=cfg_path, **overrides)


def load_unet(
  path: str | os.PathLike, *, variant: str | None = None, **config_overrides
) -> tuple[UNetConfig, dict]:
  """Loads (config, params) from a diffusers pipeline folder or its ``unet/`` folder."""
  folder = _unet_dir(os.fspath(path))
  config = load_unet_config(folder, **config_overrides)
  files = common.find_weights(folder, (WEIGHT_NAME,), variant)
  state: dict[str, np.ndarray] = {}
  for fn in files:
    state.update(common.read_state_dict(fn))
  source = files[0] if len(files) == 1 else f"{folder} ({len(files)} shards)"
  return config, convert_unet_state_dict(state, config, source)


def save_unet_pretrained(params, config: UNetConfig, folder: str | os.PathLike) -> str:
  """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` (float32) into
  ``folder``, loadable by ``diffusers.UNet2DConditionModel.from_pretrained(folder)``."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, CONFIG_NAME), "w") as f:
    json.dump(config_to_diffusers(config), f, indent=2, sort_keys=True)
  common.write_safetensors(
    unet_params_to_diffusers(params), os.path.join(folder, f"{WEIGHT_NAME}.safetensors")
  )
  return folder


def widen_conv_in(params, config: UNetConfig, in_channels: int) -> tuple[UNetConfig, dict]:
  """Widens ``conv_in`` to ``in_channels`` inputs (e.g. DiffSFSR's 4 -> 9: noisy latent,
  then the extra condition channels concatenated after it). The original kernel fills the
  first ``config.in_channels`` input slots; the new slots are zero, so the widened UNet
  gives exactly the original output whatever the extra channels hold at first.
  Returns (new config, new params, unboxed); other params are shared, not copied."""
  old = config.in_channels
  if in_channels < old:
    raise ValueError(f"widen_conv_in: cannot narrow conv_in from {old} to {in_channels} channels")
  plain = dict(nn.unbox(params))
  conv = dict(plain["conv_in"])
  kernel = np.asarray(conv["kernel"])
  if kernel.shape[2] != old:
    raise ValueError(
      f"widen_conv_in: conv_in/kernel has {kernel.shape[2]} input channels, config says {old}"
    )
  pad = np.zeros(kernel.shape[:2] + (in_channels - old, kernel.shape[3]), kernel.dtype)
  conv["kernel"] = np.concatenate([kernel, pad], axis=2)
  plain["conv_in"] = conv
  return config.replace(in_channels=in_channels), plain
