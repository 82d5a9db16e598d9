"""The Basel Face Model as Deep3DFaceRecon (D3DFR) ships it: ``BFM_model_front.mat``.

:func:`load_bfm` reads the file with ``scipy.io.loadmat`` into a :class:`MorphableModel`
(a frozen dataclass registered as a pytree, so it can be passed into jitted functions);
:func:`save_bfm_mat` writes a model back in the same format. The keys, shapes and the
two loader conventions (1-based index arrays, mean shape recentred by its vertex mean)
follow FACTS.md "Deep3DFaceRecon (D3DFR) conventions" and D3DFR's
``models/bfm.py:ParametricFaceModel.__init__``.

The BFM itself is licensed and not downloadable here; tests and the synthetic dataset
use :func:`facediff.render.synthetic.synthetic_bfm`, saved in this same format.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import scipy.io

# The file's keys. 1-based index arrays are shifted to 0-based on load.
SHAPE_KEYS = ("meanshape", "idBase", "exBase")
TEXTURE_KEYS = ("meantex", "texBase")
INDEX_KEYS = ("tri", "point_buf", "keypoints", "frontmask2_idx")
REQUIRED_KEYS = SHAPE_KEYS + TEXTURE_KEYS + INDEX_KEYS + ("skinmask",)

NUM_IDENTITY = 80
NUM_EXPRESSION = 64
NUM_TEXTURE = 80
NUM_KEYPOINTS = 68


@dataclasses.dataclass(frozen=True)
class MorphableModel:
  """A 3D morphable model in D3DFR's layout (N vertices, T triangles), 0-based indices.

  Attributes:
    mean_shape: (N, 3) float32, recentred so its vertex mean is 0.
    id_base: (3N, 80) float32; rows are xyz-interleaved per vertex.
    exp_base: (3N, 64) float32.
    mean_tex: (N, 3) float32 albedo in 0-255 units.
    tex_base: (3N, 80) float32, 0-255 units.
    triangles: (T, 3) int32 vertex indices.
    point_buf: (N, K) int32 indices of the triangles around each vertex (K = 8 in the
      BFM); the padding value is T, which indexes an appended zero face normal.
    keypoints: (68,) int32 vertex indices of the 68 landmarks.
    front_mask: (M,) int32 vertex indices of the small face region (D3DFR's
      ``frontmask2_idx``, used for its photometric loss).
    skin_mask: (N,) float32 skin-region indicator (D3DFR's ``skinmask``).
  """

  mean_shape: Any
  id_base: Any
  exp_base: Any
  mean_tex: Any
  tex_base: Any
  triangles: Any
  point_buf: Any
  keypoints: Any
  front_mask: Any
  skin_mask: Any

  @property
  def num_vertices(self) -> int:
    return int(self.mean_shape.shape[0])

  @property
  def num_triangles(self) -> int:
    return int(self.triangles.shape[0])


jax.tree_util.register_dataclass(
  MorphableModel,
  data_fields=[f.name for f in dataclasses.fields(MorphableModel)],
  meta_fields=[],
)


def _flat(path: str, key: str, arr: np.ndarray, size: int) -> np.ndarray:
  """A (1, size) or (size, 1) array (MATLAB keeps vectors 2-D) as a 1-D array."""
  if arr.ndim > 2 or arr.size != size or (arr.ndim == 2 and min(arr.shape) != 1):
    raise ValueError(
      f"{path}: key '{key}' has shape {arr.shape}, expected (1, {size}) or ({size}, 1)"
    )
  return arr.reshape(-1)


def _matrix(path: str, key: str, arr: np.ndarray, rows: int | None, cols: int | None):
  if (
    arr.ndim != 2
    or (rows is not None and arr.shape[0] != rows)
    or (cols is not None and arr.shape[1] != cols)
  ):
    want = f"({'N' if rows is None else rows}, {'K' if cols is None else cols})"
    raise ValueError(f"{path}: key '{key}' has shape {arr.shape}, expected {want}")
  return arr


def _indices(path: str, key: str, arr: np.ndarray, upper: int) -> np.ndarray:
  """1-based MATLAB indices in [1, upper] to 0-based int32 (FACTS.md: loader subtracts 1)."""
  arr = np.asarray(arr)
  if arr.size and (arr.min() < 1 or arr.max() > upper):
    raise ValueError(
      f"{path}: key '{key}' holds indices in [{arr.min()}, {arr.max()}], "
      f"expected 1-based indices in [1, {upper}]"
    )
  return (arr.astype(np.int64) - 1).astype(np.int32)


def model_from_mat_dict(mat: dict, path: str = "<dict>", recenter: bool = True) -> MorphableModel:
  """Validates and converts the arrays of a ``BFM_model_front.mat`` (D3DFR layout).

  Following D3DFR ``ParametricFaceModel.__init__``: index arrays are 1-based and are
  shifted by -1; with ``recenter`` the mean shape has its vertex mean subtracted.
  Errors name ``path`` and the key at fault.
  """
  missing = [k for k in REQUIRED_KEYS if k not in mat]
  if missing:
    raise KeyError(f"{path}: missing key(s) {missing}; a BFM_model_front.mat holds {REQUIRED_KEYS}")
  arrs = {k: np.asarray(mat[k]) for k in REQUIRED_KEYS}
  n3 = arrs["meanshape"].size
  if n3 % 3 or n3 == 0:
    raise ValueError(f"{path}: key 'meanshape' has {n3} values, expected 3N (xyz per vertex)")
  n = n3 // 3
  mean_shape = _flat(path, "meanshape", arrs["meanshape"], n3).astype(np.float64).reshape(n, 3)
  if recenter:
    mean_shape = mean_shape - mean_shape.mean(axis=0, keepdims=True)
  mean_tex = _flat(path, "meantex", arrs["meantex"], n3).reshape(n, 3)
  id_base = _matrix(path, "idBase", arrs["idBase"], n3, NUM_IDENTITY)
  exp_base = _matrix(path, "exBase", arrs["exBase"], n3, NUM_EXPRESSION)
  tex_base = _matrix(path, "texBase", arrs["texBase"], n3, NUM_TEXTURE)
  tri = _matrix(path, "tri", arrs["tri"], None, 3)
  num_tri = tri.shape[0]
  point_buf = _matrix(path, "point_buf", arrs["point_buf"], n, None)
  keypoints = _flat(path, "keypoints", arrs["keypoints"], NUM_KEYPOINTS)
  front = arrs["frontmask2_idx"]
  if front.ndim > 2 or (front.ndim == 2 and min(front.shape) != 1):
    raise ValueError(f"{path}: key 'frontmask2_idx' has shape {front.shape}, expected a vector")
  skin = _flat(path, "skinmask", arrs["skinmask"], n)
  f32 = np.float32
  return MorphableModel(
    mean_shape=mean_shape.astype(f32),
    id_base=id_base.astype(f32),
    exp_base=exp_base.astype(f32),
    mean_tex=mean_tex.astype(f32),
    tex_base=tex_base.astype(f32),
    triangles=_indices(path, "tri", tri, n),
    # point_buf's padding is T + 1 (1-based), i.e. T after the shift: the zero normal.
    point_buf=_indices(path, "point_buf", point_buf, num_tri + 1),
    keypoints=_indices(path, "keypoints", keypoints, n),
    front_mask=_indices(path, "frontmask2_idx", front.reshape(-1), n),
    skin_mask=skin.astype(f32),
  )


def load_bfm(path: str | os.PathLike, recenter: bool = True) -> MorphableModel:
  """Loads D3DFR's ``BFM_model_front.mat`` (or a file written by :func:`save_bfm_mat`)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such BFM file (expected D3DFR's BFM_model_front.mat)")
  try:
    mat = scipy.io.loadmat(path)
  except (ValueError, TypeError, OSError) as e:
    raise ValueError(f"{path}: not a readable MATLAB .mat file ({e})") from e
  return model_from_mat_dict(mat, path=path, recenter=recenter)


