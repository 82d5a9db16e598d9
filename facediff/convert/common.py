"""Shared helpers for importing / exporting PyTorch checkpoints.

* ``read_state_dict(path)``: {name: np.ndarray} from .safetensors (no torch needed) or
  .bin / .pt / .pth / .ckpt (``torch.load(weights_only=True)``; torch imported lazily).
* Layout helpers: torch conv (O, I, H, W) <-> flax (H, W, I, O); torch linear (out, in)
  <-> flax (in, out).
* ``torch_key_to_flax_path`` / ``flax_path_to_torch_key``: the generic renaming used for
  diffusers-style modules, whose flax twins (facediff.models) use the same module
  names with list items written ``<list>_<index>`` (``down_blocks.0`` -> ``down_blocks_0``).
* ``torch_to_flax_generic`` / ``flax_to_torch_generic``: rename + relayout a whole dict.
* ``match_params``: strict matcher against the expected flax param tree that raises ONE
  ``StateDictMismatchError`` listing all missing, unexpected and mis-shaped keys.
* ``flatten_params`` / ``unflatten_params``: nested dict <-> {"a/b/c": array}.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np

SEP = "/"


class StateDictMismatchError(ValueError):
  """A checkpoint does not fit the model: lists every missing / unexpected / mis-shaped key."""

  def __init__(self, source: str, missing=(), unexpected=(), mismatched=()):
    self.source = source
    self.missing = sorted(missing)
    self.unexpected = sorted(unexpected)
    self.mismatched = sorted(mismatched)  # (key, expected_shape, got_shape)
    lines = [f"checkpoint {source!r} does not match the model:"]
    if self.missing:
      lines.append(f"  {len(self.missing)} missing key(s):")
      lines += [f"    {k}" for k in self.missing]
    if self.unexpected:
      lines.append(f"  {len(self.unexpected)} unexpected key(s):")
      lines += [f"    {k}" for k in self.unexpected]
    if self.mismatched:
      lines.append(f"  {len(self.mismatched)} mis-shaped key(s) (expected vs got):")
      lines += [f"    {k}: expected {tuple(e)}, got {tuple(g)}" for k, e, g in self.mismatched]
    super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- reading


def _torch_tensor_to_numpy(t) -> np.ndarray:
  import torch  # noqa: PLC0415  (lazy: torch is optional)

  t = t.detach().cpu()
  if t.dtype in (torch.bfloat16, torch.float16):
    t = t.float()
  return t.numpy()


def _safetensors_header(path: str) -> dict:
  import json  # noqa: PLC0415
  import struct  # noqa: PLC0415

  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError("file too short for a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > os.path.getsize(path):
      raise ValueError("header length exceeds file size")
    header = json.loads(f.read(n))
  header["__data_start__"] = {"offset": 8 + n}
  return header


def _read_bf16(path: str, header: dict, key: str) -> np.ndarray:
  """bfloat16 tensor -> float32 (numpy has no bfloat16: widen the 16 high bits)."""
  info = header[key]
  start, end = info["data_offsets"]
  with open(path, "rb") as f:
    f.seek(header["__data_start__"]["offset"] + start)
    raw = np.frombuffer(f.read(end - start), dtype="<u2")
  return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch-style state dict into {name: np.ndarray}.

  ``.safetensors`` is read with safetensors (numpy; bfloat16/float16 come back as
  float32). ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` use ``torch.load(weights_only=True)``
  (torch imported only here). A checkpoint whose top level holds a ``state_dict``
  entry (CompVis / Lightning ``.ckpt``) is unwrapped; non-tensor entries are dropped.
  Raises FileNotFoundError / ValueError naming the file when it is missing or unreadable.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    try:
      from safetensors import safe_open  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover
      raise ImportError("reading .safetensors needs the 'safetensors' package") from e
    out: dict[str, np.ndarray] = {}
    try:
      header = _safetensors_header(path)
      with safe_open(path, framework="np") as f:
        for k in f.keys():
          if header.get(k, {}).get("dtype") == "BF16":
            out[k] = _read_bf16(path, header, k)
            continue
          a = f.get_tensor(k)
          if a.dtype == np.float16:
            a = a.astype(np.float32)
          out[k] = np.asarray(a)
    except Exception as e:  # safetensors raises its own error types
      raise ValueError(f"cannot read safetensors file {path}: {e}") from e
    return out
  if ext in (".bin", ".pt", ".pth", ".ckpt"):
    try:
      import torch  # noqa: PLC0415
    except ImportError as e:
      raise ImportError(
        f"reading {path} (a PyTorch pickle) needs torch; install it or convert the file "
        "to .safetensors"
      ) from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise ValueError(f"cannot read PyTorch checkpoint {path}: {e}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return {
      str(k): _torch_tensor_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)
    }
  raise ValueError(
    f"unsupported checkpoint extension {ext!r} for {path} "
    "(expected .safetensors, .bin, .pt, .pth or .ckpt)"
  )


def write_safetensors(
  state_dict: Mapping[str, np.ndarray],
  path: str | os.PathLike,
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes {name: array} to a .safetensors file (contiguous float/int numpy arrays)."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
  save_file(arrays, os.fspath(path), metadata=dict(metadata or {"format": "pt"}))


# ----------------------------------------------------------------------------- layouts


def conv_torch_to_flax(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (O, I, kh, kw) -> flax kernel (kh, kw, I, O)."""
  return np.transpose(w, (2, 3, 1, 0))


