"""facenet-pytorch InceptionResnetV1 and facediff DLN state dicts <-> facediff params.

* ``facenet_from_torch(sd_or_path, config)``: a facenet-pytorch ``InceptionResnetV1``
  state dict (e.g. the released ``20180402-114759-vggface2.pt``) -> params of
  ``facediff.models.facenet.InceptionResnetV1``. The classifier ``logits.*`` that the
  released files carry is dropped (the embedding network does not use it).
* ``dln_from_torch(sd_or_path, config)``: facediff's DLN checkpoint (keys ``face.*``,
  ``id.*`` with InceptionResnetV1 names, ``proj.weight`` (16, 1024), ``proj.bias``; the
  layout of ``data_pipelines/encoders/dln.py``) -> params of ``facediff.models.dln.DLN``.
* ``params_to_torch(params)``: either model's params -> the matching torch state dict.

Keys map one to one: flax module paths are torch's with ``/`` for ``.`` and
``nn.Sequential`` items written ``<name>_<index>`` (``repeat_1.0.branch1.1.conv.weight``
<-> ``repeat_1_0/branch1_1/conv/kernel``). Conv weights (O, I, kh, kw) <-> kernels
(kh, kw, I, O); Linear weights (out, in) <-> (in, out); BatchNorm ``weight``, ``bias``,
``running_mean``, ``running_var`` <-> ``scale``, ``bias``, ``mean``, ``var``
(``num_batches_tracked`` is dropped). Matching is strict: one
``common.StateDictMismatchError`` names the file and every missing, unexpected or
mis-shaped torch key.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from facediff.convert import common
from facediff.models import dln, facenet

# Torch ``nn.Sequential`` attributes of InceptionResnetV1: their items are "<name>.<i>".
_SEQUENTIALS = ("repeat_1", "repeat_2", "repeat_3", "branch0", "branch1", "branch2")
_ITEM = re.compile(r"^(" + "|".join(_SEQUENTIALS) + r")_(\d+)$")
# flax leaf name -> torch parameter / buffer name
_LEAF_TO_TORCH = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
# Classifier of facenet-pytorch's released checkpoints (not part of the embedding net).
FACENET_CLASSIFIER_PREFIX = "logits."

StateDictLike = Mapping[str, Any] | str | os.PathLike


def torch_key(flax_path: str) -> str:
  """``repeat_1_0/branch1_1/conv/kernel`` -> ``repeat_1.0.branch1.1.conv.weight``."""
  *modules, leaf = flax_path.split(common.SEP)
  segs = []
  for m in modules:
    item = _ITEM.match(m)
    segs.append(f"{item.group(1)}.{item.group(2)}" if item else m)
  return ".".join(segs + [_LEAF_TO_TORCH[leaf]])


def _to_torch(leaf: str, a: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    return common.conv_flax_to_torch(a) if a.ndim == 4 else common.linear_flax_to_torch(a)
  return a


def _from_torch(leaf: str, a: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    return common.conv_torch_to_flax(a) if a.ndim == 4 else common.linear_torch_to_flax(a)
  return a


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel":
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
  return tuple(shape)


def _read(sd_or_path: StateDictLike, source: str | None) -> tuple[dict[str, np.ndarray], str]:
  """{key: numpy} from a state dict (torch tensors or arrays) or a checkpoint file; strips
  DataParallel's ``module.`` prefix. Returns it with the name errors should use."""
  if isinstance(sd_or_path, (str, os.PathLike)):
    path = os.fspath(sd_or_path)
    sd, source = common.read_state_dict(path), source or path
  else:
    sd, source = sd_or_path, source or "<state dict>"
  out = {}
  for k, v in sd.items():
    if hasattr(v, "detach"):  # a torch tensor
      v = v.detach().cpu().float().numpy()
    out[k[len("module.") :] if k.startswith("module.") else k] = np.asarray(v)
  return out, source


def _convert(
  sd: Mapping[str, np.ndarray], abstract, source: str, ignore: tuple[str, ...] = ()
) -> dict[str, Any]:
  """Strict torch -> flax conversion against the expected (abstract) param tree."""
  exp_shapes = {p: tuple(s.shape) for p, s in common.flatten_params(abstract).items()}
  expected = {torch_key(p): p for p in exp_shapes}
  bn_modules = {k[: -len("running_mean")] for k in expected if k.endswith(".running_mean")}
  given = {
    k: v
    for k, v in sd.items()
    if not k.startswith(ignore)
    and not (k.endswith(".num_batches_tracked") and k[: -len("num_batches_tracked")] in bn_modules)
  }
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  mismatched = []
  for k, path in expected.items():
    leaf = path.rsplit(common.SEP, 1)[-1]
    want = _torch_shape(leaf, exp_shapes[path])
    if k in given and tuple(given[k].shape) != want:
      mismatched.append((k, want, tuple(given[k].shape)))
  if missing or unexpected or mismatched:
    raise common.StateDictMismatchError(source, missing, unexpected, mismatched)
  flat = {
    path: np.asarray(_from_torch(path.rsplit(common.SEP, 1)[-1], given[k]), np.float32)
    for k, path in expected.items()
  }
  return common.unflatten_params(flat)


def facenet_from_torch(
  sd_or_path: StateDictLike,
  config: facenet.FaceNetConfig | None = None,
  source: str | None = None,
) -> dict[str, Any]:
  """facenet-pytorch InceptionResnetV1 state dict (or a .pt/.pth/.safetensors file) ->
  nested numpy params for ``facenet.InceptionResnetV1(config)`` (default: the
  released network's config). ``logits.*`` is dropped.
  Raises ``common.StateDictMismatchError`` naming the file and the torch keys at fault."""
  sd, source = _read(sd_or_path, source)
  abstract = facenet.abstract_params(config or facenet.FaceNetConfig())
  return _convert(sd, abstract, source, (FACENET_CLASSIFIER_PREFIX,))


def dln_from_torch(
  sd_or_path: StateDictLike,
  config: dln.DLNConfig | None = None,
  source: str | None = None,
) -> dict[str, Any]:
  """facediff DLN state dict (``face.*``, ``id.*``, ``proj.weight``, ``proj.bias``) or a
  file holding one -> nested numpy params for ``dln.DLN(config)``. Strict, like
  ``facenet_from_torch`` (a branch's ``logits.*`` is unexpected here)."""
  sd, source = _read(sd_or_path, source)
  return _convert(sd, dln.abstract_params(config or dln.DLNConfig()), source)


def params_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """InceptionResnetV1 or DLN params -> the torch state dict (float32 numpy; each
  BatchNorm also gets ``num_batches_tracked`` = 0, so torch loads it strictly)."""
  out = {}
  for path, v in common.flatten_params(params).items():
    leaf = path.rsplit(common.SEP, 1)[-1]
    key = torch_key(path)
    out[key] = np.ascontiguousarray(_to_torch(leaf, np.asarray(v, np.float32)))
    if leaf == "mean":
      out[key[: -len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
  return out
