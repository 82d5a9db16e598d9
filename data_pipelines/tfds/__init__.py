"""tfds builders for the papers' datasets, built and read without TensorFlow.

Importing this package registers the builders (``facediff_celeba_hq``,
``facediff_celebamask_hq``, ``facediff_ffhq``, ``facediff_faceforensics``,
``facediff_voxceleb1``, ``facediff_mead``). All take their data from a manual folder
in the dataset's published layout (see each module). ``prepare`` builds one into
ArrayRecord files and returns its ``{split: data source}`` of numpy examples::

    from data_pipelines import tfds as fd_tfds
    sources = fd_tfds.prepare("facediff_celeba_hq", manual_dir=..., data_dir=...)
    example = sources["train"][0]        # {"image": uint8 (H, W, 3) RGB, ...}

What works without TensorFlow (tensorflow-datasets 4.9.10): ``download_and_prepare``
with ``file_format="array_record"`` as long as image features receive *encoded
bytes* (tfds encodes numpy images with ``tf.image``, so the builders pass the file's
bytes or OpenCV-encoded PNGs), and reading with ``tfds.data_source`` /
``builder.as_data_source()`` (decoding with OpenCV). ``as_dataset`` (tf.data) and the
default tfrecord format need TensorFlow and are not used.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from data_pipelines.tfds.celeba import (
  CelebAConfig,
  FacediffCelebaHq,
  FacediffCelebamaskHq,
  celeba_hq_split,
)
from data_pipelines.tfds.common import FaceConfig, LayoutError
from data_pipelines.tfds.faceforensics import FacediffFaceforensics, FFConfig
from data_pipelines.tfds.ffhq import FacediffFfhq
from data_pipelines.tfds.mead import FacediffMead, MeadConfig, mead_split
from data_pipelines.tfds.voxceleb import FacediffVoxceleb1, VoxConfig

__all__ = [
  "BUILDERS",
  "CelebAConfig",
  "FFConfig",
  "FaceConfig",
  "FacediffCelebaHq",
  "FacediffCelebamaskHq",
  "FacediffFaceforensics",
  "FacediffFfhq",
  "FacediffMead",
  "FacediffVoxceleb1",
  "LayoutError",
  "MeadConfig",
  "VoxConfig",
  "celeba_hq_split",
  "make_builder",
  "mead_split",
]

BUILDERS = {
  b.name: b
  for b in (
    FacediffCelebaHq,
    FacediffCelebamaskHq,
    FacediffFfhq,
    FacediffFaceforensics,
    FacediffVoxceleb1,
    FacediffMead,
  )
}


def make_builder(name: str, data_dir: str, config: FaceConfig | None = None):
  """The builder ``name`` writing ArrayRecord files under ``data_dir``."""
  if name not in BUILDERS:
    raise KeyError(f"unknown facediff tfds builder {name!r}; known: {sorted(BUILDERS)}")
  kwargs = {} if config is None else {"config": config}
  return BUILDERS[name](data_dir=os.fspath(data_dir), file_format="array_record", **kwargs)


def prepare(name: str, manual_dir: str, data_dir: str, config: FaceConfig | None = None):
  """Builds ``name`` from ``manual_dir`` (once) and returns ``{split: data source}``."""
  builder = make_builder(name, data_dir, config)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  )
  return builder.as_data_source()