def conv_flax_to_torch(k: np.ndarray) -> np.ndarray:
  """flax conv kernel (kh, kw, I, O) -> torch Conv2d weight (O, I, kh, kw)."""
  return np.transpose(k, (3, 2, 0, 1))


def linear_torch_to_flax(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> flax Dense kernel (in, out)."""
  return np.transpose(w)


def linear_flax_to_torch(k: np.ndarray) -> np.ndarray:
  """flax Dense kernel (in, out) -> torch Linear weight (out, in)."""
  return np.transpose(k)


# ----------------------------------------------------------------------------- trees


def _unbox(x):
  # flax.linen.LogicallyPartitioned (and other flax.core.meta boxes) -> value
  return x.unbox() if hasattr(x, "unbox") and callable(x.unbox) else x


def flatten_params(tree: Mapping[str, Any], sep: str = SEP) -> dict[str, Any]:
  """Nested dict (flax params; logical-partitioning boxes are unboxed) -> {"a/b/c": leaf}."""
  out: dict[str, Any] = {}

  def rec(node, prefix):
    node = _unbox(node)
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(v, f"{prefix}{sep}{k}" if prefix else str(k))
    else:
      out[prefix] = node

  rec(tree, "")
  return out


def unflatten_params(flat: Mapping[str, Any], sep: str = SEP) -> dict[str, Any]:
  """{"a/b/c": leaf} -> nested dict of plain dicts."""
  out: dict[str, Any] = {}
  for key, v in flat.items():
    parts = key.split(sep)
    node = out
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"key {key!r} conflicts with a leaf at {p!r}")
    node[parts[-1]] = v
  return out


def match_params(
  expected: Mapping[str, Any],
  converted: Mapping[str, Any],
  source: str,
  *,
  dtype=np.float32,
) -> dict[str, Any]:
  """Checks a converted param dict against the expected flax param tree, strictly.

  ``expected``: nested params or their ``jax.eval_shape`` (anything with ``.shape``;
  boxes are unboxed). ``converted``: nested dict or flat {"a/b/c": array}.
  Returns the nested params (numpy, cast to ``dtype``) in the expected structure.
  Raises ``StateDictMismatchError`` naming ``source`` and listing every missing,
  unexpected and mis-shaped key at once.
  """
  exp_flat = flatten_params(expected)
  got_flat = (
    dict(converted)
    if all(not isinstance(v, Mapping) for v in converted.values())
    else flatten_params(converted)
  )
  missing = [k for k in exp_flat if k not in got_flat]
  unexpected = [k for k in got_flat if k not in exp_flat]
  mismatched = [
    (k, tuple(exp_flat[k].shape), tuple(np.shape(got_flat[k])))
    for k in exp_flat
    if k in got_flat and tuple(exp_flat[k].shape) != tuple(np.shape(got_flat[k]))
  ]
  if missing or unexpected or mismatched:
    raise StateDictMismatchError(source, missing, unexpected, mismatched)
  return unflatten_params({k: np.asarray(got_flat[k], dtype=dtype) for k in exp_flat})


# ----------------------------------------------------------------------------- renaming

# Module-list names used by diffusers' UNet / VAE / transformer blocks.
DIFFUSERS_LIST_NAMES = (
  "down_blocks",
  "up_blocks",
  "resnets",
  "attentions",
  "downsamplers",
  "upsamplers",
  "transformer_blocks",
  "net",
  "to_out",
  "layers",
  "mid_blocks",
)


def torch_key_to_flax_path(key: str) -> tuple[str, str]:
  """``down_blocks.0.resnets.1.conv1.weight`` -> (``down_blocks_0/resnets_1/conv1``, ``weight``).

  Every numeric segment is joined to the segment before it with ``_``. Returns the
  flax module path and the torch parameter name (``weight`` / ``bias`` / other).
  """
  parts = key.split(".")
  merged: list[str] = []
  for p in parts[:-1]:
    if p.isdigit() and merged:
      merged[-1] = f"{merged[-1]}_{p}"
    else:
      merged.append(p)
  return SEP.join(merged), parts[-1]


def flax_path_to_torch_key(
  path: str, param: str, list_names: Iterable[str] = DIFFUSERS_LIST_NAMES
) -> str:
  """Inverse of ``torch_key_to_flax_path`` for module lists named in ``list_names``:
  (``down_blocks_0/resnets_1/conv1``, ``weight``) -> ``down_blocks.0.resnets.1.conv1.weight``.
  """
  pat = re.compile(r"^(" + "|".join(map(re.escape, list_names)) + r")_(\d+)$")
  segs = []
  for s in path.split(SEP):
    m = pat.match(s)
    segs.append(f"{m.group(1)}.{m.group(2)}" if m else s)
  return ".".join(segs + [param])


def torch_to_flax_generic(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames + relayouts a diffusers-style state dict into flat flax params.

  ``weight`` of rank 4 -> conv ``kernel`` (HWIO); rank 2 -> dense ``kernel`` (in, out);
  rank 1 -> norm ``scale``; ``bias`` -> ``bias``. Other names are kept as they are
  (so that the strict matcher reports them as unexpected).
  """
  out: dict[str, np.ndarray] = {}
  for key, w in state_dict.items():
    path, param = torch_key_to_flax_path(key)
    w = np.asarray(w)
    if param == "weight":
      if w.ndim == 4:
        name, w = "kernel", conv_torch_to_flax(w)
      elif w.ndim == 2:
        name, w = "kernel", linear_torch_to_flax(w)
      elif w.ndim == 1:
        name = "scale"
      else:
        name = "weight"
    else:
      name = param
    flat_key = f"{path}{SEP}{name}" if path else name
    if flat_key in out:
      raise ValueError(f"two checkpoint keys map to the same flax parameter {flat_key!r}")
    out[flat_key] = w
  return out


def flax_to_torch_generic(
  params: Mapping[str, Any], list_names: Iterable[str] = DIFFUSERS_LIST_NAMES
) -> dict[str, np.ndarray]:
  """Inverse of ``torch_to_flax_generic``: nested (or flat) flax params -> torch-style dict
  (float32 numpy, contiguous)."""
  flat = (
    flatten_params(params) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
  )
  list_names = tuple(list_names)
  out: dict[str, np.ndarray] = {}
  for key, v in flat.items():
    path, _, name = key.rpartition(SEP)
    v = np.asarray(v, dtype=np.float32)
    if name == "kernel":
      param, v = "weight", (conv_flax_to_torch(v) if v.ndim == 4 else linear_flax_to_torch(v))
    elif name == "scale":
      param = "weight"
    else:
      param = name
    out[flax_path_to_torch_key(path, param, list_names)] = np.ascontiguousarray(v)
  return out


def find_weights(folder: str, stems: tuple[str, ...], variant: str | None = None) -> list[str]:
  """The weight file(s) of one component: ``<stem>[.variant].safetensors`` or ``.bin``,
  or the shards listed in a ``*.index.json``. Safetensors is preferred."""
  tried = []
  for ext in ("safetensors", "bin"):
    for stem in stems:
      name = stem if variant is None else f"{stem}.{variant}"
      single = os.path.join(folder, f"{name}.{ext}")
      tried.append(os.path.basename(single))
      if os.path.isfile(single):
        return [single]
      index = single + ".index.json"
      if os.path.isfile(index):
        try:
          with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
          raise ValueError(f"cannot read shard index {index}: {e}") from e
        files = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
        for s in files:
          if not os.path.isfile(s):
            raise FileNotFoundError(f"shard {s} listed in {index} does not exist")
        return files
  raise FileNotFoundError(f"no weights in {folder}: tried {', '.join(tried)} (and sharded indexes)")
