"""Real face photos shared by the tests: insightface's sample images and the
scikit-image astronaut, cut around a detected face."""

import importlib.util
import os

from skimage import data

from data_pipelines import faces

IMAGES = os.path.join(
  os.path.dirname(importlib.util.find_spec("insightface").origin), "data", "images"
)


def cut(img, det, margin):
  """``img`` cropped to the detection's box grown by ``margin`` of its width."""
  left, top, right, bottom = det.rect
  m = int((right - left) * margin)
  return img[max(0, top - m) : bottom + m, max(0, left - m) : right + m]


def astronaut_face():
  astro = data.astronaut()  # a weak second hit on the suit scores lower than the face
  return cut(astro, faces.FaceDetector()(astro)[0], 1.0)
