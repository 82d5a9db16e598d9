"""PyTorch checkpoints -> facediff LPIPS-VGG params.

Two sources:

* the VGG16 trunk, as torchvision lays it out (``features.<i>.weight`` / ``.bias`` for
  the 13 convolutions at indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28; ReLUs
  and max-pools hold no weights). ``classifier.*`` entries of a full torchvision
  checkpoint are ignored. The layout of a saved lpips ``LPIPS`` module
  (``net.slice<k>.<i>.weight``, same indices) is accepted too, its heads and
  ``scaling_layer.*`` buffers ignored, so one such file can serve as both sources. No
  trunk ships offline: pass a torchvision ``vgg16`` state dict (path or mapping).
* the linear heads: ``lin<l>.model.1.weight`` (1, C_l, 1, 1), as lpips v0.1 ships them in
  ``weights/v0.1/vgg.pth`` (``model.0`` when saved without dropout). Entries ``net.*`` and
  ``scaling_layer.*`` of a full saved ``LPIPS`` module are ignored. By default the file
  packaged with the installed lpips wheel is read (its location is found without
  importing lpips, which needs torchvision).

Every mismatch raises ``common.StateDictMismatchError`` naming the file (or the given
``source``) and every missing, unexpected and mis-shaped key in the checkpoint's naming.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Mapping

import numpy as np

from facediff.convert import common
from facediff.models import lpips as lpips_model
from facediff.models import vgg16 as vgg16_model

_LPIPS_SLICE = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")
_HEAD = re.compile(r"^lin(\d+)\.model\.[01]\.weight$")


def default_heads_path(version: str = "0.1") -> str:
  """``weights/v<version>/vgg.pth`` inside the installed lpips package."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
      "the lpips package is not installed, so its linear heads (weights/v0.1/vgg.pth) "
      "cannot be found; install it (pip install --no-deps lpips) or pass heads=<path>"
    )
  path = os.path.join(os.path.dirname(spec.origin), "weights", f"v{version}", "vgg.pth")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"lpips linear heads not found at {path}")
  return path


def torchvision_conv_indices(config: vgg16_model.VGG16Config) -> dict[str, int]:
  """{"conv1_1": 0, "conv1_2": 2, "conv2_1": 5, ...}: each conv's index in torchvision's
  ``vgg.features`` (every conv is followed by a ReLU, every stage but the last by a
  max-pool; the last stage's pool has no weights either)."""
  out, i = {}, 0
  for names in vgg16_model.conv_names(config):
    for name in names:
      out[name] = i
      i += 2  # conv, relu
    i += 1  # max-pool
  return out


def _conv_widths(config: vgg16_model.VGG16Config) -> list[int]:
  """Output channels of every conv, in order."""
  pairs = zip(config.stage_channels, config.stage_depths, strict=True)
  return [c for c, d in pairs for _ in range(d)]


def _numpy(v) -> np.ndarray:
  # torch tensors (possibly requiring grad) as well as arrays
  return v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v)


def _load(source: str | os.PathLike | Mapping[str, Any], name: str) -> tuple[dict, str]:
  """(state dict as numpy, name for errors): the mapping itself, or the file read."""
  if isinstance(source, Mapping):
    return {str(k): _numpy(v) for k, v in source.items()}, name
  path = os.fspath(source)
  return common.read_state_dict(path), path


def _expect(
  state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected]
  mismatched = [
    (k, expected[k], tuple(np.shape(state_dict[k])))
    for k in expected
    if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]
  ]
  if missing or unexpected or mismatched:
    raise common.StateDictMismatchError(source, missing, unexpected, mismatched)


def vgg16_torch_to_flax(
  state_dict: Mapping[str, np.ndarray],
  config: vgg16_model.VGG16Config | None = None,
  source: str = "<vgg16 state dict>",
) -> dict[str, Any]:
  """torchvision VGG16 ``features`` state dict -> ``VGG16Features`` params (numpy);
  ``config`` defaults to VGG16."""
  config = config or vgg16_model.VGG16Config()
  sd = {}
  for k, v in state_dict.items():
    if k.startswith(("classifier.", "scaling_layer.")) or _HEAD.match(k):
      continue
    m = _LPIPS_SLICE.match(k)
    sd[f"features.{m.group(1)}.{m.group(2)}" if m else k] = _numpy(v)
  expected, to_flax = {}, {}
  c_in = config.in_channels
  for (name, idx), c_out in zip(
    torchvision_conv_indices(config).items(), _conv_widths(config), strict=True
  ):
    expected[f"features.{idx}.weight"] = (c_out, c_in, 3, 3)
    expected[f"features.{idx}.bias"] = (c_out,)
    to_flax[name] = idx
    c_in = c_out
  _expect(sd, expected, source)
  flat = {}
  for name, idx in to_flax.items():
    flat[f"{name}/kernel"] = common.conv_torch_to_flax(sd[f"features.{idx}.weight"])
    flat[f"{name}/bias"] = sd[f"features.{idx}.bias"]
  return common.match_params(vgg16_model.abstract_params(config), flat, source)


def heads_torch_to_flax(
  state_dict: Mapping[str, np.ndarray],
  config: lpips_model.LPIPSConfig | None = None,
  source: str = "<lpips heads state dict>",
) -> dict[str, Any]:
  """lpips ``lin<l>.model.1.weight`` (1, C, 1, 1) -> {"lin<l>": {"kernel": (1, 1, C, 1)}};
  ``config`` defaults to LPIPS-VGG."""
  config = config or lpips_model.LPIPSConfig()
  sd = {}
  for k, v in state_dict.items():
    if k.startswith(("net.", "scaling_layer.")):
      continue
    m = _HEAD.match(k)
    name = f"lin{m.group(1)}.model.1.weight" if m else k
    if name in sd:
      raise ValueError(f"{source}: two entries for head lin{m.group(1)} (model.0 and model.1)")
    sd[name] = _numpy(v)
  expected = {
    f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(config.vgg.stage_channels)
  }
  _expect(sd, expected, source)
  return {
    f"lin{i}": {"kernel": common.conv_torch_to_flax(sd[f"lin{i}.model.1.weight"])}
    for i in range(len(expected))
  }


def load_params(
  vgg16: str | os.PathLike | Mapping[str, Any],
  heads: str | os.PathLike | Mapping[str, Any] | None = None,
  config: lpips_model.LPIPSConfig | None = None,
) -> dict[str, Any]:
  """LPIPS params from a torchvision VGG16 checkpoint (path or state dict) and the lpips
  linear heads (path or state dict; None = the file packaged with lpips). Float32 numpy,
  checked against ``lpips_model.abstract_params(config)``; ``config`` defaults to
  LPIPS-VGG v0.1."""
  config = config or lpips_model.LPIPSConfig()
  vgg_sd, vgg_source = _load(vgg16, "<vgg16 state dict>")
  heads_sd, heads_source = _load(
    default_heads_path() if heads is None else heads, "<lpips heads state dict>"
  )
  params = {"vgg": vgg16_torch_to_flax(vgg_sd, config.vgg, vgg_source)}
  params.update(heads_torch_to_flax(heads_sd, config, heads_source))
  return common.match_params(
    lpips_model.abstract_params(config), params, f"{vgg_source} + {heads_source}"
  )
