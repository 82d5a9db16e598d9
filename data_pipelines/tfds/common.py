"""Shared pieces of the facediff tfds builders (TensorFlow-free).

TensorFlow is not installed, and tfds needs it only to *encode numpy images*
(``tf.image.encode_png``) and for ``tf.data`` reading. The builders therefore hand
tfds already encoded bytes (the original file's bytes, or PNG bytes from OpenCV),
write ``file_format="array_record"`` and are read back with ``tfds.data_source`` /
``builder.as_data_source()``, which decodes images with OpenCV (RGB out).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from typing import Iterator, Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv")
FRAME_EXTS = (".png", ".jpg", ".jpeg")


class LayoutError(FileNotFoundError):
  """The manual folder does not have the dataset's published layout."""


@dataclasses.dataclass
class FaceConfig(tfds.core.BuilderConfig):
  """Options common to the facediff builders.

  image_size: None keeps the original file bytes; an int centre-crops to a square
    and resizes to ``image_size`` (then stores PNG).
  frame_step / max_frames: for video datasets, keep every ``frame_step``-th frame
    and at most ``max_frames`` per video (None: all).
  require_complete: fail if files the official release has are missing (turn
    off for partial copies).
  """

  image_size: int | None = None
  frame_step: int = 1
  max_frames: int | None = None
  require_complete: bool = True


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the facediff builders.

  tfds 4.9.10 locates a packaged builder's source through ``importlib_resources``
  (a backport it requires only on Python < 3.9), which fails on this Python; the
  source file's path comes from ``inspect`` instead.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))


def rgb_png(rgb: np.ndarray) -> bytes:
  """RGB (or grey) uint8 array -> PNG bytes (OpenCV writes BGR, so flip)."""
  arr = np.ascontiguousarray(rgb[..., ::-1]) if rgb.ndim == 3 and rgb.shape[-1] == 3 else rgb
  ok, buf = cv2.imencode(".png", arr)
  if not ok:
    raise ValueError(f"could not PNG-encode an array of shape {rgb.shape}")
  return buf.tobytes()


def square_resize(rgb: np.ndarray, size: int, interp: int | None = None) -> np.ndarray:
  """Centre crop to a square, then resize to (size, size)."""
  h, w = rgb.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  rgb = rgb[top : top + s, left : left + s]
  if s == size:
    return rgb
  if interp is None:
    interp = cv2.INTER_AREA if s > size else cv2.INTER_CUBIC
  return cv2.resize(rgb, (size, size), interpolation=interp)


def read_rgb(path: str) -> np.ndarray:
  img = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
  if img is None:
    raise ValueError(f"{path}: not a readable image")
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def image_bytes(path: str, image_size: int | None) -> bytes:
  """The file's own bytes, or a centre-cropped, resized PNG if ``image_size``."""
  if image_size is None:
    with open(path, "rb") as f:
      return f.read()
  return rgb_png(square_resize(read_rgb(path), image_size))


def frame_bytes(rgb: np.ndarray, image_size: int | None) -> bytes:
  return rgb_png(rgb if image_size is None else square_resize(rgb, image_size))


def video_frames(
  path: str, step: int = 1, max_frames: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
  """(frame index, RGB frame) of every ``step``-th frame of a video, via OpenCV."""
  cap = cv2.VideoCapture(os.fspath(path))
  if not cap.isOpened():
    raise ValueError(f"{path}: OpenCV cannot open this video")
  try:
    index = kept = 0
    while max_frames is None or kept < max_frames:
      ok, frame = cap.read()
      if not ok:
        break
      if index % step == 0:
        yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        kept += 1
      index += 1
  finally:
    cap.release()
  if index == 0:
    raise ValueError(f"{path}: OpenCV decoded no frames")


def frame_files(folder: str, step: int = 1, max_frames: int | None = None) -> list[tuple[int, str]]:
  """(frame index, path) of pre-extracted frames ``<n>.png|jpg`` in a folder."""
  items = []
  for name in os.listdir(folder):
    stem, ext = os.path.splitext(name)
    if ext.lower() in FRAME_EXTS and stem.isdigit():
      items.append((int(stem), os.path.join(folder, name)))
  items.sort()
  items = [x for x in items if x[0] % step == 0]
  return items if max_frames is None else items[:max_frames]


def clip_frames(clip: str, cfg: FaceConfig) -> Iterator[tuple[int, bytes]]:
  """Frames of a clip given as a video file or a folder of extracted frames."""
  if os.path.isdir(clip):
    for index, path in frame_files(clip, cfg.frame_step, cfg.max_frames):
      yield index, image_bytes(path, cfg.image_size)
  else:
    for index, rgb in video_frames(clip, cfg.frame_step, cfg.max_frames):
      yield index, frame_bytes(rgb, cfg.image_size)


def clips_in(folder: str) -> list[tuple[str, str]]:
  """(clip name, path) of the videos ``<name>.mp4`` or frame folders ``<name>/``."""
  out = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    stem, ext = os.path.splitext(name)
    if os.path.isdir(path) or ext.lower() in VIDEO_EXTS:
      out.setdefault(stem if ext.lower() in VIDEO_EXTS else name, path)
  return sorted(out.items())


def require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise LayoutError(f"{path}: missing; expected {what}")
  return path


def image_feature(cfg: FaceConfig, channels: int = 3, encoding: str = "png"):
  shape = (
    (None, None, channels) if cfg.image_size is None else (cfg.image_size, cfg.image_size, channels)
  )
  return tfds.features.Image(
    shape=shape, encoding_format=encoding if cfg.image_size is None else "png"
  )


def numbered(names: Sequence[str], pattern: str) -> list[tuple[int, str]]:
  """(int id, name) of the names matching ``pattern`` with one numeric group."""
  rx = re.compile(pattern)
  out = []
  for n in names:
    m = rx.fullmatch(n)
    if m:
      out.append((int(m.group(1)), n))
  return sorted(out)
