"""pytorch-fid's FID Inception state dict <-> facediff ``FIDInceptionV3`` params.

The source is the file pytorch-fid downloads, ``pt_inception-2015-12-05-6726825d.pth``
(the TF ``inception-2015-12-05`` graph in torchvision's ``Inception3`` layout, 1008-class
``fc``, no ``AuxLogits``), read with ``torch.load(weights_only=True)`` (torch imported only
while reading; ``.safetensors`` copies need no torch). A state dict already in memory
(tensors or arrays) works too.

Keys map one to one: the flax module path is the torch key's with ``/`` for ``.``
(``Mixed_6b.branch7x7_2.conv.weight`` <-> ``Mixed_6b/branch7x7_2/conv/kernel``). Conv
weights (O, I, kh, kw) <-> kernels (kh, kw, I, O); ``fc.weight`` (classes, 2048) <->
``fc/kernel`` (2048, classes); BatchNorm ``weight``, ``bias``, ``running_mean``,
``running_var`` <-> ``scale``, ``bias``, ``mean``, ``var``. ``num_batches_tracked`` is
dropped, a DataParallel ``module.`` prefix stripped. Matching is strict: one
``common.StateDictMismatchError`` names the file and every missing, unexpected or
mis-shaped key (with a note when the file looks like torchvision's ImageNet Inception-v3,
whose features are not FID's).

Entry points: ``torch_to_flax(checkpoint, config)``, ``load(checkpoint)`` (config
inferred from the shapes), ``flax_to_torch(params)``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import numpy as np

from facediff.convert import common
from facediff.models import inception

_LEAF_TO_TORCH = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
_IGNORED_SUFFIX = ".num_batches_tracked"
STEM_KEY = "Conv2d_1a_3x3.conv.weight"
FC_KEY = "fc.weight"


def torch_key(flax_key: str) -> str:
  """``Mixed_5b/branch1x1/bn/mean`` -> ``Mixed_5b.branch1x1.bn.running_mean``."""
  *modules, leaf = flax_key.split(common.SEP)
  return ".".join(modules + [_LEAF_TO_TORCH[leaf]])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:  # conv (kh, kw, I, O) -> (O, I, kh, kw)
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape[::-1])  # dense (in, out) -> (out, in); vectors unchanged


@functools.lru_cache(maxsize=8)
def _flat_abstract(config: inception.InceptionConfig) -> dict[str, Any]:
  """{flat flax key: ShapeDtypeStruct}; the input side and dtype do not change the params."""
  shape_only = dataclasses.replace(config, image_size=inception.FID_IMAGE_SIZE, dtype="float32")
  return common.flatten_params(inception.abstract_params(shape_only))


def expected_torch_shapes(config: inception.InceptionConfig) -> dict[str, tuple[int, ...]]:
  """{torch key: shape} of the state dict that fits ``config`` (no ``num_batches_tracked``)."""
  return {torch_key(k): _torch_shape(tuple(v.shape)) for k, v in _flat_abstract(config).items()}


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor
    v = v.detach().cpu()
    if v.is_floating_point():
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def read_checkpoint(
  checkpoint: str | os.PathLike | Mapping[str, Any], source: str | None = None
) -> tuple[dict[str, np.ndarray], str]:
  """(state dict as numpy, name for errors) from a ``.pth`` / ``.pt`` / ``.safetensors``
  path or a state dict; drops ``num_batches_tracked`` and a ``module.`` prefix."""
  if isinstance(checkpoint, (str, os.PathLike)):
    source = source or os.fspath(checkpoint)
    state = common.read_state_dict(checkpoint)
  elif isinstance(checkpoint, Mapping):
    source = source or "<FID Inception state dict>"
    state = {str(k): _to_numpy(v) for k, v in checkpoint.items()}
  else:
    raise TypeError(
      f"an FID Inception checkpoint is a path or a state dict, got {type(checkpoint).__name__}"
    )
  state = {
    (k[len("module.") :] if k.startswith("module.") else k): v
    for k, v in state.items()
    if not k.endswith(_IGNORED_SUFFIX)
  }
  return state, source


def infer_config(
  state: Mapping[str, Any], source: str = "<FID Inception state dict>", **overrides
) -> inception.InceptionConfig:
  """The config a state dict fits: ``width_divisor`` = 32 / the stem conv's output
  channels, ``num_classes`` = the fc's rows. ``overrides``: other config fields
  (``dtype``, ``image_size``, ``resize_input``)."""
  for key in (STEM_KEY, FC_KEY):
    if key not in state:
      raise ValueError(f"{source}: no {key!r}: not an Inception-v3 state dict")
  stem = int(np.shape(state[STEM_KEY])[0])
  if stem < 1 or 32 % stem:
    raise ValueError(f"{source}: {STEM_KEY} has {stem} output channels; the network has 32")
  try:
    return inception.InceptionConfig(
      width_divisor=32 // stem, num_classes=int(np.shape(state[FC_KEY])[0]), **overrides
    )
  except ValueError as e:
    raise ValueError(f"{source}: cannot infer the Inception shape: {e}") from e


def _imagenet_note(state: Mapping[str, Any]) -> str | None:
  """A hint when the file is torchvision's ImageNet ``inception_v3`` instead."""
  aux = any(k.startswith("AuxLogits.") for k in state)
  classes = np.shape(state[FC_KEY])[0] if FC_KEY in state else None
  if aux or classes == 1000:
    return (
      "this looks like torchvision's ImageNet inception_v3 (AuxLogits / 1000 classes), not "
      "the FID Inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, 1008 classes); "
      "its features do not give comparable FIDs"
    )
  return None


