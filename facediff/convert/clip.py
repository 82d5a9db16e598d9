"""transformers ``CLIPTextModel`` state dicts <-> facediff ``CLIPTextModel`` params.

Import accepts both key spellings transformers has used: ``text_model.embeddings...``
(transformers 4.x and every Stable Diffusion checkpoint on the hub) and
``embeddings...`` (transformers 5.x ``save_pretrained``). The non-persistent buffer
``embeddings.position_ids`` that old checkpoints carry is ignored. Export writes the
``text_model.`` spelling, which both transformers 4.x and 5.x load.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from facediff.convert import common
from facediff.models.clip import CLIPTextConfig, abstract_params

PREFIX = "text_model."
_IGNORED = ("embeddings.position_ids",)


def config_from_transformers(d: dict[str, Any], source: str = "config") -> CLIPTextConfig:
  """A ``CLIPTextConfig`` from a transformers ``config.json`` dictionary (a text
  config, or a full CLIPModel config whose ``text_config`` is used)."""
  if "text_config" in d:
    d = d["text_config"]
  kwargs = {}
  for f in dataclasses.fields(CLIPTextConfig):
    if f.name in d and f.name != "dtype":
      kwargs[f.name] = d[f.name]
  missing = [n for n in ("hidden_size", "num_hidden_layers", "num_attention_heads") if n not in d]
  if missing:
    raise ValueError(f"{source}: CLIP text config lacks field(s) {missing}")
  cfg = CLIPTextConfig(**kwargs)
  cfg.validate(source)
  return cfg


def config_to_transformers(config: CLIPTextConfig) -> dict[str, Any]:
  """The ``config.json`` content transformers' ``CLIPTextModel`` expects."""
  d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "dtype"}
  d.update(
    architectures=["CLIPTextModel"],
    model_type="clip_text_model",
    attention_dropout=0.0,
    initializer_factor=1.0,
    initializer_range=0.02,
    projection_dim=config.hidden_size,
    torch_dtype="float32",
  )
  return d


def strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops the optional ``text_model.`` prefix and the ``position_ids`` buffer."""
  out = {}
  for k, v in state_dict.items():
    k = k[len(PREFIX) :] if k.startswith(PREFIX) else k
    if k in _IGNORED:
      continue
    out[k] = v
  return out


def torch_to_flax(
  state_dict: Mapping[str, np.ndarray], config: CLIPTextConfig, source: str = "<state dict>"
) -> dict[str, Any]:
  """transformers CLIPTextModel state dict -> facediff params (nested numpy dict).

  Raises ``common.StateDictMismatchError`` (naming ``source``) listing every
  missing, unexpected or mis-shaped key.
  """
  sd = strip_prefix(state_dict)
  flat: dict[str, np.ndarray] = {}
  rest: dict[str, np.ndarray] = {}
  for k, v in sd.items():
    v = np.asarray(v)
    if k == "embeddings.token_embedding.weight":
      flat["embeddings/token_embedding/embedding"] = v
    elif k == "embeddings.position_embedding.weight":
      flat["embeddings/position_embedding"] = v
    elif k.startswith("encoder.layers."):
      rest[k[len("encoder.") :]] = v
    else:
      rest[k] = v
  generic = common.torch_to_flax_generic(rest)
  overlap = set(generic) & set(flat)
  if overlap:
    raise ValueError(f"{source}: keys map to the same parameter twice: {sorted(overlap)}")
  flat.update(generic)
  return common.match_params(abstract_params(config), flat, source)


def flax_to_torch(params: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """facediff CLIP params -> transformers state dict (float32 numpy), keys ``prefix + ...``."""
  flat = common.flatten_params(params)
  special = {
    "embeddings/token_embedding/embedding": "embeddings.token_embedding.weight",
    "embeddings/position_embedding": "embeddings.position_embedding.weight",
  }
  out: dict[str, np.ndarray] = {}
  rest = {}
  for k, v in flat.items():
    if k in special:
      out[special[k]] = np.ascontiguousarray(np.asarray(v, np.float32))
    else:
      rest[k] = v
  for k, v in common.flax_to_torch_generic(rest, list_names=("layers",)).items():
    out[("encoder." + k) if k.startswith("layers.") else k] = v
  return {prefix + k: v for k, v in out.items()}
