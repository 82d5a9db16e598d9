"""Face detection/alignment on real photos shipped in packages, and the masks."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

dlib = pytest.importorskip("dlib")
from data_pipelines import faces, masks  # noqa: E402

IMAGES = os.path.join(
  os.path.dirname(importlib.util.find_spec("insightface").origin), "data", "images"
)


def _load(name):
  return np.array(Image.open(os.path.join(IMAGES, name)).convert("RGB"))


@pytest.fixture(scope="module")
def aligner():
  return faces.FaceAligner(crops=faces.CROP_KINDS, image_size=128)


@pytest.fixture(scope="module")
def hanks(aligner):
  return aligner(_load("Tom_Hanks_54745.png"))


def test_model_files_found():
  for f in (faces.DLIB_RESNET, faces.CNN_DETECTOR, *faces.SHAPE_PREDICTORS.values()):
    assert os.path.getsize(faces.model_path(f)) > 100_000
  with pytest.raises(faces.FaceModelError, match="nope.dat"):
    faces.model_path("nope.dat")


def test_detector_counts_faces(aligner):
  # insightface's t1.jpg shows six people
  assert len(aligner.detector(_load("t1.jpg"))) == 6
  res = aligner(_load("t1.jpg"))
  assert res.num_faces == 6 and not res.crops and res.landmarks68 is None
  assert aligner(np.full((200, 200, 3), 127, np.uint8)).num_faces == 0


def test_landmarks_match_dlib_direct(hanks):
  img = _load("Tom_Hanks_54745.png")
  det = dlib.get_frontal_face_detector()(img, 1)[0]
  sp = dlib.shape_predictor(faces.model_path(faces.SHAPE_PREDICTORS[68]))
  ref = np.array([[p.x, p.y] for p in sp(img, det).parts()], np.float32)
  np.testing.assert_array_equal(hanks.landmarks68, ref)
  chip = dlib.get_face_chip(img, sp(img, det), size=150, padding=0.25)
  np.testing.assert_array_equal(hanks.crops["dlib150"].image, chip)


def test_similarity_transform_matches_skimage():
  from skimage.transform import SimilarityTransform

  rng = np.random.default_rng(0)
  src = rng.uniform(0, 200, (5, 2))
  ours = faces.similarity_transform(src, faces.ARCFACE_TEMPLATE_112)
  ref = SimilarityTransform.from_estimate(src, faces.ARCFACE_TEMPLATE_112)
  np.testing.assert_allclose(ours, ref.params[:2], rtol=1e-9, atol=1e-9)
  # exact similarity is recovered exactly
  a, s = 0.3, 1.7
  m = np.array([[s * np.cos(a), -s * np.sin(a), 5.0], [s * np.sin(a), s * np.cos(a), -3.0]])
  np.testing.assert_allclose(
    faces.similarity_transform(src, faces.apply_affine(m, src)), m, atol=1e-4
  )


def test_arcface_alignment_of_an_aligned_crop_is_near_identity(hanks):
  # Tom_Hanks_54745.png is insightface's own 112x112 ArcFace-aligned crop, so
  # aligning it again must be close to the identity transform.
  m = hanks.crops["arcface112"].matrix
  scale = np.sqrt(abs(np.linalg.det(m[:, :2])))
  angle = np.degrees(np.arctan2(m[1, 0], m[0, 0]))
  assert abs(scale - 1) < 0.1 and abs(angle) < 5 and np.abs(m[:, 2]).max() < 10
  lm = hanks.crops["arcface112"].landmarks
  np.testing.assert_allclose(lm, faces.apply_affine(m, hanks.landmarks68), atol=1e-4)


def test_crops_shapes_and_landmarks_follow(hanks):
  sizes = {
    "arcface112": (112, 112, 3),
    "dlib150": (150, 150, 3),
    "facenet160": (160, 160, 3),
    "fer64": (64, 64),
    "image": (128, 128, 3),
  }
  for kind, shape in sizes.items():
    c = hanks.crops[kind]
    assert c.image.shape == shape and c.image.dtype == np.uint8
  lm = hanks.crops["image"].landmarks  # the dataset image holds the whole face
  assert (lm > 0).all() and (lm < 128).all()
  img = _load("Tom_Hanks_54745.png")
  c = hanks.crops["facenet160"]
  inv = np.linalg.inv(np.vstack([c.matrix, [0, 0, 1]]))[:2]
  yx = np.array([[80, 80], [40, 100]])
  src = faces.apply_affine(inv, yx[:, ::-1]).round().astype(int)
  for (y, x), (sx, sy) in zip(yx, src, strict=True):
    assert np.abs(c.image[y, x].astype(int) - img[sy, sx].astype(int)).max() < 40


def test_hull_contains_all_landmarks(hanks):
  lm = hanks.crops["image"].landmarks
  m = masks.hull_mask(lm, (128, 128))
  assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
  pts = np.round(lm).astype(int)
  assert m[pts[:, 1], pts[:, 0]].all()
  # convex: the hull mask equals skimage's convex hull of its own pixels
  from skimage.morphology import convex_hull_image

  assert (convex_hull_image(m) >= m).all()
  assert 0.15 < m.mean() < 0.7


def test_small_mask_excludes_mouth(hanks):
  from skimage.draw import polygon

  lm = hanks.crops["image"].landmarks
  normal = masks.hull_mask(lm, (128, 128))
  small = masks.small_mask(lm, (128, 128))
  lips = lm[list(faces.MOUTH_OUTER)]
  rr, cc = polygon(lips[:, 1], lips[:, 0], (128, 128))  # independent rasteriser
  assert len(rr) > 30
  inside = small[rr, cc]
  assert inside.mean() < 0.1  # mouth is background (edge pixels may differ by rounding)
  assert (small <= normal).all() and small.sum() < normal.sum()
  np.testing.assert_array_equal(small, normal * (1 - masks.mouth_mask(lm, (128, 128))))
  dil = masks.dilated_mask(lm, (128, 128), 4)
  assert (dil >= normal).all() and dil.sum() > normal.sum()


def test_parser_hook():
  img = np.zeros((32, 40, 3), np.uint8)

  def parser(x):
    lab = np.zeros(x.shape[:2], np.int64)
    lab[5:20, 5:30] = 1  # skin
    lab[12:16, 10:20] = 11  # mouth
    return lab

  m = masks.parser_mask(img, parser, face_labels=[1, 11])
  assert m.sum() == 15 * 25
  s = masks.parser_mask(img, parser, face_labels=[1, 11], mouth_labels=[11])
  assert s.sum() == 15 * 25 - 4 * 10 and s[13, 15] == 0
  with pytest.raises(ValueError, match="label map of shape"):
    masks.parser_mask(img, lambda x: np.zeros((3, 3)), [1])
  with pytest.raises(ValueError, match="68 landmarks"):
    masks.hull_mask(np.zeros((5, 2)), (10, 10))


def test_cnn_detector_and_five_point_predictor(hanks):
  img = _load("Tom_Hanks_54745.png")
  cnn = faces.FaceDetector("cnn", upsample=1)
  dets = cnn(img)
  assert len(dets) == 1
  # the CNN box overlaps the HOG box
  a, b = np.array(dets[0].rect), np.array(hanks.detection.rect)
  inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
  union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
  assert inter / union > 0.4
  five = faces.LandmarkPredictor(5)(img, hanks.detection.rect)
  assert five.shape == (5, 2)
  # dlib's 5 points are the outer/inner eye corners and the nose base: each lies
  # within a few pixels of the matching 68-point landmark
  lm = hanks.landmarks68
  for p in five[:4]:
    assert np.linalg.norm(lm[[36, 39, 42, 45]] - p, axis=1).min() < 5
  with pytest.raises(ValueError, match="'mtcnn'"):
    faces.FaceDetector("mtcnn")
