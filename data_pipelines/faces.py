"""Face detection, 68-point landmarks and the aligned crops the encoders expect.

Real offline models: dlib's HOG frontal detector (built into dlib), and from the
``face-recognition-models`` package the CNN (mmod) detector and the 5- and 68-point
shape predictors. That package's ``__init__`` needs ``pkg_resources``, so its model
files are located with ``importlib.util.find_spec`` instead of importing it.

Crop kinds (each a square image, RGB uint8 unless noted):

- ``arcface112``: similarity transform of five points (eye centres, nose tip, mouth
  corners) onto insightface's ArcFace 112x112 template (least squares, Umeyama).
- ``dlib150``: dlib's own face chip (``get_face_chip``, 150x150, padding 0.25), the
  input of dlib's face-recognition ResNet.
- ``facenet160``: the detector box made square, widened by facenet-pytorch's
  margin convention (14 px at 160), resized to 160x160.
- ``fer64``: grey 64x64 crop of the square detector box widened by 10% per side (fer
  crops its box plus 10 px), shape (64, 64) uint8.
- ``image``: the dataset image, an axis-aligned square around the landmarks,
  ``image_scale`` times their extent, resized to ``image_size``.

Every crop is an affine map of the original image; its 2x3 matrix maps original
pixel coordinates to crop coordinates (cv2.warpAffine's convention: pixel centres at
integers), so landmarks follow the crop. All but ``dlib150`` are cut with
``cv2.warpAffine`` and that matrix; ``dlib150`` is cut by dlib itself, and its matrix
(``dlib_chip_matrix``) is the geometry dlib samples. ``relative_transform`` turns a
crop's matrix into one from the ``image`` crop, which the exporter stores.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Sequence

import numpy as np

# insightface's ArcFace template (arcface_dst) for 112x112 crops, in image x, y:
# left eye, right eye, nose tip, left mouth corner, right mouth corner (as seen).
ARCFACE_TEMPLATE_112 = np.array(
  [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
  ],
  np.float64,
)

CROP_KINDS = ("arcface112", "dlib150", "facenet160", "fer64", "image")

# 68-point (iBUG 300-W) index groups.
JAW = tuple(range(0, 17))
LEFT_EYE = tuple(range(36, 42))  # as seen in the image
RIGHT_EYE = tuple(range(42, 48))
NOSE_TIP = 30
MOUTH_OUTER = tuple(range(48, 60))
MOUTH_INNER = tuple(range(60, 68))


class FaceModelError(FileNotFoundError):
  """A face model file is missing or unreadable."""


def models_dir() -> str:
  """Folder of face-recognition-models' ``.dat`` files (without importing it)."""
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.origin:
    raise FaceModelError(
      "package face_recognition_models is not installed (pip install "
      "face-recognition-models); it ships dlib's detector, shape predictor and "
      "face-recognition weights"
    )
  return os.path.join(os.path.dirname(spec.origin), "models")


def model_path(filename: str) -> str:
  path = os.path.join(models_dir(), filename)
  if not os.path.exists(path):
    raise FaceModelError(f"{path}: missing face model file")
  return path


SHAPE_PREDICTORS = {
  68: "shape_predictor_68_face_landmarks.dat",
  5: "shape_predictor_5_face_landmarks.dat",
}
CNN_DETECTOR = "mmod_human_face_detector.dat"
DLIB_RESNET = "dlib_face_recognition_resnet_model_v1.dat"


@dataclasses.dataclass
class Detection:
  rect: tuple[int, int, int, int]  # left, top, right, bottom (dlib, inclusive)
  score: float


class FaceDetector:
  """dlib HOG frontal detector (default) or the CNN mmod detector."""

  def __init__(self, method: str = "hog", upsample: int = 1, model: str | None = None):
    import dlib

    self.method, self.upsample = method, int(upsample)
    if method == "hog":
      self._det = dlib.get_frontal_face_detector()
    elif method == "cnn":
      self._det = dlib.cnn_face_detection_model_v1(model or model_path(CNN_DETECTOR))
    else:
      raise ValueError(f"face detector {method!r}: expected 'hog' or 'cnn'")

  def __call__(self, image: np.ndarray) -> list[Detection]:
    image = _as_rgb(image)
    if self.method == "hog":
      rects, scores, _ = self._det.run(image, self.upsample, 0.0)
      out = [Detection(_rect(r), float(s)) for r, s in zip(rects, scores, strict=True)]
    else:
      out = [Detection(_rect(d.rect), float(d.confidence)) for d in self._det(image, self.upsample)]
    return sorted(out, key=lambda d: -d.score)


