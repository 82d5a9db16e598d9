"""diffusers ``AutoencoderKL`` state dicts <-> facediff ``AutoencoderKL`` params.

facediff's VAE uses diffusers' module names, so import is the generic renaming of
``facediff.convert.common`` plus the old attention spelling that VAE checkpoints
saved before diffusers 0.14 still carry (``query``/``key``/``value``/``proj_attn``
-> ``to_q``/``to_k``/``to_v``/``to_out.0``; 1x1-conv-shaped weights are squeezed).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from facediff.convert import common
from facediff.models.vae import AutoencoderKL, VAEConfig

_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def param_shapes(config: VAEConfig) -> Any:
  """The facediff VAE param tree's shapes (``jax.eval_shape``, nothing allocated)."""
  f = config.downsample_factor
  x = jnp.zeros((1, 2 * f, 2 * f, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda: AutoencoderKL(config).init(jax.random.key(0), x))["params"]


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
  return common.match_params(param_shapes(config), flat, source)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """facediff VAE params -> diffusers AutoencoderKL state dict (float32 numpy)."""
  return common.flax_to_torch_generic(params)
