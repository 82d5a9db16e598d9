"""User photos -> a small exported dataset, with the exporter's own detection,
alignment and encoders, for inference.

``export_photos({"bkg": path, "id": path, ...}, out, encoders)`` checks each photo
first (exists, decodes, exactly one face) and raises ``PhotoError`` naming the file
and the problem; only then are the photos exported (``export.export``) into ``out``,
where each role's record is found by ``record_index``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipelines import export, records


class PhotoError(ValueError):
  """A user photo that cannot be used: the message names the file."""


def load_photo(path: str) -> np.ndarray:
  """RGB uint8 (H, W, 3) of an image file; ``PhotoError`` if missing or unreadable."""
  from PIL import Image, UnidentifiedImageError

  if not os.path.isfile(path):
    raise PhotoError(f"{path}: no such file")
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise PhotoError(f"{path}: not a readable image ({type(e).__name__})") from None


def check_photo(path: str, detector=None) -> np.ndarray:
  """The photo, if it shows exactly one face (the exporter's detector)."""
  from data_pipelines import faces

  img = load_photo(path)
  detector = detector or faces.FaceDetector()
  n = len(detector(img))
  if n == 0:
    raise PhotoError(f"{path}: no face found")
  if n > 1:
    raise PhotoError(f"{path}: {n} faces found (exactly one is needed)")
  return img


def export_photos(
  photos: Mapping[str, str],
  out: str,
  encoders: Sequence[str],
  image_size: int,
  weights: Mapping[str, str] | None = None,
) -> records.Manifest:
  """Checks and exports ``role -> path`` into ``out`` (records keyed by role)."""
  from data_pipelines import faces

  detector = faces.FaceDetector()
  for path in photos.values():
    check_photo(path, detector)
  src = os.path.join(out, "_photos")
  os.makedirs(src, exist_ok=True)
  for role, path in photos.items():
    ext = os.path.splitext(path)[1].lower() or ".png"
    shutil.copyfile(path, os.path.join(src, f"{role}{ext}"))
  cfg = export.ExportConfig(
    encoders=list(encoders), image_size=int(image_size), shard_size=64, weights=dict(weights or {})
  )
  manifest = export.export(src, out, cfg)
  written = set(record_keys(out))
  for role, path in photos.items():
    if not any(k.startswith(role + ".") for k in written):
      raise PhotoError(f"{path}: the exporter could not align this face")
  return manifest


def record_keys(folder: str) -> list[str]:
  """Record keys in record-index order."""
  return [
    r["key"].decode() if isinstance(r["key"], bytes) else str(r["key"])
    for r in records.iter_records(folder)
  ]


def record_index(folder: str, role: str) -> int:
  """Index of the record exported from ``role``'s photo."""
  for i, k in enumerate(record_keys(folder)):
    if k.startswith(role + "."):
      return i
  raise KeyError(f"{folder}: no record for {role!r}")