def to_mat_dict(model: MorphableModel) -> dict[str, np.ndarray]:
  """The arrays of ``model`` in the file's layout: 1-based indices, (1, 3N) vectors."""
  n = model.num_vertices
  return {
    "meanshape": np.asarray(model.mean_shape, np.float32).reshape(1, 3 * n),
    "meantex": np.asarray(model.mean_tex, np.float32).reshape(1, 3 * n),
    "idBase": np.asarray(model.id_base, np.float32),
    "exBase": np.asarray(model.exp_base, np.float32),
    "texBase": np.asarray(model.tex_base, np.float32),
    "tri": np.asarray(model.triangles, np.int32) + 1,
    "point_buf": np.asarray(model.point_buf, np.int32) + 1,
    "keypoints": np.asarray(model.keypoints, np.int32).reshape(1, -1) + 1,
    "frontmask2_idx": np.asarray(model.front_mask, np.int32).reshape(-1, 1) + 1,
    "skinmask": np.asarray(model.skin_mask, np.float32).reshape(1, n),
  }


def save_bfm_mat(path: str | os.PathLike, model: MorphableModel) -> None:
  """Writes ``model`` as a ``BFM_model_front.mat`` that :func:`load_bfm` (and D3DFR) reads."""
  scipy.io.savemat(os.fspath(path), to_mat_dict(model), do_compression=False)
