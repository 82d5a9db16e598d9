"""Registry of frozen face encoders run once at export time.

An encoder is one class::

    @register("dlib")
    class DlibResNet(Encoder):
        version = "..."
        crop = "dlib150"                       # a faces.CROP_KINDS entry
        fields = {"id_dlib": Field("float32", (128,))}
        def __call__(self, batch): return {"id_dlib": ...}

``prepare(face)`` turns one ``faces.FaceResult`` into the per-example input (by
default the crop named by ``crop``); ``__call__`` maps a stacked batch of those to
``{field: array (B, *shape)}``; ``crop_transforms(face)`` gives the 2x3 original ->
input matrix of each of its ``crop_kinds()`` (the exporter stores them). Encoders
whose weights the user supplies name the ``--weights`` keys they need in
``weight_keys``; a missing file is a ``WeightsError`` naming the key and path.

Built-in encoders live in submodules imported on first use, so importing this
package needs neither torch nor dlib.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

_REGISTRY: dict[str, type["Encoder"]] = {}

# name -> module defining it (imported lazily by get()).
BUILTIN = {
  "dlib": "data_pipelines.encoders.dlib_resnet",
  "fer": "data_pipelines.encoders.fer",
  "facenet": "data_pipelines.encoders.facenet",
  "arcface_r50": "data_pipelines.encoders.iresnet",
  "arcface_r100": "data_pipelines.encoders.iresnet",
  "curricularface": "data_pipelines.encoders.iresnet",
  "dln": "data_pipelines.encoders.dln",
  "d3dfr": "data_pipelines.encoders.d3dfr",
  "mask68": "data_pipelines.encoders.mask",
  "mask68_small": "data_pipelines.encoders.mask",
  "mask68_dilated": "data_pipelines.encoders.mask",
  "sd_vae": "data_pipelines.encoders.sd_vae",
}


class WeightsError(FileNotFoundError):
  """A weight file the user must supply is missing or does not fit the network."""


@dataclasses.dataclass(frozen=True)
class Field:
  dtype: str
  shape: tuple[int, ...]


class Encoder:
  name: ClassVar[str] = ""
  version: ClassVar[str] = "1"
  crop: ClassVar[str | None] = "image"
  fields: ClassVar[dict[str, Field]] = {}
  weight_keys: ClassVar[tuple[str, ...]] = ()
  batch_size: ClassVar[int] = 32

  def __init__(self, weights: Mapping[str, str] | None = None, **options: Any):
    self.weights = dict(weights or {})
    self.options = options
    for key in self.weight_keys:
      path = self.weights.get(key)
      if not path:
        raise WeightsError(
          f"encoder {self.name!r} needs user-supplied weights: pass --weights {key}=PATH"
        )
      if not os.path.exists(path):
        raise WeightsError(f"encoder {self.name!r}: --weights {key}={path}: no such file")

  def output_fields(self) -> dict[str, Field]:
    """Fields this instance writes (may depend on options such as image size)."""
    return dict(self.fields)

  def prepare(self, face) -> np.ndarray:
    if self.crop not in face.crops:
      raise KeyError(
        f"encoder {self.name!r} needs crop {self.crop!r}, which the aligner "
        f"did not make (it made {sorted(face.crops)})"
      )
    return face.crops[self.crop].image

  def crop_kinds(self) -> tuple[str, ...]:
    """Crops of this encoder whose transform the exporter stores as ``crop_<kind>``:
    the aligner crop it reads, unless that is the dataset image itself."""
    return () if self.crop in (None, "image") else (self.crop,)

  def crop_transforms(self, face) -> dict[str, np.ndarray]:
    """``crop_kinds`` -> 2x3 matrix mapping original-image pixels to this encoder's
    input pixels (cv2.warpAffine convention). Encoders that cut their own input
    (``crop = None``) override this and ``crop_kinds``."""
    out = {}
    for kind in self.crop_kinds():
      c = face.crops.get(kind)
      if c is None or c.matrix is None:
        raise KeyError(
          f"encoder {self.name!r} needs the transform of crop {kind!r}, which the "
          f"aligner did not make (it made {sorted(face.crops)})"
        )
      out[kind] = np.asarray(c.matrix, np.float64)
    return out

  def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
    raise TypeError(f"{type(self).__name__} does not define __call__")

  def encode(self, batch: np.ndarray) -> dict[str, np.ndarray]:
    """Runs ``__call__`` in chunks of ``batch_size`` and checks the outputs."""
    outs = [self(batch[i : i + self.batch_size]) for i in range(0, len(batch), self.batch_size)]
    fields = self.output_fields()
    res = {}
    for k, spec in fields.items():
      v = np.concatenate([o[k] for o in outs]).astype(spec.dtype, copy=False)
      if v.shape[1:] != tuple(spec.shape):
        raise ValueError(
          f"encoder {self.name!r} field {k!r}: shape {v.shape[1:]}, declared {spec.shape}"
        )
      res[k] = v
    return res


def register(name: str):
  """Class decorator adding an ``Encoder`` subclass under ``name``."""

  def deco(cls: type[Encoder]) -> type[Encoder]:
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(
        f"encoder {name!r} registered twice ({_REGISTRY[name].__module__} and {cls.__module__})"
      )
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return deco


def names() -> list[str]:
  return sorted(set(_REGISTRY) | set(BUILTIN))


def get(name: str) -> type[Encoder]:
  if name not in _REGISTRY and name in BUILTIN:
    importlib.import_module(BUILTIN[name])
  if name not in _REGISTRY:
    raise KeyError(f"unknown encoder {name!r}; known: {', '.join(names())}")
  return _REGISTRY[name]


def create(name: str, weights: Mapping[str, str] | None = None, **options: Any) -> Encoder:
  return get(name)(weights=weights, **options)
