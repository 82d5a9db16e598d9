"""transformers ``CLIPTextModel`` state dicts <-> facediff ``CLIPTextModel`` params.

Import accepts both key spellings transformers has used: ``text_model.embeddings...``
(transformers 4.x and every Stable Diffusion checkpoint on the hub) and
``embeddings...`` (transformers 5.x ``save_pretrained``). The non-persistent buffer
``embeddings.position_ids`` that old checkpoints carry is ignored. Export writes the
``text_model.`` spelling, which both transformers 4.x and 5.x load.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from facediff.convert import common
from facediff.models.clip import CLIPTextConfig, CLIPTextModel

PREFIX = "text_model."
_IGNORED = ("embeddings.position_ids",)


def param_shapes(config: CLIPTextConfig) -> Any:
  """The facediff param tree's shapes (``jax.eval_shape``, no memory allocated)."""
  model = CLIPTextModel(config)
  ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]


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
  return common.match_params(param_shapes(config), flat, source)


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
