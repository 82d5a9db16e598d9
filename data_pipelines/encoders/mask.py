"""Masks as export "encoders": computed from the 68 landmarks in the dataset image."""

from __future__ import annotations

import numpy as np

from data_pipelines import masks
from data_pipelines.encoders import Encoder, Field, register


class _LandmarkMask(Encoder):
  crop = "image"
  variant = "normal"
  field = "mask"

  def output_fields(self):
    s = int(self.options.get("image_size", 256))
    return {self.field: Field("uint8", (s, s))}

  def prepare(self, face) -> np.ndarray:
    c = face.crops[self.crop]
    if c.landmarks is None:
      raise KeyError(f"encoder {self.name!r}: crop {self.crop!r} has no landmarks")
    return c.landmarks

  def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
    s = int(self.options.get("image_size", 256))
    return {self.field: np.stack([masks.landmark_mask(lm, (s, s), self.variant) for lm in batch])}


@register("mask68")
class HullMask(_LandmarkMask):
  """Filled convex hull of the 68 landmarks (TGDM's "Normal" mask)."""

  version = "hull68/1"


@register("mask68_small")
class SmallMask(_LandmarkMask):
  """TGDM's "Small" mask: the hull with the mouth kept as background."""

  version = "hull68-mouth/1"
  variant, field = "small", "mask_small"


@register("mask68_dilated")
class DilatedMask(_LandmarkMask):
  """TGDM's "Dilated" mask (hull dilated by 8 px at 256, scaled with the size)."""

  version = "hull68-dilated/1"
  variant, field = "dilated", "mask_dilated"

  def __call__(self, batch):
    s = int(self.options.get("image_size", 256))
    px = max(1, round(8 * s / 256))
    return {self.field: np.stack([masks.dilated_mask(lm, (s, s), px) for lm in batch])}


class ParserMask(Encoder):
  """Mask from a user face parser (Python API only: pass the instance to export).

  ``parser(image_uint8_HxWx3) -> HxW int labels``; ``face_labels`` are the labels
  that count as face; ``mouth_labels`` are kept as background (TGDM "Small").
  """

  name = "mask_parser"
  version = "user-parser"
  crop = "image"

  def __init__(self, parser, face_labels, mouth_labels=(), field="mask", **options):
    super().__init__(None, **options)
    self.parser, self.field = parser, field
    self.face_labels, self.mouth_labels = tuple(face_labels), tuple(mouth_labels)
    self.version = f"user-parser:{getattr(parser, '__qualname__', type(parser).__name__)}"

  def output_fields(self):
    s = int(self.options.get("image_size", 256))
    return {self.field: Field("uint8", (s, s))}

  def __call__(self, batch):
    return {
      self.field: np.stack(
        [masks.parser_mask(im, self.parser, self.face_labels, self.mouth_labels) for im in batch]
      )
    }