def torch_to_flax(
  checkpoint: str | os.PathLike | Mapping[str, Any],
  config: inception.InceptionConfig | None = None,
  source: str | None = None,
) -> dict[str, Any]:
  """An FID Inception checkpoint (path or state dict) -> ``FIDInceptionV3`` params
  (nested float32 numpy dict). ``config`` defaults to the FID network. Raises
  ``common.StateDictMismatchError`` naming the file (or ``source``) and every missing,
  unexpected or mis-shaped torch key."""
  config = config or inception.InceptionConfig()
  state, source = read_checkpoint(checkpoint, source)
  want = expected_torch_shapes(config)
  missing = [k for k in want if k not in state]
  unexpected = [k for k in state if k not in want]
  mismatched = [
    (k, want[k], tuple(np.shape(state[k])))
    for k in want
    if k in state and tuple(np.shape(state[k])) != want[k]
  ]
  if missing or unexpected or mismatched:
    err = common.StateDictMismatchError(source, missing, unexpected, mismatched)
    note = _imagenet_note(state)
    if note:
      err.add_note(f"{source}: {note}")
    raise err
  flat = {}
  for fkey in _flat_abstract(config):
    w = np.asarray(state[torch_key(fkey)], np.float32)
    if fkey.endswith("/kernel"):
      w = common.conv_torch_to_flax(w) if w.ndim == 4 else common.linear_torch_to_flax(w)
    flat[fkey] = w
  return common.match_params(_flat_abstract(config), flat, source)


def load(
  checkpoint: str | os.PathLike | Mapping[str, Any],
  config: inception.InceptionConfig | None = None,
  source: str | None = None,
  **overrides,
) -> tuple[inception.InceptionConfig, dict[str, Any]]:
  """(config, params) from a checkpoint; the config is inferred from the shapes when None
  (``overrides``: its other fields, e.g. ``dtype="bfloat16"``)."""
  state, source = read_checkpoint(checkpoint, source)
  config = config or infer_config(state, source, **overrides)
  return config, torch_to_flax(state, config, source)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``FIDInceptionV3`` params -> the torch state dict (float32 numpy, contiguous; without
  ``num_batches_tracked``)."""
  out = {}
  for fkey, w in common.flatten_params(params).items():
    w = np.asarray(w, np.float32)
    if fkey.endswith("/kernel"):
      w = common.conv_flax_to_torch(w) if w.ndim == 4 else common.linear_flax_to_torch(w)
    out[torch_key(fkey)] = np.ascontiguousarray(w)
  return out
