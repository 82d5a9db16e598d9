"""The Basel Face Model as Deep3DFaceRecon (D3DFR) ships it: ``BFM_model_front.mat``.

:func:`load_bfm` reads the file with ``scipy.io.loadmat`` into a :class:`MorphableModel`
(a frozen dataclass registered as a pytree, so it can be passed into jitted functions);
:func:`save_bfm_mat` writes a model back in the same format. The keys, shapes and the
two loader conventions (1-based index arrays, mean shape recentred by its vertex mean)
follow FACTS.md "Deep3DFaceRecon (D3DFR) conventions" and D3DFR's
``models/bfm.py:ParametricFaceModel.__init__``.

The BFM itself is licensed and not downloadable here (FACTS.md), so tests and the
synthetic dataset use :func:`synthetic_bfm`: a stand-in with the same arrays and
conventions, a face-like patch (the front of an ellipsoid with a nose bump, about 1.6
wide as D3DFR's BFM is, seen at camera distance 10), smooth random identity/expression/
texture bases, 68 keypoints placed on a landmark template, ``point_buf``, a front mask
and a skin mask, which :func:`save_bfm_mat` writes in the real file's format.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import scipy.io
import scipy.spatial

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


# ---- A synthetic stand-in for the BFM ----

# Half-width, half-height and depth of the ellipsoid the patch lies on (model units).
_HALF_WIDTH, _HALF_HEIGHT, _DEPTH = 0.8, 1.0, 0.6
_BASE_SCALE = {"id": 0.03, "exp": 0.02, "tex": 12.0}


def _hex_disc(num_points: int) -> np.ndarray:
  """The ``num_points`` sites of a unit-spacing triangular lattice nearest the centre,
  in an ellipse of aspect _HALF_WIDTH : _HALF_HEIGHT, scaled into the unit square."""
  aspect = _HALF_WIDTH / _HALF_HEIGHT
  radius = np.sqrt(num_points * np.sqrt(3) / 2 / (np.pi * aspect)) + 3
  rows = np.arange(-int(radius / (np.sqrt(3) / 2)) - 2, int(radius / (np.sqrt(3) / 2)) + 3)
  cols = np.arange(-int(radius * aspect) - 3, int(radius * aspect) + 4)
  jj, ii = np.meshgrid(cols, rows)
  x = jj + 0.5 * (ii % 2)
  y = ii * np.sqrt(3) / 2
  pts = np.stack([x.ravel(), y.ravel()], axis=1)
  r = np.hypot(pts[:, 0] / aspect, pts[:, 1])
  # Stable order: by elliptic radius, ties by angle, so the disc is deterministic.
  order = np.lexsort((np.arctan2(pts[:, 1], pts[:, 0]), np.round(r, 9)))[:num_points]
  pts = pts[order]
  return pts / np.abs(pts).max(axis=0)


def _triangulate(xy: np.ndarray, num_triangles: int | None) -> np.ndarray:
  """Delaunay triangles of the lattice disc, dropping the longest-edged ones (the
  slivers along the convex hull) down to ``num_triangles`` (default: drop every
  triangle whose longest edge exceeds 1.5 lattice spacings)."""
  tri = scipy.spatial.Delaunay(xy).simplices.astype(np.int64)
  p = xy[tri]
  longest = np.max(np.linalg.norm(p - np.roll(p, 1, axis=1), axis=-1), axis=1)
  if num_triangles is None:
    keep = np.sort(np.nonzero(longest <= 1.5 * np.median(longest))[0])
  else:
    if num_triangles > len(tri):
      raise ValueError(
        f"num_triangles={num_triangles}: a disc of {len(xy)} vertices has at most {len(tri)}"
      )
    keep = np.sort(np.argsort(longest, kind="stable")[:num_triangles])
  return tri[keep]


def _point_buf(num_vertices: int, tri: np.ndarray, width: int) -> np.ndarray:
  """(N, width) 0-based triangles around each vertex, padded with T (D3DFR's layout)."""
  vert = tri.ravel()
  face = np.repeat(np.arange(len(tri)), 3)
  order = np.lexsort((face, vert))
  vert, face = vert[order], face[order]
  first = np.searchsorted(vert, np.arange(num_vertices))
  slot = np.arange(len(vert)) - first[vert]
  ok = slot < width
  buf = np.full((num_vertices, width), len(tri), np.int64)
  buf[vert[ok], slot[ok]] = face[ok]
  return buf


def landmark_template() -> np.ndarray:
  """(68, 2) positions in [-1, 1]^2 (y up) in the iBUG 68-point order: jaw 17, brows
  5 + 5, nose bridge 4, nostrils 5, eyes 6 + 6, outer lips 12, inner lips 8."""

  def arc(cx, cy, rx, ry, a0, a1, n, endpoint=True):
    a = np.linspace(a0, a1, n, endpoint=endpoint)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)

  parts = [
    arc(0.0, 0.15, 0.85, 0.95, np.pi, 2 * np.pi, 17),  # jaw, right to left in the image
    arc(-0.4, 0.4, 0.25, 0.1, np.pi, 0.2 * np.pi, 5),  # brows
    arc(0.4, 0.4, 0.25, 0.1, 0.8 * np.pi, 0.0, 5),
    np.stack([np.zeros(4), np.linspace(0.3, -0.05, 4)], axis=1),  # nose bridge
    np.stack([np.linspace(-0.18, 0.18, 5), -0.12 - 0.04 * np.cos(np.linspace(-1, 1, 5))], 1),
    arc(-0.35, 0.22, 0.15, 0.07, np.pi, -np.pi, 6, endpoint=False),  # eyes
    arc(0.35, 0.22, 0.15, 0.07, np.pi, -np.pi, 6, endpoint=False),
    arc(0.0, -0.45, 0.32, 0.14, np.pi, -np.pi, 12, endpoint=False),  # lips
    arc(0.0, -0.45, 0.22, 0.05, np.pi, -np.pi, 8, endpoint=False),
  ]
  return np.concatenate(parts, axis=0)


