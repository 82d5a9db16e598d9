"""The 3DMM renderer against D3DFR's formulas written out here step by step (FACTS.md
"Deep3DFaceRecon (D3DFR) conventions") and a brute-force float64 rasteriser, on a small
synthetic morphable model saved and loaded in BFM_model_front.mat's format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io

from facediff.render import bfm, coeffs, mesh, raster, renderer

NUM_VERTICES = 1200
WINDOW = 16  # the test mesh's triangles span up to about 12 pixel centres at 256 px
reconstruct = jax.jit(renderer.reconstruct, static_argnums=2)


@pytest.fixture(scope="module")
def mat_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("bfm") / "BFM_model_front.mat"
  bfm.save_bfm_mat(path, bfm.synthetic_bfm(NUM_VERTICES, seed=3))
  return path


@pytest.fixture(scope="module")
def model(mat_path):
  return bfm.load_bfm(mat_path)


def d3dfr_vectors(batch, seed=0, pose=0.3):
  """(batch, 257) coefficients: unit shape/texture, moderate pose, mild lighting."""
  rng = np.random.default_rng(seed)
  x = np.zeros((batch, 257), np.float32)
  x[:, :224] = rng.normal(size=(batch, 224)) * 0.7
  x[:, 224:227] = rng.normal(size=(batch, 3)) * pose
  x[:, 227:254] = rng.normal(size=(batch, 27)) * 0.05
  x[:, 254:257] = rng.normal(size=(batch, 3)) * 0.1
  return x


# ---- Loader ----


def test_loader_shifts_indices_and_recentres(mat_path, model):
  raw = scipy.io.loadmat(mat_path)
  np.testing.assert_array_equal(model.triangles, raw["tri"] - 1)
  np.testing.assert_array_equal(model.point_buf, raw["point_buf"] - 1)
  np.testing.assert_array_equal(model.keypoints, raw["keypoints"].ravel() - 1)
  np.testing.assert_array_equal(model.front_mask, raw["frontmask2_idx"].ravel() - 1)
  assert model.point_buf.max() == model.num_triangles  # the zero-normal padding
  # A file whose mean shape is offset loads recentred (and keeps its shape otherwise).
  shifted = dict(raw, meanshape=raw["meanshape"] + np.tile([1.0, -2.0, 3.0], NUM_VERTICES))
  loaded = bfm.model_from_mat_dict(shifted, path="shifted.mat")
  centred = raw["meanshape"].reshape(-1, 3) - raw["meanshape"].reshape(-1, 3).mean(axis=0)
  np.testing.assert_allclose(loaded.mean_shape, centred, atol=1e-5)
  assert np.abs(loaded.mean_shape.mean(axis=0)).max() < 1e-6
  # D3DFR keeps vectors as (3N, 1); both orientations load the same.
  transposed = dict(raw, meanshape=raw["meanshape"].T, meantex=raw["meantex"].T)
  np.testing.assert_array_equal(bfm.model_from_mat_dict(transposed).mean_tex, model.mean_tex)


def test_synthetic_model_round_trips_and_is_consistent(model):
  original = bfm.synthetic_bfm(NUM_VERTICES, seed=3)
  for field in ("id_base", "exp_base", "tex_base", "mean_tex", "triangles", "point_buf"):
    np.testing.assert_array_equal(getattr(model, field), getattr(original, field), field)
  np.testing.assert_allclose(model.mean_shape, original.mean_shape, atol=1e-6)
  # Exact counts on request; point_buf lists exactly the triangles around each vertex.
  small = bfm.synthetic_bfm(500, seed=1, num_triangles=900)
  assert (small.num_vertices, small.num_triangles, small.keypoints.shape) == (500, 900, (68,))
  around = [set() for _ in range(500)]
  for t, corners in enumerate(small.triangles):
    for v in corners:
      around[v].add(t)
  for v, row in enumerate(small.point_buf):
    assert set(row[row < 900].tolist()) == around[v]
  # Triangles face the camera (+z): D3DFR's normal cross(v1 - v2, v2 - v3) has z > 0.
  p = small.mean_shape[small.triangles]
  assert np.all(np.cross(p[:, 0] - p[:, 1], p[:, 1] - p[:, 2])[:, 2] > 0)


def test_loader_errors_name_file_and_key(mat_path, tmp_path):
  raw = {k: v for k, v in scipy.io.loadmat(mat_path).items() if not k.startswith("__")}
  missing = tmp_path / "missing.mat"
  scipy.io.savemat(missing, {k: v for k, v in raw.items() if k != "exBase"})
  with pytest.raises(KeyError, match=r"missing\.mat.*exBase"):
    bfm.load_bfm(missing)
  bad = tmp_path / "bad.mat"
  scipy.io.savemat(bad, dict(raw, idBase=raw["idBase"][:, :79]))
  with pytest.raises(
    ValueError, match=r"bad\.mat: key 'idBase' has shape \(3600, 79\), expected \(3600, 80\)"
  ):
    bfm.load_bfm(bad)
  zero_based = tmp_path / "zero_based.mat"
  scipy.io.savemat(zero_based, dict(raw, tri=raw["tri"] - 1))
  with pytest.raises(ValueError, match=r"zero_based\.mat: key 'tri'.*1-based"):
    bfm.load_bfm(zero_based)
  with pytest.raises(ValueError, match=r"key 'meantex'"):
    bfm.model_from_mat_dict(dict(raw, meantex=raw["meantex"][:, :-3]), path="x.mat")
  with pytest.raises(FileNotFoundError, match="nowhere.mat"):
    bfm.load_bfm(tmp_path / "nowhere.mat")


# ---- Coefficients ----


def test_layouts_split_in_the_documented_order():
  x = np.arange(257, dtype=np.float32)
  c = coeffs.split(x, "d3dfr")
  for field, lo, hi in [
    ("identity", 0, 80),
    ("expression", 80, 144),
    ("texture", 144, 224),
    ("angle", 224, 227),
    ("gamma", 227, 254),
    ("translation", 254, 257),
  ]:
    np.testing.assert_array_equal(getattr(c, field), np.arange(lo, hi))
  np.testing.assert_array_equal(c.gaze, np.zeros(4))
  np.testing.assert_array_equal(coeffs.join(c, "d3dfr"), x)

  y = np.arange(2 * 261, dtype=np.float32).reshape(2, 261)
  t = coeffs.split(y, "tgdm")
  for field, lo, hi in [
    ("identity", 0, 80),
    ("expression", 80, 144),
    ("texture", 144, 224),
    ("gamma", 224, 251),
    ("angle", 251, 254),
    ("translation", 254, 257),
    ("gaze", 257, 261),
  ]:
    np.testing.assert_array_equal(getattr(t, field), y[:, lo:hi])
  np.testing.assert_array_equal(coeffs.join(t, "tgdm"), y)
  # D3DFR -> TGDM moves gamma in front of the pose.
  np.testing.assert_array_equal(coeffs.join(c, "tgdm")[224:251], np.arange(227, 254))
  with pytest.raises(ValueError, match="expected 261"):
    coeffs.split(x, "tgdm")


def _distinct(offset):
  return coeffs.split(np.arange(261, dtype=np.float32) + offset, "tgdm")


def test_reenact_and_swap_take_each_field_from_the_right_side():
  source, driver = _distinct(1000.0), _distinct(2000.0)
  r = coeffs.reenact(source, driver)
  for field in ("identity", "texture", "gamma"):
    np.testing.assert_array_equal(getattr(r, field), getattr(source, field))
  for field in ("expression", "angle", "translation", "gaze"):
    np.testing.assert_array_equal(getattr(r, field), getattr(driver, field))
  s = coeffs.swap(source, driver)
  np.testing.assert_array_equal(s.identity, source.identity)
  for field in ("expression", "texture", "gamma", "angle", "translation", "gaze"):
    np.testing.assert_array_equal(getattr(s, field), getattr(driver, field))


def test_window_of_radius_one_at_the_sequence_edges():
  frames = coeffs.split(np.random.default_rng(0).normal(size=(5, 261)), "tgdm")
  out = coeffs.window_mean(frames, radius=1)
  for field in ("expression", "angle", "translation"):
    x, y = np.asarray(getattr(frames, field)), np.asarray(getattr(out, field))
    np.testing.assert_allclose(y[0], (x[0] + x[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(y[2], (x[1] + x[2] + x[3]) / 3, atol=1e-6)
    np.testing.assert_allclose(y[4], (x[3] + x[4]) / 2, atol=1e-6)
  for field in ("identity", "texture", "gamma", "gaze"):
    np.testing.assert_array_equal(getattr(out, field), getattr(frames, field))
  # jax arrays in: the same means (numpy in, numpy out; jax in, jax out).
  out_jax = coeffs.window_mean(jax.tree.map(jnp.asarray, frames), radius=1)
  assert isinstance(out_jax.expression, jax.Array)
  np.testing.assert_allclose(out_jax.expression, out.expression, atol=1e-6)
  # Time on another axis: (batch 2, frames 3).
  seq = coeffs.split(np.random.default_rng(1).normal(size=(2, 3, 257)), "d3dfr")
  e = np.asarray(seq.expression)
  got = coeffs.window_mean(seq, radius=1, axis=1).expression
  np.testing.assert_allclose(got[:, 0], (e[:, 0] + e[:, 1]) / 2, atol=1e-6)
  np.testing.assert_allclose(got[:, 1], e.mean(axis=1), atol=1e-6)


# ---- Geometry and lighting against D3DFR's formulas written out ----

SH_A = [np.pi, 2 * np.pi / np.sqrt(3), 2 * np.pi / np.sqrt(8)]
SH_C = [
  1 / np.sqrt(4 * np.pi),
  np.sqrt(3) / np.sqrt(4 * np.pi),
  3 * np.sqrt(5) / np.sqrt(12 * np.pi),
]


def sh_by_hand(n, gamma, albedo):
  """FACTS.md: Y . (gamma_c + [0.8, 0 x 8]) times albedo_c, per colour c."""
  nx, ny, nz = n
  a, c = SH_A, SH_C
  y = [
    a[0] * c[0],
    -a[1] * c[1] * ny,
    a[1] * c[1] * nz,
    -a[1] * c[1] * nx,
    a[2] * c[2] * nx * ny,
    -a[2] * c[2] * ny * nz,
    0.5 * a[2] * c[2] / np.sqrt(3) * (3 * nz * nz - 1),
    -a[2] * c[2] * nx * nz,
    0.5 * a[2] * c[2] * (nx * nx - ny * ny),
  ]
  out = []
  for colour in range(3):
    bands = list(gamma[9 * colour : 9 * colour + 9])
    bands[0] += 0.8
    out.append(sum(yk * gk for yk, gk in zip(y, bands, strict=True)) * albedo[colour])
  return np.array(out)


def rotation_by_hand(ax, ay, az):
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def test_sh_shading_of_a_known_normal():
  n = np.array([0.48, -0.6, 0.64])  # unit length
  gamma = np.random.default_rng(0).normal(size=27) * 0.3
  albedo = np.array([0.7, 0.5, 0.3])
  got = mesh.shade(
    jnp.asarray(albedo[None, None]), jnp.asarray(n[None, None]), jnp.asarray(gamma[None])
  )
  np.testing.assert_allclose(np.asarray(got)[0, 0], sh_by_hand(n, gamma, albedo), rtol=1e-5)


def test_vertex_normals_of_a_tent():
  # Two triangles folded along the edge (0, 1); vertex 0 touches both.
  v = np.array([[0.0, -1, 0], [0, 1, 0], [-1, 0, 1], [1, 0, 1]])
  tri = np.array([[0, 1, 2], [1, 0, 3]])
  point_buf = np.array([[0, 1, 2], [0, 1, 2], [0, 2, 2], [1, 2, 2]])  # 2 = padding
  face = [np.cross(v[a] - v[b], v[b] - v[c]) for a, b, c in tri]  # cross(v1-v2, v2-v3)
  face = [f / np.linalg.norm(f) for f in face]
  expected0 = (face[0] + face[1]) / np.linalg.norm(face[0] + face[1])
  normals = jax.jit(lambda v: mesh.vertex_normals(mesh.face_normals(v, tri), point_buf))
  vn = np.asarray(normals(v[None]))[0]
  np.testing.assert_allclose(vn[0], expected0, atol=1e-6)
  np.testing.assert_allclose(vn[2], face[0], atol=1e-6)
  np.testing.assert_allclose(vn[3], face[1], atol=1e-6)


def reference_d3dfr(model, x, size):
  """D3DFR compute_for_render for one (257,) vector, in float64, step by step."""
  a, b, d = x[:80], x[80:144], x[144:224]
  angle, gamma, t = x[224:227], x[227:254], x[254:257]
  ms = np.asarray(model.mean_shape, np.float64)
  shape = ms + (np.asarray(model.id_base, np.float64) @ a).reshape(-1, 3)
  shape += (np.asarray(model.exp_base, np.float64) @ b).reshape(-1, 3)
  albedo = (model.mean_tex + (np.asarray(model.tex_base, np.float64) @ d).reshape(-1, 3)) / 255
  tri, n_tri = np.asarray(model.triangles), model.num_triangles
  face = np.cross(shape[tri[:, 0]] - shape[tri[:, 1]], shape[tri[:, 1]] - shape[tri[:, 2]])
  face /= np.linalg.norm(face, axis=1, keepdims=True)
  normal = np.zeros_like(shape)
  for vertex, faces in enumerate(np.asarray(model.point_buf)):
    for f in faces:
      if f < n_tri:
        normal[vertex] += face[f]
  normal /= np.linalg.norm(normal, axis=1, keepdims=True)
  rot = rotation_by_hand(*angle)
  posed = shape @ rot.T + t
  colour = np.stack([sh_by_hand(rot @ n, gamma, al) for n, al in zip(normal, albedo, strict=True)])
  focal, centre = 1015.0 * size / 224, 112.0 * size / 224
  z_cam = 10.0 - posed[:, 2]
  u = focal * posed[:, 0] / z_cam + centre
  v = focal * posed[:, 1] / z_cam + centre
  pixels = np.stack([u, size - 1 - v], axis=1)  # row = S - 1 - v (v up)
  return posed, colour, pixels[np.asarray(model.keypoints)]


# ---- Rasteriser ----


def edge_functions_by_hand(tri_xy, size):
  """float64 edge functions of every pixel centre (x = col, y = row) for one triangle."""
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
  out = []
  for k in range(3):
    a, b = tri_xy[(k + 1) % 3], tri_xy[(k + 2) % 3]
    out.append((b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0]))
  return np.stack(out)


def rasterize_2d(xy, triangles, size, window, depth=None):
  xy = jnp.asarray(xy, jnp.float32)[None]
  depth = jnp.full(xy.shape[:2], 10.0) if depth is None else jnp.asarray(depth)[None]
  return raster.rasterize(xy, depth, jnp.asarray(triangles), size, window)


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1)])  # both windings
def test_triangle_covers_exactly_its_edge_function_pixels(order):
  size = 48
  # One vertex outside the image: the cover is clipped.
  tri_xy = np.array([[5.44, 7.67], [41.24, 19.72], [-9.29, 44.76]])[list(order)]
  w = edge_functions_by_hand(tri_xy, size)
  expected = np.all(w >= 0, axis=0) | np.all(w <= 0, axis=0)
  # No pixel centre is within 1e-3 px of an edge, so float32 cannot flip a decision.
  lengths = [np.linalg.norm(tri_xy[(k + 2) % 3] - tri_xy[(k + 1) % 3]) for k in range(3)]
  assert min(np.abs(w[k]).min() / lengths[k] for k in range(3)) > 1e-3
  frags = rasterize_2d(tri_xy, [[0, 1, 2]], size, window=size)
  np.testing.assert_array_equal(np.asarray(frags.triangle_id[0]) == 0, expected)
  assert 300 < expected.sum() < size * size and int(frags.overflow[0]) == 0
  # A window smaller than the triangle misses pixels and says so.
  small = rasterize_2d(tri_xy, [[0, 1, 2]], size, window=8)
  assert int(small.overflow[0]) == 1
  assert (np.asarray(small.triangle_id[0]) == 0).sum() < expected.sum()


def grid_mesh(n, spacing, origin, jitter=0.0, seed=0):
  """An n x n vertex grid split into triangles with mixed diagonals and windings."""
  rng = np.random.default_rng(seed)
  ij = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
  xy = origin + spacing * ij.astype(np.float64)
  interior = (ij > 0).all(1) & (ij < n - 1).all(1)
  xy[interior] += rng.uniform(-jitter, jitter, size=(interior.sum(), 2)) * spacing
  tris = []
  for i in range(n - 1):
    for j in range(n - 1):
      a, b, c, d = i * n + j, i * n + j + 1, (i + 1) * n + j, (i + 1) * n + j + 1
      pair = [(a, b, d), (a, d, c)] if (i + j) % 2 else [(a, b, c), (b, d, c)]
      tris += [t if (i * j) % 3 else t[::-1] for t in pair]
  return xy, np.array(tris)


@pytest.mark.parametrize("jitter", [0.0, 0.25])
def test_shared_edges_leave_no_holes(jitter):
  # Vertices on integer pixel centres (jitter 0): many centres lie exactly on edges.
  size = 40
  xy, tris = grid_mesh(9, 4.0, origin=np.array([3.0, 5.0]), jitter=jitter, seed=1)
  frags = rasterize_2d(xy, tris, size, window=8)
  covered = np.asarray(frags.triangle_id[0]) >= 0
  ys, xs = np.mgrid[0:size, 0:size]
  square = (xs >= 3) & (xs <= 35) & (ys >= 5) & (ys <= 37)
  np.testing.assert_array_equal(covered, square)
  assert int(frags.overflow[0]) == 0


# ---- The renderer end to end: one batch of 8 at 256 px ----

SIZE = 256


@pytest.fixture(scope="module")
def x8():
  x = d3dfr_vectors(8, seed=4)
  x[3, 224:227] = [0.1, 0.7, 0.05]  # turned: the nose hides part of a cheek
  x[6, 224:227] = [-0.5, -0.3, 0.2]
  return x


@pytest.fixture(scope="module")
def batch8(model, x8):
  return renderer.render(model, coeffs.split(x8), image_size=SIZE, window=WINDOW)


@pytest.fixture(scope="module")
def rec8(model, x8):
  """The posed, lit mesh of x8 for a camera size (one compiled function for all sizes)."""
  return lambda size: reconstruct(model, coeffs.split(x8), mesh.camera_for_size(size))


@pytest.mark.parametrize("size", [224, 256])
def test_landmarks_and_colours_follow_the_formulas(model, x8, rec8, size):
  rec = rec8(size)
  for i in (0, 3, 6):
    posed, colour, lms = reference_d3dfr(model, x8[i].astype(np.float64), size)
    np.testing.assert_allclose(rec.vertices[i], posed, atol=2e-6)
    np.testing.assert_allclose(rec.colors[i], colour, atol=2e-6)
    np.testing.assert_allclose(rec.landmarks[i], lms, atol=2e-4)  # pixels


def test_render_landmarks_are_the_reconstruction_ones(batch8, rec8):
  np.testing.assert_array_equal(batch8.landmarks, rec8(SIZE).landmarks)
  assert np.asarray(batch8.overflow).tolist() == [0] * 8


def test_batch_of_8_equals_8_single_renders(model, x8, batch8):
  for i in range(8):
    one = renderer.render(model, coeffs.split(x8[i : i + 1]), image_size=SIZE, window=WINDOW)
    np.testing.assert_array_equal(batch8.triangle_id[i], one.triangle_id[0])
    np.testing.assert_array_equal(batch8.mask[i], one.mask[0])
    np.testing.assert_allclose(batch8.image[i], one.image[0], atol=1e-5)
    np.testing.assert_allclose(batch8.landmarks[i], one.landmarks[0], atol=1e-4)


def zbuffer_by_brute_force(xy, depth, triangles, size, tol=1e-4):
  """float64 z-buffer: for each triangle, every pixel centre of its bounding box is
  tested with plain edge functions; keeps the largest 1/Z (perspective-correct) per
  pixel (0: none). Also marks ambiguous pixels, within ``tol`` px of an edge of a
  triangle that (nearly) covers them, where float32 may decide either way."""
  best = np.zeros((size, size))
  ambiguous = np.zeros((size, size), bool)
  for tri in triangles:
    p, z = xy[tri], depth[tri]
    x0, y0 = np.maximum(np.ceil(p.min(0) - 1), 0).astype(int)
    x1, y1 = np.minimum(np.floor(p.max(0) + 1), size - 1).astype(int)
    if x1 < x0 or y1 < y0:
      continue
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    w = []
    for k in range(3):
      a, b = p[(k + 1) % 3], p[(k + 2) % 3]
      w.append(((b[0] - a[0]) * (ys - a[1]) - (b[1] - a[1]) * (xs - a[0])) / np.linalg.norm(b - a))
    w = np.stack(w)  # signed distances to the edges
    area = (p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1]) - (p[1, 1] - p[0, 1]) * (p[2, 0] - p[0, 0])
    if area == 0:
      continue
    w *= np.sign(area)
    inside = (w >= 0).all(0)
    block = (slice(y0, y1 + 1), slice(x0, x1 + 1))
    ambiguous[block] |= (w >= -tol).all(0) & (np.abs(w) < tol).any(0)
    lengths = np.array([np.linalg.norm(p[(k + 2) % 3] - p[(k + 1) % 3]) for k in range(3)])
    bary = w * lengths[:, None, None] / abs(area)
    inv_z = np.tensordot(1 / z, bary, axes=1)
    best[block] = np.where(inside & (inv_z > best[block]), inv_z, best[block])
  return best, ambiguous


def visible_barycentrics(xy, depth, triangles, ids):
  """float64 perspective-correct barycentrics of each face pixel's visible triangle."""
  ys, xs = np.nonzero(ids >= 0)
  tri = triangles[ids[ys, xs]]
  p, z = xy[tri], depth[tri]
  w = np.stack(
    [
      (p[:, (k + 2) % 3, 0] - p[:, (k + 1) % 3, 0]) * (ys - p[:, (k + 1) % 3, 1])
      - (p[:, (k + 2) % 3, 1] - p[:, (k + 1) % 3, 1]) * (xs - p[:, (k + 1) % 3, 0])
      for k in range(3)
    ],
    axis=1,
  )
  return ys, xs, tri, w / np.sum(w, axis=1, keepdims=True), z


