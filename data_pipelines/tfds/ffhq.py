"""FFHQ builder (NVlabs release layout).

Manual folder layout::

    images1024x1024/00000/00000.png ... images1024x1024/69000/69999.png

(folders of 1,000 images named by their first id). DiffSFSR trains on all 70,000
images (with the CelebA-HQ train split), so there is one ``train`` split.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.tfds import common

NUM_IMAGES = 70000


class FacediffFfhq(common.Builder):
  """FFHQ 1024x1024 aligned faces."""

  name = "facediff_ffhq"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = common.FaceConfig
  BUILDER_CONFIGS = [common.FaceConfig(name="default", description="original png bytes")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download FFHQ (https://github.com/NVlabs/ffhq-dataset, images1024x1024) and "
    "place the images1024x1024/ folder in manual_dir."
  )

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": common.image_feature(self.builder_config, encoding="png"),
          "image_id": np.int32,
        }
      ),
    )

  def _split_generators(self, dl_manager):
    root = common.require_dir(
      os.path.join(os.fspath(dl_manager.manual_dir), "images1024x1024"),
      "images1024x1024/<nnnnn>/<nnnnn>.png",
    )
    items = []
    for _, sub in common.numbered(os.listdir(root), r"(\d{5})"):
      folder = os.path.join(root, sub)
      if os.path.isdir(folder):
        items += [
          (i, os.path.join(folder, n))
          for i, n in common.numbered(os.listdir(folder), r"(\d{5})\.png")
        ]
    if not items:
      raise common.LayoutError(f"{root}: no <nnnnn>/<nnnnn>.png images")
    if self.builder_config.require_complete and len(items) != NUM_IMAGES:
      raise common.LayoutError(
        f"{root}: {len(items)} of {NUM_IMAGES} images; pass "
        "require_complete=False for a partial copy"
      )
    return {"train": self._generate_examples(items)}

  def _generate_examples(self, items):
    size = self.builder_config.image_size
    for i, path in items:
      yield i, {"image": common.image_bytes(path, size), "image_id": i}
