"""CelebA-HQ and CelebAMask-HQ builders with DiffSFSR's random 29,000 / 1,000 split.

Manual folder layout (CelebAMask-HQ's release)::

    CelebA-HQ-img/0.jpg ... 29999.jpg                  (1024 x 1024)
    CelebAMask-HQ-mask-anno/<k>/<idx:05d>_<part>.png   (512 x 512, k = idx // 2000)

The paper splits CelebA-HQ "by random selection" and publishes no list, so the
split here is a fixed-seed permutation of the 30,000 ids (``celeba_hq_split``): the
same seed always gives the same partition, not necessarily the authors' one.
"""

from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.tfds import common

NUM_IMAGES = 30000
NUM_TEST = 1000
SPLIT_SEED = 0

# CelebAMask-HQ part names (the order is the label of the parsing map, 1-based).
PARTS = (
  "skin",
  "nose",
  "eye_g",
  "l_eye",
  "r_eye",
  "l_brow",
  "r_brow",
  "l_ear",
  "r_ear",
  "mouth",
  "u_lip",
  "l_lip",
  "hair",
  "hat",
  "ear_r",
  "neck_l",
  "neck",
  "cloth",
)
# Parts merged into the face mask: the inner face; glasses, hair, ears, neck and
# clothes belong to the background that DiffSFSR keeps.
FACE_PARTS = ("skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "mouth", "u_lip", "l_lip")


def celeba_hq_split(
  ids=None, seed: int = SPLIT_SEED, num_test: int = NUM_TEST
) -> tuple[np.ndarray, np.ndarray]:
  """(train ids, test ids), each sorted: a seeded random partition of ``ids``.

  With the default ``ids = range(30000)`` this is the 29,000 / 1,000 split.
  """
  ids = np.arange(NUM_IMAGES) if ids is None else np.asarray(sorted(ids))
  if len(np.unique(ids)) != len(ids):
    raise ValueError("celeba_hq_split: ids are not unique")
  if not 0 < num_test < len(ids):
    raise ValueError(f"celeba_hq_split: num_test={num_test} with {len(ids)} ids")
  perm = np.random.default_rng(seed).permutation(len(ids))
  return np.sort(ids[perm[num_test:]]), np.sort(ids[perm[:num_test]])


@dataclasses.dataclass
class CelebAConfig(common.FaceConfig):
  split_seed: int = SPLIT_SEED
  num_test: int = NUM_TEST
  face_parts: tuple[str, ...] = FACE_PARTS


def _listed_images(manual_dir: str, cfg: CelebAConfig) -> dict[str, list[tuple[int, str]]]:
  """{split: [(id, path)]} for the CelebA-HQ images present."""
  img_dir = common.require_dir(
    os.path.join(manual_dir, "CelebA-HQ-img"), "CelebA-HQ-img/<id>.jpg (CelebAMask-HQ layout)"
  )
  found = dict(common.numbered(os.listdir(img_dir), r"(\d+)\.jpg"))
  if cfg.require_complete and len(found) != NUM_IMAGES:
    missing = sorted(set(range(NUM_IMAGES)) - set(found))
    raise common.LayoutError(
      f"{img_dir}: {len(found)} of {NUM_IMAGES} images (missing e.g. "
      f"{missing[:5]}); pass require_complete=False for a partial copy"
    )
  train, test = celeba_hq_split(seed=cfg.split_seed, num_test=cfg.num_test)
  out = {}
  for name, ids in (("train", train), ("test", test)):
    out[name] = [(int(i), os.path.join(img_dir, found[int(i)])) for i in ids if int(i) in found]
  return out


class FacediffCelebaHq(common.Builder):
  """CelebA-HQ 1024x1024 faces, DiffSFSR's 29k/1k train/test split."""

  name = "facediff_celeba_hq"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = CelebAConfig
  BUILDER_CONFIGS = [CelebAConfig(name="default", description="original 1024 jpg bytes")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download CelebAMask-HQ (https://github.com/switchablenorms/CelebAMask-HQ) and "
    "place its CelebA-HQ-img/ folder (0.jpg ... 29999.jpg) in manual_dir."
  )

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": common.image_feature(self.builder_config, encoding="jpeg"),
          "image_id": np.int32,
        }
      ),
    )

  def _split_generators(self, dl_manager):
    listed = _listed_images(os.fspath(dl_manager.manual_dir), self.builder_config)
    return {k: self._generate_examples(v) for k, v in listed.items()}

  def _generate_examples(self, items):
    size = self.builder_config.image_size
    for i, path in items:
      yield i, {"image": common.image_bytes(path, size), "image_id": i}


def face_mask_and_parsing(
  anno_dir: str, idx: int, face_parts=FACE_PARTS, size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(face mask uint8 {0,1}, parsing map uint8 0..18) of CelebAMask-HQ image ``idx``.

  The parsing map holds the 1-based index into ``PARTS``, the parts drawn in that
  order so later ones cover earlier ones (as the release's own label maps do;
  0 = none). The face mask is where the parsing map shows one of ``face_parts``:
  glasses or hair covering the skin stay background. Annotations are 512x512;
  ``size`` resizes both with nearest neighbour.
  """
  folder = os.path.join(anno_dir, str(idx // 2000))
  parsing = None
  for label, part in enumerate(PARTS, start=1):
    path = os.path.join(folder, f"{idx:05d}_{part}.png")
    if not os.path.exists(path):
      continue
    m = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if m is None:
      raise ValueError(f"{path}: not a readable mask")
    if parsing is None:
      parsing = np.zeros(m.shape, np.uint8)
    parsing[m > 127] = label
  if parsing is None:
    raise common.LayoutError(f"{folder}: no annotation {idx:05d}_<part>.png")
  if size is not None:
    parsing = cv2.resize(parsing, (size, size), interpolation=cv2.INTER_NEAREST)
  face_labels = [PARTS.index(p) + 1 for p in face_parts]
  return np.isin(parsing, face_labels).astype(np.uint8), parsing


class FacediffCelebamaskHq(common.Builder):
  """CelebAMask-HQ: CelebA-HQ images with a merged face mask and the parsing map."""

  name = "facediff_celebamask_hq"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = CelebAConfig
  BUILDER_CONFIGS = [CelebAConfig(name="default", description="1024 jpg, 512 masks")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download CelebAMask-HQ (https://github.com/switchablenorms/CelebAMask-HQ) and "
    "extract it so that manual_dir holds CelebA-HQ-img/ and CelebAMask-HQ-mask-anno/."
  )

  def _info(self):
    cfg = self.builder_config
    side = cfg.image_size
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": common.image_feature(cfg, encoding="jpeg"),
          "face_mask": tfds.features.Image(shape=(side, side, 1), encoding_format="png"),
          "parsing": tfds.features.Image(shape=(side, side, 1), encoding_format="png"),
          "image_id": np.int32,
        }
      ),
    )

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    anno = common.require_dir(
      os.path.join(manual, "CelebAMask-HQ-mask-anno"),
      "CelebAMask-HQ-mask-anno/<k>/<idx:05d>_<part>.png",
    )
    listed = _listed_images(manual, self.builder_config)
    return {k: self._generate_examples(v, anno) for k, v in listed.items()}

  def _generate_examples(self, items, anno):
    cfg = self.builder_config
    for i, path in items:
      mask, parsing = face_mask_and_parsing(anno, i, cfg.face_parts, cfg.image_size)
      yield (
        i,
        {
          "image": common.image_bytes(path, cfg.image_size),
          "face_mask": common.rgb_png(mask[..., None]),
          "parsing": common.rgb_png(parsing[..., None]),
          "image_id": i,
        },
      )
