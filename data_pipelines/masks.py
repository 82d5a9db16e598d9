"""Binary face masks (1 = face region to hide/inpaint, 0 = background kept).

- ``hull_mask``: the filled convex hull of the 68 landmarks (jaw line to eyebrows);
  TGDM's "Normal" mask and DiffSFSR's masked background when no parser is used.
- ``small_mask``: TGDM's "Small" variant (Sec. 5.4.2, Fig. 12): the Normal mask with
  the mouth area treated as background, i.e. the outer-lip polygon (points 48-59)
  set back to 0. TGDM picks Small for face swapping.
- ``dilated_mask``: TGDM's "Dilated" variant (the Normal mask dilated).
- ``parser_mask``: a hook for a user face parser (a callable image -> HxW label map,
  e.g. a BiSeNet trained on CelebAMask-HQ); the caller names the face labels and,
  for the Small variant, the mouth labels. No parser ships with facediff.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from data_pipelines.faces import MOUTH_OUTER


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
  lm = np.asarray(landmarks, np.float64)
  if lm.shape != (68, 2):
    raise ValueError(f"expected 68 landmarks of shape (68, 2), got {lm.shape}")
  return lm


def _fill(points: np.ndarray, shape: tuple[int, int], hull: bool) -> np.ndarray:
  import cv2

  mask = np.zeros(shape, np.uint8)
  pts = np.round(points).astype(np.int32)
  if hull:
    pts = cv2.convexHull(pts)
    cv2.fillConvexPoly(mask, pts, 1)
  else:
    cv2.fillPoly(mask, [pts.reshape(-1, 1, 2)], 1)
  return mask


def hull_mask(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Filled convex hull of the 68 landmarks, (H, W) uint8 in {0, 1}."""
  return _fill(_check_landmarks(landmarks), tuple(shape[:2]), hull=True)


def mouth_mask(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Filled outer-lip polygon (points 48-59)."""
  lm = _check_landmarks(landmarks)
  return _fill(lm[list(MOUTH_OUTER)], tuple(shape[:2]), hull=False)


def small_mask(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """TGDM "Small": the hull mask with the mouth area kept as background."""
  return hull_mask(landmarks, shape) * (1 - mouth_mask(landmarks, shape))


def dilated_mask(landmarks: np.ndarray, shape: tuple[int, int], pixels: int = 8) -> np.ndarray:
  """TGDM "Dilated": the hull mask dilated by ``pixels`` (elliptic kernel)."""
  import cv2

  k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
  return cv2.dilate(hull_mask(landmarks, shape), k)


def parser_mask(
  image: np.ndarray,
  parser: Callable[[np.ndarray], np.ndarray],
  face_labels: Collection[int],
  mouth_labels: Collection[int] = (),
) -> np.ndarray:
  """Mask from a user face parser: 1 where the label is a face label and not a
  mouth label (pass the mouth labels for the Small variant)."""
  labels = np.asarray(parser(image))
  if labels.shape != tuple(image.shape[:2]):
    raise ValueError(
      f"face parser {getattr(parser, '__name__', parser)!r} returned a "
      f"label map of shape {labels.shape}, expected {image.shape[:2]}"
    )
  keep = np.isin(labels, list(face_labels)) & ~np.isin(labels, list(mouth_labels))
  return keep.astype(np.uint8)


VARIANTS = {"normal": hull_mask, "small": small_mask, "dilated": dilated_mask}


def landmark_mask(landmarks: np.ndarray, shape: tuple[int, int], variant: str = "normal"):
  if variant not in VARIANTS:
    raise ValueError(f"mask variant {variant!r}: expected one of {sorted(VARIANTS)}")
  return VARIANTS[variant](landmarks, shape)