class LandmarkPredictor:
  """dlib shape predictor with 68 (default) or 5 points."""

  def __init__(self, points: int = 68, model: str | None = None):
    import dlib

    if points not in SHAPE_PREDICTORS:
      raise ValueError(f"shape predictor with {points} points: expected 5 or 68")
    self.points = points
    self._sp = dlib.shape_predictor(model or model_path(SHAPE_PREDICTORS[points]))

  def shape(self, image: np.ndarray, rect: Sequence[int]):
    import dlib

    return self._sp(_as_rgb(image), dlib.rectangle(*map(int, rect)))

  def __call__(self, image: np.ndarray, rect: Sequence[int]) -> np.ndarray:
    s = self.shape(image, rect)
    return np.array([[p.x, p.y] for p in s.parts()], np.float32)


def five_points(landmarks68: np.ndarray) -> np.ndarray:
  """ArcFace's five points from 68 landmarks: eye centres, nose tip, mouth corners."""
  lm = np.asarray(landmarks68, np.float64)
  return np.stack(
    [lm[list(LEFT_EYE)].mean(0), lm[list(RIGHT_EYE)].mean(0), lm[NOSE_TIP], lm[48], lm[54]]
  )


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares similarity (rotation, uniform scale, translation) src -> dst.

  Umeyama (1991), Eq. 40-42, for 2-D points; returns the 2x3 matrix M with
  dst ~ M @ [x, y, 1].
  """
  src = np.asarray(src, np.float64)
  dst = np.asarray(dst, np.float64)
  mu_s, mu_d = src.mean(0), dst.mean(0)
  xs, xd = src - mu_s, dst - mu_d
  var_s = (xs**2).sum() / len(src)
  cov = xd.T @ xs / len(src)
  u, d, vt = np.linalg.svd(cov)
  s = np.eye(2)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    s[1, 1] = -1.0
  r = u @ s @ vt
  scale = float(np.trace(np.diag(d) @ s) / var_s)
  t = mu_d - scale * r @ mu_s
  return np.concatenate([scale * r, t[:, None]], axis=1)


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
  pts = np.asarray(points, np.float64)
  return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def square_box_transform(center: Sequence[float], side: float, size: int) -> np.ndarray:
  """2x3 matrix mapping an axis-aligned square (centre, side) onto size x size."""
  s = size / float(side)
  cx, cy = center
  return np.array([[s, 0.0, size / 2.0 - s * cx], [0.0, s, size / 2.0 - s * cy]])


def dlib_chip_matrix(details) -> np.ndarray:
  """2x3 matrix, original -> chip, of the pixels ``dlib.extract_image_chip`` samples.

  dlib (image_transforms/interpolation.h, ``get_mapping_to_chip``) maps the corners
  tl, tr, br of ``details.rect``, rotated by ``details.angle`` about its centre, onto
  chip pixels (0, 0), (cols-1, 0), (cols-1, rows-1). When the rect is much larger than
  the chip, ``extract_image_chips`` samples level L of a ``pyramid_down<2>`` pyramid
  (L = number of ``rect_down`` steps whose area still exceeds rows*cols). dlib places
  level pixel q at original 2q + (2.5, 1.5) (``point_up``) while its 5-tap filter
  averages around 2q + 2, so the pixels it samples lie (2^L - 1)/2 original pixels
  left of and below the ideal ones (measured on coordinate ramps, L = 0..3, in
  tests/test_crop_transforms.py). The returned matrix includes that shift.
  """
  import dlib

  rect = details.rect
  cx, cy = (rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0
  c, s = np.cos(details.angle), np.sin(details.angle)
  corners = np.array([[rect.left(), rect.top()], [rect.right(), rect.top()]], np.float64)
  corners = np.vstack([corners, [rect.right(), rect.bottom()]]) - (cx, cy)
  src = corners @ np.array([[c, s], [-s, c]]) + (cx, cy)  # rotate_point about the centre
  dst = np.array([[0, 0], [details.cols - 1, 0], [details.cols - 1, details.rows - 1]], np.float64)
  # exact affine through three point pairs: dst = A @ [src, 1]
  m = np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst).T
  pyr, down, levels = dlib.pyramid_down(2), rect, 0
  while pyr.rect_down(down).area() > details.rows * details.cols:
    down, levels = pyr.rect_down(down), levels + 1
  shift = (2.0**levels - 1.0) / 2.0
  # sampled = ideal + (-shift, +shift)  =>  chip = m @ (sampled - (-shift, shift))
  m[:, 2] -= m[:, :2] @ np.array([-shift, shift])
  return m


def relative_transform(crop_matrix: np.ndarray, image_matrix: np.ndarray) -> np.ndarray:
  """2x3 matrix from the ``image`` crop's pixels to another crop's pixels:
  ``crop_matrix @ inverse(image_matrix)`` (both map original -> crop)."""
  crop3 = np.vstack([np.asarray(crop_matrix, np.float64), [0.0, 0.0, 1.0]])
  image3 = np.vstack([np.asarray(image_matrix, np.float64), [0.0, 0.0, 1.0]])
  return (crop3 @ np.linalg.inv(image3))[:2]


def warp(image: np.ndarray, m: np.ndarray, size: int, border: str = "constant") -> np.ndarray:
  import cv2

  mode = {
    "constant": cv2.BORDER_CONSTANT,
    "reflect": cv2.BORDER_REFLECT_101,
    "replicate": cv2.BORDER_REPLICATE,
  }[border]
  return cv2.warpAffine(
    image,
    m.astype(np.float64),
    (size, size),
    flags=cv2.INTER_LINEAR,
    borderMode=mode,
    borderValue=0,
  )


@dataclasses.dataclass
class Crop:
  image: np.ndarray
  matrix: np.ndarray | None  # 2x3, original -> crop
  landmarks: np.ndarray | None  # (68, 2) in crop coordinates


@dataclasses.dataclass
class FaceResult:
  """What the aligner found in one image."""

  num_faces: int
  detection: Detection | None = None
  landmarks68: np.ndarray | None = None  # (68, 2) float32, original image coords
  crops: dict[str, Crop] = dataclasses.field(default_factory=dict)
  source: np.ndarray | None = None  # the original RGB image (for encoders' own crops)


class FaceAligner:
  """Detect, predict 68 landmarks, and cut the requested crop kinds.

  Crops are made only when exactly one face is found; ``num_faces`` tells the
  caller what happened otherwise.
  """

  def __init__(
    self,
    crops: Sequence[str] = ("image",),
    *,
    image_size: int = 256,
    image_scale: float = 1.8,
    image_shift: float = 0.12,
    detector: FaceDetector | None = None,
    predictor: LandmarkPredictor | None = None,
    facenet_margin: float = 14.0,
    fer_offset: float = 0.1,
  ):
    unknown = [c for c in crops if c not in CROP_KINDS]
    if unknown:
      raise ValueError(f"unknown crop kind(s) {unknown}; known: {list(CROP_KINDS)}")
    self.kinds = tuple(dict.fromkeys(crops))
    self.image_size, self.image_scale, self.image_shift = image_size, image_scale, image_shift
    self.facenet_margin, self.fer_offset = facenet_margin, fer_offset
    self.detector = detector or FaceDetector()
    self.predictor = predictor or LandmarkPredictor(68)
    if self.predictor.points != 68:
      raise ValueError("FaceAligner needs the 68-point shape predictor")

  def __call__(self, image: np.ndarray) -> FaceResult:
    image = _as_rgb(image)
    dets = self.detector(image)
    if len(dets) != 1:
      return FaceResult(num_faces=len(dets))
    det = dets[0]
    shape = self.predictor.shape(image, det.rect)
    lm = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
    res = FaceResult(num_faces=1, detection=det, landmarks68=lm, source=image)
    for kind in self.kinds:
      res.crops[kind] = self.crop(image, kind, det, lm, shape)
    return res

  def crop(self, image, kind, det, lm, shape=None) -> Crop:
    if kind == "dlib150":
      import dlib

      if shape is None:
        shape = dlib.full_object_detection(
          dlib.rectangle(*map(int, det.rect)),
          [dlib.point(int(round(x)), int(round(y))) for x, y in lm],
        )
      chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
      m = dlib_chip_matrix(dlib.get_face_chip_details(shape, size=150, padding=0.25))
      return Crop(np.asarray(chip), m, apply_affine(m, lm))
    if kind == "arcface112":
      m = similarity_transform(five_points(lm), ARCFACE_TEMPLATE_112)
      return Crop(warp(image, m, 112), m, apply_affine(m, lm))
    if kind == "facenet160":
      left, top, right, bottom = det.rect
      side = max(right - left, bottom - top)
      side = side * (1.0 + self.facenet_margin / (160.0 - self.facenet_margin))
      m = square_box_transform(((left + right) / 2.0, (top + bottom) / 2.0), side, 160)
      return Crop(warp(image, m, 160, "replicate"), m, apply_affine(m, lm))
    if kind == "fer64":
      import cv2

      left, top, right, bottom = det.rect
      side = max(right - left, bottom - top) * (1.0 + 2.0 * self.fer_offset)
      m = square_box_transform(((left + right) / 2.0, (top + bottom) / 2.0), side, 64)
      grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
      return Crop(warp(grey, m, 64, "replicate"), m, apply_affine(m, lm))
    if kind == "image":
      m = self.image_transform(lm)
      return Crop(warp(image, m, self.image_size, "reflect"), m, apply_affine(m, lm))
    raise ValueError(f"unknown crop kind {kind!r}; known: {list(CROP_KINDS)}")

  def image_transform(self, lm: np.ndarray) -> np.ndarray:
    lo, hi = lm.min(0), lm.max(0)
    side = float(max(hi - lo)) * self.image_scale
    cx, cy = (lo + hi) / 2.0
    # the 68 points stop at the eyebrows: move the centre up towards the forehead
    return square_box_transform((cx, cy - self.image_shift * side), side, self.image_size)


def _rect(r) -> tuple[int, int, int, int]:
  return (int(r.left()), int(r.top()), int(r.right()), int(r.bottom()))


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
  return np.ascontiguousarray(image[..., :3])