def _smooth_bases(rng, xy: np.ndarray, count: int, channels: int, scale: float) -> np.ndarray:
  """(N * channels, count) random bases varying smoothly over the patch: each is a sum
  of three low-frequency cosines, each with a random direction over the channels.
  Column k is scaled by 1 / (1 + k / 8), as PCA bases decay, so unit-variance
  coefficients move a vertex by about 2 ``scale`` in all."""
  modes = 3
  freq = rng.normal(size=(count, modes, 2)) * 1.5
  phase = rng.uniform(0, 2 * np.pi, size=(count, modes))
  direction = rng.normal(size=(count, modes, channels))
  waves = np.cos(np.einsum("nd,kmd->nkm", xy, freq, optimize=True) + phase)
  decay = scale / np.sqrt(modes * channels) / (1 + np.arange(count) / 8)
  out = np.einsum("nkm,kmc->nck", waves, direction, optimize=True) * decay
  return out.reshape(len(xy) * channels, count)


def synthetic_bfm(
  num_vertices: int = 400, seed: int = 0, num_triangles: int | None = None
) -> MorphableModel:
  """A face-like synthetic morphable model with exactly ``num_vertices`` vertices.

  ``num_triangles`` (optional) sets the triangle count exactly, e.g. 35,709 vertices and
  70,789 triangles for a BFM-size mesh; it must not exceed what the Delaunay
  triangulation of the disc holds (about 2N). Bases are random (``seed``) but smooth.
  """
  if num_vertices < 16:
    raise ValueError(f"num_vertices={num_vertices}: need at least 16")
  if num_triangles is not None and num_triangles < 1:
    raise ValueError(f"num_triangles={num_triangles}: need at least 1")
  rng = np.random.default_rng(seed)
  xy = _hex_disc(num_vertices)
  tri = _triangulate(xy, num_triangles)
  # Orient every triangle counter-clockwise seen from +z (the camera side).
  p = xy[tri]
  cross = (p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1]) - (p[:, 1, 1] - p[:, 0, 1]) * (
    p[:, 2, 0] - p[:, 0, 0]
  )
  tri = np.where((cross < 0)[:, None], tri[:, [0, 2, 1]], tri)
  x, y = xy[:, 0] * 0.95, xy[:, 1] * 0.95
  z = _DEPTH * np.sqrt(np.clip(1 - x**2 - y**2, 0.05, None))
  z += 0.25 * np.exp(-((x / 0.12) ** 2 + ((y + 0.02) / 0.25) ** 2))  # nose
  shape = np.stack([_HALF_WIDTH * x, _HALF_HEIGHT * y, z], axis=1)
  skin_colour = np.array([200.0, 150.0, 130.0])
  tex = skin_colour + 20.0 * np.cos(3 * xy[:, :1] + np.array([0.0, 1.0, 2.0])) * y[:, None]
  valence = np.bincount(tri.ravel(), minlength=num_vertices)
  keypoints = np.argmin(
    np.linalg.norm(xy[None, :, :] - landmark_template()[:, None, :], axis=-1), axis=1
  )
  front = np.nonzero(np.hypot(x, y) < 0.8)[0]
  return MorphableModel(
    mean_shape=(shape - shape.mean(axis=0)).astype(np.float32),
    id_base=_smooth_bases(rng, xy, NUM_IDENTITY, 3, _BASE_SCALE["id"]).astype(np.float32),
    exp_base=_smooth_bases(rng, xy, NUM_EXPRESSION, 3, _BASE_SCALE["exp"]).astype(np.float32),
    mean_tex=tex.astype(np.float32),
    tex_base=_smooth_bases(rng, xy, NUM_TEXTURE, 3, _BASE_SCALE["tex"]).astype(np.float32),
    triangles=tri.astype(np.int32),
    point_buf=_point_buf(num_vertices, tri, max(8, int(valence.max()))).astype(np.int32),
    keypoints=keypoints.astype(np.int32),
    front_mask=front.astype(np.int32),
    skin_mask=(np.hypot(x, y) < 0.9).astype(np.float32),
  )