@pytest.mark.parametrize("index", [0, 3])
def test_zbuffer_matches_brute_force(model, batch8, rec8, index):
  rec = rec8(SIZE)
  xy, depth = np.asarray(rec.xy[index], np.float64), np.asarray(rec.depth[index], np.float64)
  triangles = np.asarray(model.triangles)
  best, ambiguous = zbuffer_by_brute_force(xy, depth, triangles, SIZE)
  ids = np.asarray(batch8.triangle_id[index])
  clear = ~ambiguous
  np.testing.assert_array_equal((ids >= 0)[clear], (best > 0)[clear])
  assert ambiguous.mean() < 0.01 and (best > 0).mean() > 0.3
  # The triangle kept is the nearest: its 1/Z at the pixel is the brute-force maximum.
  ys, xs, _, bary, z = visible_barycentrics(xy, depth, triangles, ids)
  keep = clear[ys, xs]
  inv_z = np.sum(bary / z, axis=1)
  np.testing.assert_allclose(inv_z[keep], best[ys, xs][keep], rtol=1e-5)


def test_rendered_pixels_interpolate_the_lit_vertex_colours(model, batch8, rec8):
  """Each face pixel is the lit vertex colours of its visible triangle blended with
  perspective-correct barycentrics computed here in float64; background is 0."""
  rec = rec8(SIZE)
  for i in (0, 6):
    ids = np.asarray(batch8.triangle_id[i])
    xy, depth = np.asarray(rec.xy[i], np.float64), np.asarray(rec.depth[i], np.float64)
    ys, xs, tri, bary, z = visible_barycentrics(xy, depth, np.asarray(model.triangles), ids)
    persp = (bary / z) / np.sum(bary / z, axis=1, keepdims=True)
    colours = np.einsum("pk,pkc->pc", persp, np.asarray(rec.colors[i], np.float64)[tri])
    image = np.asarray(batch8.image[i])
    np.testing.assert_allclose(image[ys, xs], colours, atol=2e-6)
    assert np.all(image[ids < 0] == 0)
    np.testing.assert_array_equal(np.asarray(batch8.mask[i, ..., 0]), ids >= 0)


