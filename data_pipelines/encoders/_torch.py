"""Shared helpers of the torch encoders (torch is imported only by these modules)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from data_pipelines.encoders import WeightsError


def load_state_dict(path: str, *, flag: str, nested: tuple[str, ...] = ("state_dict",)):
  """Reads a torch checkpoint: a state dict, or a dict holding one under a key of
  ``nested``; strips DataParallel's ``module.`` prefix."""
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for bad files
    raise WeightsError(f"--weights {flag}={path}: not a readable torch checkpoint ({e})") from e
  for k in nested:
    if isinstance(obj, Mapping) and k in obj and isinstance(obj[k], Mapping):
      obj = obj[k]
      break
  if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise WeightsError(f"--weights {flag}={path}: expected a state dict of tensors")
  return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_into(
  module: torch.nn.Module,
  state: Mapping[str, torch.Tensor],
  *,
  flag: str,
  path: str,
  ignore: tuple[str, ...] = (),
) -> None:
  """Strict load that names missing/unexpected/mis-shaped keys."""
  own = module.state_dict()
  state = {k: v for k, v in state.items() if not k.startswith(ignore)}
  missing = sorted(set(own) - set(state))
  extra = sorted(set(state) - set(own))
  bad = [
    f"{k}: file {tuple(state[k].shape)} vs net {tuple(own[k].shape)}"
    for k in own
    if k in state and state[k].shape != own[k].shape
  ]
  if missing or extra or bad:
    raise WeightsError(
      f"--weights {flag}={path}: does not fit {type(module).__name__}: "
      f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
      f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)}), "
      f"shape mismatches {bad[:5]}"
    )
  module.load_state_dict(state, strict=True)
  module.eval()


def to_nchw(batch: np.ndarray) -> torch.Tensor:
  """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in 0..255."""
  return torch.from_numpy(np.ascontiguousarray(batch, np.float32)).permute(0, 3, 1, 2)


@torch.no_grad()
def run(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
  return module(x).float().numpy()
