"""A small synthetic morphable model in D3DFR's layout, for tests and synthetic data.

The real BFM is licensed and not available here (FACTS.md), so tests build a stand-in
with the same arrays and conventions: a face-like patch (the front of an ellipsoid with
a nose bump, unit scale close to D3DFR's BFM: about 1.6 wide at camera distance 10),
smooth random identity/expression/texture bases, 68 keypoints placed on a landmark
template, ``point_buf``, a front mask and a skin mask. It can be saved with
:func:`facediff.render.bfm.save_bfm_mat` and loaded back with ``load_bfm``.
"""

from __future__ import annotations

import numpy as np
import scipy.spatial

from facediff.render import bfm

# Half-width, half-height and depth of the ellipsoid the patch lies on (model units).
_HALF_WIDTH, _HALF_HEIGHT, _DEPTH = 0.8, 1.0, 0.6
_BASE_SCALE = {"id": 0.03, "exp": 0.02, "tex": 12.0}


def _hex_disc(num_points: int) -> np.ndarray:
  """The ``num_points`` sites of a unit-spacing triangular lattice nearest the centre,
  in an ellipse of aspect _HALF_WIDTH : _HALF_HEIGHT, scaled into the unit square."""
  aspect = _HALF_WIDTH / _HALF_HEIGHT
  radius = np.sqrt(num_points * np.sqrt(3) / 2 / (np.pi * aspect)) + 3
  rows = np.arange(-int(radius) - 2, int(radius) + 3)
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
) -> bfm.MorphableModel:
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
  return bfm.MorphableModel(
    mean_shape=(shape - shape.mean(axis=0)).astype(np.float32),
    id_base=_smooth_bases(rng, xy, bfm.NUM_IDENTITY, 3, _BASE_SCALE["id"]).astype(np.float32),
    exp_base=_smooth_bases(rng, xy, bfm.NUM_EXPRESSION, 3, _BASE_SCALE["exp"]).astype(np.float32),
    mean_tex=tex.astype(np.float32),
    tex_base=_smooth_bases(rng, xy, bfm.NUM_TEXTURE, 3, _BASE_SCALE["tex"]).astype(np.float32),
    triangles=tri.astype(np.int32),
    point_buf=_point_buf(num_vertices, tri, max(8, int(valence.max()))).astype(np.int32),
    keypoints=keypoints.astype(np.int32),
    front_mask=front.astype(np.int32),
    skin_mask=(np.hypot(x, y) < 0.9).astype(np.float32),
  )