# ---- Gradients (float64, 224 px) ----


def test_gradients_match_finite_differences(model):
  eps = 1e-5
  camera = mesh.camera_for_size(224)
  rng = np.random.default_rng(6)
  with jax.enable_x64(True):
    x0 = jnp.asarray(d3dfr_vectors(1, seed=5)[0], jnp.float64)
    direction = jnp.asarray(rng.normal(size=257))
    weights = jnp.asarray(rng.normal(size=(224, 224, 3)))

    def outputs(x):  # renderer.render's two halves, keeping the lit vertex colours
      rec = renderer.reconstruct(model, coeffs.split(x[None]), camera)
      out = renderer.render_reconstruction(rec, model.triangles, 224, WINDOW)
      return rec.landmarks[0], rec.colors[0], out.image[0], out.triangle_id[0]

    def smooth(x):  # the differentiable outputs, the triangle ids as aux
      landmarks, colours, image, ids = outputs(x)
      return (landmarks, colours, image), ids

    def scalar(x):
      landmarks, _, image, _ = outputs(x)
      return jnp.sum(image * weights) + jnp.sum(landmarks)

    # One compiled function gives the values at -eps, 0, +eps and the JVP at 0.
    jvp = jax.jit(lambda x, d: jax.jvp(smooth, (x,), (d,), has_aux=True))
    (minus, _, minus_ids), (_, tangent, ids), (plus, _, plus_ids) = (
      jvp(x0 + s * eps * direction, direction) for s in (-1, 0, 1)
    )
    grad = jax.jit(jax.grad(scalar))(x0)

  for name, k in [("landmarks", 0), ("colours", 1)]:
    fd = (np.asarray(plus[k]) - np.asarray(minus[k])) / (2 * eps)
    jvp = np.asarray(tangent[k])
    assert np.abs(jvp - fd).max() <= 1e-6 * np.abs(fd).max(), name
  # The image away from edges: pixels that see the same triangle at -eps, 0 and +eps.
  ids, minus_ids, plus_ids = np.asarray(ids), np.asarray(minus_ids), np.asarray(plus_ids)
  steady = (minus_ids == ids) & (ids == plus_ids) & (ids >= 0)
  fd = ((np.asarray(plus[2]) - np.asarray(minus[2])) / (2 * eps))[steady]
  jvp = np.asarray(tangent[2])[steady]
  assert steady.sum() > 10000
  np.testing.assert_allclose(jvp, fd, atol=1e-6 * np.abs(fd).max())
  # Reverse mode agrees with forward mode, and is finite everywhere.
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  projected = np.sum(np.asarray(weights) * np.asarray(tangent[2])) + np.sum(np.asarray(tangent[0]))
  np.testing.assert_allclose(grad @ np.asarray(direction), projected, rtol=1e-9)
  for field, g in vars(coeffs.split(grad)).items():
    if field != "gaze":
      assert np.abs(g).max() > 0, field
