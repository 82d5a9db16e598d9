"""diffusers ``AutoencoderKL`` state dicts <-> facediff ``AutoencoderKL`` params.

facediff's VAE uses diffusers' module names, so import is the generic renaming of
``facediff.convert.common`` plus the old attention spelling that VAE checkpoints
saved before diffusers 0.14 still carry (``query``/``key``/``value``/``proj_attn``
-> ``to_q``/``to_k``/``to_v``/``to_out.0``; 1x1-conv-shaped weights are squeezed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from facediff.convert import common
from facediff.models.vae import VAEConfig, abstract_params

_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def config_from_diffusers(d: dict[str, Any], source: str = "config") -> VAEConfig:
  """A ``VAEConfig`` from a diffusers ``vae/config.json`` dictionary (checks block types)."""
  n = len(d.get("block_out_channels", VAEConfig.block_out_channels))
  for field, want in (
    ("down_block_types", "DownEncoderBlock2D"),
    ("up_block_types", "UpDecoderBlock2D"),
  ):
    got = list(d.get(field, [want] * n))
    if got != [want] * n:
      raise ValueError(f"{source}: {field} must be {n} x {want!r}, got {got}")
  for field, want in (("shift_factor", None), ("latents_mean", None), ("latents_std", None)):
    if d.get(field, want) is not None:
      raise ValueError(f"{source}: {field}={d[field]!r} is not supported (SD-1.x VAE has none)")
  kwargs = {}
  for f in dataclasses.fields(VAEConfig):
    if f.name in d and f.name != "dtype":
      v = d[f.name]
      kwargs[f.name] = tuple(v) if isinstance(v, list) else v
  cfg = VAEConfig(**kwargs)
  cfg.validate(source)
  return cfg


def config_to_diffusers(config: VAEConfig) -> dict[str, Any]:
  """The ``config.json`` content diffusers' ``AutoencoderKL`` expects."""
  d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "dtype"}
  d["block_out_channels"] = list(config.block_out_channels)
  n = len(config.block_out_channels)
  d.update(
    _class_name="AutoencoderKL",
    down_block_types=["DownEncoderBlock2D"] * n,
    up_block_types=["UpDecoderBlock2D"] * n,
    force_upcast=True,
  )
  return d


def modernise_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames legacy attention keys of old diffusers VAEs to the current ones."""
  out = {}
  for k, v in state_dict.items():
    parts = k.split(".")
    if len(parts) >= 2 and "attentions" in parts and parts[-2] in _LEGACY_ATTN:
      k = ".".join(parts[:-2] + [_LEGACY_ATTN[parts[-2]], parts[-1]])
    v = np.asarray(v)
    if "attentions" in parts and v.ndim == 4 and v.shape[2:] == (1, 1):
      v = v[:, :, 0, 0]  # attention projections stored as 1x1 convs
    out[k] = v
  return out


def torch_to_flax(
  state_dict: Mapping[str, np.ndarray], config: VAEConfig, source: str = "<state dict>"
) -> dict[str, Any]:
  """diffusers AutoencoderKL state dict -> facediff params (nested numpy dict).

  Raises ``common.StateDictMismatchError`` naming ``source`` and every missing,
  unexpected or mis-shaped key.
  """
  flat = common.torch_to_flax_generic(modernise_keys(state_dict))
  return common.match_params(abstract_params(config), flat, source)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """facediff VAE params -> diffusers AutoencoderKL state dict (float32 numpy)."""
  return common.flax_to_torch_generic(params)
