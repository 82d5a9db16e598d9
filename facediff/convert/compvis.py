"""The original single-file Stable Diffusion checkpoint (CompVis ``ldm`` key names).

``sd-v1-4.ckpt`` (a torch pickle whose ``state_dict`` holds everything) or its
``.safetensors`` twin carries the three models under
``model.diffusion_model.*`` (ldm ``UNetModel``), ``first_stage_model.*`` (ldm
``AutoencoderKL``) and ``cond_stage_model.transformer.*`` (a transformers
``CLIPTextModel``). This module renames each part into diffusers / transformers key
names from the models' configs (the block layout decides the ldm indices), then hands
them to the per-model converters. Everything else in the file (the schedule buffers
``betas``/``alphas_cumprod``..., EMA copies, ``first_stage_model.loss.*``) is ignored.

ldm names (per block):
  UNet  ``input_blocks.0.0`` conv_in; ``input_blocks.k.0`` ResBlock (``in_layers.0``
        norm1, ``in_layers.2`` conv1, ``emb_layers.1`` time_emb_proj, ``out_layers.0``
        norm2, ``out_layers.3`` conv2, ``skip_connection`` conv_shortcut);
        ``input_blocks.k.1`` SpatialTransformer (same inner names as diffusers);
        ``input_blocks.k.0.op`` the stride-2 conv; ``middle_block.{0,1,2}``;
        ``output_blocks.k.{0,1,2}`` (resnet, attention, upsample ``conv``);
        ``time_embed.{0,2}``; ``out.{0,2}``.
  VAE   ``{en,de}coder.{down,up}.L.block.j`` (``nin_shortcut``), ``down.L.downsample``,
        ``up.L.upsample`` (decoder levels numbered from the bottom: up.(n-1) runs
        first), ``mid.block_{1,2}``, ``mid.attn_1`` (``norm``, ``q``, ``k``, ``v``,
        ``proj_out``, stored as 1x1 convs), ``norm_out``.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from facediff.convert import clip as clip_convert
from facediff.convert import common
from facediff.convert import unet as unet_convert
from facediff.convert import vae as vae_convert
from facediff.models.clip import CLIPTextConfig
from facediff.models.stable_diffusion import SD_SCHEDULER_CONFIG, SDModels
from facediff.models.unet import UNetConfig
from facediff.models.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = ("cond_stage_model.transformer.",)
EMA_PREFIX = "model_ema."

_UNET_RESNET = {
  "in_layers.0": "norm1",
  "in_layers.2": "conv1",
  "emb_layers.1": "time_emb_proj",
  "out_layers.0": "norm2",
  "out_layers.3": "conv2",
  "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {
  "norm1": "norm1",
  "conv1": "conv1",
  "norm2": "norm2",
  "conv2": "conv2",
  "nin_shortcut": "conv_shortcut",
}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# kind -> inner renaming (None: inner names are already the diffusers ones)
_KINDS = {
  "unet_resnet": _UNET_RESNET,
  "vae_resnet": _VAE_RESNET,
  "vae_attn": _VAE_ATTN,
  "same": None,
}


def unet_block_table(cfg: UNetConfig) -> dict[str, tuple[str, str]]:
  """ldm block prefix -> (diffusers prefix, kind) for a UNet of this config."""
  n = len(cfg.block_out_channels)
  lpb = cfg.layers_per_block_list()
  t = {
    "time_embed.0": ("time_embedding.linear_1", "same"),
    "time_embed.2": ("time_embedding.linear_2", "same"),
    "input_blocks.0.0": ("conv_in", "same"),
    "out.0": ("conv_norm_out", "same"),
    "out.2": ("conv_out", "same"),
    "middle_block.0": ("mid_block.resnets.0", "unet_resnet"),
    "middle_block.1": ("mid_block.attentions.0", "same"),
    "middle_block.2": ("mid_block.resnets.1", "unet_resnet"),
  }
  k = 1
  for i in range(n):
    attn = cfg.down_block_types[i].startswith("CrossAttn")
    for j in range(lpb[i]):
      t[f"input_blocks.{k}.0"] = (f"down_blocks.{i}.resnets.{j}", "unet_resnet")
      if attn:
        t[f"input_blocks.{k}.1"] = (f"down_blocks.{i}.attentions.{j}", "same")
      k += 1
    if i < n - 1:
      t[f"input_blocks.{k}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", "same")
      k += 1
  k = 0
  rev_lpb = tuple(reversed(lpb))
  for i in range(n):
    attn = cfg.up_block_types[i].startswith("CrossAttn")
    for j in range(rev_lpb[i] + 1):
      t[f"output_blocks.{k}.0"] = (f"up_blocks.{i}.resnets.{j}", "unet_resnet")
      if attn:
        t[f"output_blocks.{k}.1"] = (f"up_blocks.{i}.attentions.{j}", "same")
      if i < n - 1 and j == rev_lpb[i]:
        t[f"output_blocks.{k}.{2 if attn else 1}.conv"] = (
          f"up_blocks.{i}.upsamplers.0.conv",
          "same",
        )
      k += 1
  return t


def vae_block_table(cfg: VAEConfig) -> dict[str, tuple[str, str]]:
  """ldm block prefix -> (diffusers prefix, kind) for a VAE of this config."""
  n = len(cfg.block_out_channels)
  t = {}
  for part in ("encoder", "decoder"):
    for name in ("conv_in", "conv_out"):
      t[f"{part}.{name}"] = (f"{part}.{name}", "same")
    t[f"{part}.norm_out"] = (f"{part}.conv_norm_out", "same")
    t[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", "vae_resnet")
    t[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", "vae_attn")
    t[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", "vae_resnet")
  for lvl in range(n):
    for j in range(cfg.layers_per_block):
      t[f"encoder.down.{lvl}.block.{j}"] = (f"encoder.down_blocks.{lvl}.resnets.{j}", "vae_resnet")
    if lvl < n - 1:
      t[f"encoder.down.{lvl}.downsample.conv"] = (
        f"encoder.down_blocks.{lvl}.downsamplers.0.conv",
        "same",
      )
    up = n - 1 - lvl  # ldm numbers decoder levels from the bottom
    for j in range(cfg.layers_per_block + 1):
      t[f"decoder.up.{lvl}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", "vae_resnet")
    if lvl > 0:
      t[f"decoder.up.{lvl}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", "same")
  for name in ("quant_conv", "post_quant_conv"):
    t[name] = (name, "same")
  return t


def rename_with_table(
  state_dict: Mapping[str, np.ndarray], table: Mapping[str, tuple[str, str]]
) -> tuple[dict[str, np.ndarray], list[str]]:
  """Renames ldm keys through a block table. Returns (renamed, keys that fit no block)."""
  out: dict[str, np.ndarray] = {}
  unmapped: list[str] = []
  for key, v in state_dict.items():
    parts = key.split(".")
    hit = None
    for cut in range(len(parts) - 1, 0, -1):  # longest block prefix first
      prefix = ".".join(parts[:cut])
      if prefix in table:
        hit = (prefix, ".".join(parts[cut:]))
        break
    if hit is None:
      unmapped.append(key)
      continue
    new_prefix, kind = table[hit[0]]
    inner = hit[1]
    rename = _KINDS[kind]
    if rename is not None:
      head, _, param = inner.rpartition(".")
      if head not in rename:
        unmapped.append(key)
        continue
      inner = f"{rename[head]}.{param}"
    v = np.asarray(v)
    if kind == "vae_attn" and v.ndim > 2:  # 1x1 conv (or conv1d) weights -> linear
      v = v.reshape(v.shape[0], v.shape[1])
    out[f"{new_prefix}.{inner}"] = v
  return out, unmapped


# ----------------------------------------------------------------------------- reading .ckpt


class _Opaque(dict):
  """Stand-in for any pickled object that is not a tensor or a plain container (e.g.
  PyTorch Lightning callbacks in a training checkpoint): it swallows its arguments and
  state, and nothing of the original class is imported or run."""

  def __init__(self, *args, **kwargs):
    super().__init__()

  def __setstate__(self, state):
    self["__state__"] = state

  def append(self, item):
    self.setdefault("__items__", []).append(item)

  def extend(self, items):
    self.setdefault("__items__", []).extend(items)


_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": "bfloat16",
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
  "UntypedStorage": np.uint8,
}


class _StorageType:
  def __init__(self, name: str):
    self.name = name


def _rebuild_tensor(storage, offset, size, stride, *_):
  arr = np.lib.stride_tricks.as_strided(
    storage[offset:], shape=tuple(size), strides=tuple(st * storage.itemsize for st in stride)
  )
  arr = np.array(arr)
  if getattr(storage, "_bf16", False):  # bfloat16 bits -> float32
    arr = (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  return arr


def read_torch_zip_tolerant(path: str) -> dict:
  """Reads a torch zip checkpoint (``torch.save`` format) into numpy WITHOUT torch and
  without running pickled code: tensors are rebuilt from their storages, plain
  containers are kept, every other class becomes an inert ``_Opaque``. Used for
  training checkpoints (``sd-v1-4-full-ema.ckpt``-style files) whose pickles name
  classes ``torch.load(weights_only=True)`` refuses, such as Lightning callbacks."""
  import collections  # noqa: PLC0415
  import pickle  # noqa: PLC0415
  import zipfile  # noqa: PLC0415

  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise ValueError(f"{path}: not a torch zip checkpoint (found {len(pkl)} data.pkl entries)")
    root = pkl[0][: -len("data.pkl")]
    if root + "byteorder" in names and z.read(root + "byteorder").strip() not in (b"little", b""):
      raise ValueError(f"{path}: big-endian checkpoints are not supported")

    class _Bf16Array(np.ndarray):
      _bf16 = True

    def load_storage(pid):
      kind, stype, key = pid[0], pid[1], pid[2]
      if kind != "storage" or not isinstance(stype, _StorageType):
        raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
      raw = z.read(f"{root}data/{key}")
      dt = _STORAGE_DTYPES[stype.name]
      if dt == "bfloat16":
        return np.frombuffer(raw, np.uint16).view(_Bf16Array)
      return np.frombuffer(raw, dt)

    class _Unpickler(pickle.Unpickler):
      def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
          return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
          return _rebuild_tensor
        if module == "torch._utils" and name in (
          "_rebuild_parameter",
          "_rebuild_parameter_with_state",
        ):
          return lambda data, *_: data
        if module == "torch" and name in _STORAGE_DTYPES:
          return _StorageType(name)
        if module == "torch" and name == "Size":
          return tuple
        return _Opaque

      def persistent_load(self, pid):
        return load_storage(pid)

    with z.open(pkl[0]) as f:
      obj = _Unpickler(f).load()
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path} does not hold a state dict")
  out = {}
  for k, v in obj.items():
    if isinstance(v, np.ndarray):
      v = np.asarray(v)
      out[str(k)] = v.astype(np.float32) if v.dtype == np.float16 else v
  return out


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """State dict of a CompVis file: ``.safetensors``, or a torch ``.ckpt`` read with
  ``torch.load(weights_only=True)`` and, when that refuses the pickle (training
  checkpoints carry Lightning objects), with ``read_torch_zip_tolerant``."""
  try:
    return common.read_state_dict(path)
  except ValueError as e:
    import zipfile  # noqa: PLC0415

    if path.endswith(".safetensors") or not zipfile.is_zipfile(path):
      raise
    try:
      return read_torch_zip_tolerant(path)
    except Exception as e2:  # noqa: BLE001
      raise ValueError(f"cannot read {path}: {e}; the tolerant reader also failed: {e2}") from e2


def split_compvis(
  state_dict: Mapping[str, np.ndarray], *, use_ema: bool = False, source: str = "checkpoint"
) -> tuple[dict, dict, dict]:
  """Splits a CompVis state dict into its (unet, vae, text encoder) parts, prefixes removed.

  With ``use_ema`` the UNet weights come from the EMA copy (``model_ema.<key without
  dots>``), as ldm stores them.
  """
  unet, vae, text = {}, {}, {}
  for k, v in state_dict.items():
    if k.startswith(UNET_PREFIX):
      unet[k[len(UNET_PREFIX) :]] = v
    elif k.startswith(VAE_PREFIX):
      rest = k[len(VAE_PREFIX) :]
      if not rest.startswith("loss."):
        vae[rest] = v
    else:
      for p in CLIP_PREFIXES:
        if k.startswith(p):
          text[k[len(p) :]] = v
  if use_ema:
    ema = {}
    missing = []
    for k in unet:
      flat = EMA_PREFIX + ("diffusion_model." + k).replace(".", "")
      if flat in state_dict:
        ema[k] = state_dict[flat]
      else:
        missing.append(flat)
    if missing:
      raise common.StateDictMismatchError(f"{source} (EMA weights)", missing=missing)
    unet = ema
  empty = [
    name
    for name, part in (
      ("model.diffusion_model.*", unet),
      ("first_stage_model.*", vae),
      ("cond_stage_model.transformer.*", text),
    )
    if not part
  ]
  if empty:
    raise ValueError(
      f"{source} is not a CompVis Stable Diffusion checkpoint: no keys under {', '.join(empty)}"
    )
  return unet, vae, text


def _convert(parts_table, per_model_convert, state, cfg, source, prefix):
  renamed, unmapped = rename_with_table(state, parts_table)
  try:
    params = per_model_convert(renamed, cfg, source)
  except common.StateDictMismatchError as e:
    raise common.StateDictMismatchError(
      e.source, e.missing, list(e.unexpected) + [prefix + k for k in unmapped], e.mismatched
    ) from None
  if unmapped:
    raise common.StateDictMismatchError(source, unexpected=[prefix + k for k in unmapped])
  return params


def compvis_to_params(
  state_dict: Mapping[str, np.ndarray],
  unet_config: UNetConfig,
  vae_config: VAEConfig,
  text_config: CLIPTextConfig,
  *,
  use_ema: bool = False,
  source: str = "checkpoint",
) -> dict[str, dict]:
  """CompVis state dict -> {"unet", "vae", "text_encoder"} facediff params.

  Raises ``common.StateDictMismatchError`` per model, listing missing keys (facediff
  names) and unexpected ldm keys (full CompVis names).
  """
  unet_sd, vae_sd, text_sd = split_compvis(state_dict, use_ema=use_ema, source=source)
  return {
    "unet": _convert(
      unet_block_table(unet_config),
      unet_convert.convert_unet_state_dict,
      unet_sd,
      unet_config,
      f"{source} [model.diffusion_model]",
      UNET_PREFIX,
    ),
    "vae": _convert(
      vae_block_table(vae_config),
      vae_convert.torch_to_flax,
      vae_sd,
      vae_config,
      f"{source} [first_stage_model]",
      VAE_PREFIX,
    ),
    "text_encoder": clip_convert.torch_to_flax(
      text_sd, text_config, f"{source} [cond_stage_model.transformer]"
    ),
  }


def load_compvis_checkpoint(
  path: str | os.PathLike,
  *,
  unet_config: UNetConfig | None = None,
  vae_config: VAEConfig | None = None,
  text_config: CLIPTextConfig | None = None,
  tokenizer_path: str | os.PathLike | None = None,
  use_ema: bool = False,
  dtype: str = "float32",
) -> SDModels:
  """Loads ``sd-v1-4.ckpt`` / ``.safetensors`` (CompVis keys) into a facediff model set.

  The file has no configs: the default ones are SD-1.4's; pass others for other
  shapes. ``tokenizer_path``: a CLIP tokenizer folder to attach (the file has none).
  """
  import dataclasses  # noqa: PLC0415

  path = os.fspath(path)
  unet_config = (unet_config or UNetConfig.sd14()).replace(dtype=dtype)
  vae_config = dataclasses.replace(vae_config or VAEConfig.sd14(), dtype=dtype)
  text_config = dataclasses.replace(text_config or CLIPTextConfig.sd14(), dtype=dtype)
  state = read_checkpoint(path)
  params = compvis_to_params(
    state, unet_config, vae_config, text_config, use_ema=use_ema, source=path
  )
  return SDModels(
    unet_config,
    vae_config,
    text_config,
    params,
    tokenizer_path=None if tokenizer_path is None else os.fspath(tokenizer_path),
    scheduler=dict(SD_SCHEDULER_CONFIG),
  )
