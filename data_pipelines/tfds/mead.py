"""MEAD builder: emotional talking-face video frames with emotion and intensity labels.

Manual folder layout (MEAD release, per subject ``<subject>/video.tar`` extracted)::

    <subject>/video/<view>/<emotion>/level_<n>/<nnn>.mp4
    e.g. M003/video/front/angry/level_2/001.mp4

A clip may also be a folder ``<nnn>/`` of frames ``<k>.png|jpg`` extracted beforehand;
``.mp4`` files are decoded with OpenCV. TGDM uses the front view and "randomly
select[s] 36 identities ... for training and the rest for testing": ``mead_split``
draws that partition of the sorted subject list with a fixed seed (the authors'
list is unpublished). One example per kept frame.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.tfds import common

EMOTIONS = ("neutral", "angry", "contempt", "disgusted", "fear", "happy", "sad", "surprised")
NUM_TRAIN_SUBJECTS = 36


def mead_split(
  subjects, num_train: int = NUM_TRAIN_SUBJECTS, seed: int = 0
) -> tuple[list[str], list[str]]:
  """(train subjects, test subjects), each sorted: a seeded random partition."""
  subjects = sorted(set(subjects))
  if not 0 < num_train <= len(subjects):
    raise ValueError(f"mead_split: num_train={num_train} with {len(subjects)} subjects")
  perm = np.random.default_rng(seed).permutation(len(subjects))
  train = sorted(subjects[i] for i in perm[:num_train])
  return train, sorted(set(subjects) - set(train))


@dataclasses.dataclass
class MeadConfig(common.FaceConfig):
  view: str = "front"
  num_train_subjects: int = NUM_TRAIN_SUBJECTS
  split_seed: int = 0


class FacediffMead(common.Builder):
  """MEAD frames with subject, emotion, intensity (1-3), clip and frame labels."""

  name = "facediff_mead"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = MeadConfig
  BUILDER_CONFIGS = [MeadConfig(name="default", description="front view, every frame")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download MEAD (https://wywu.github.io/projects/MEAD/MEAD.html), extract each "
    "subject's video.tar so that manual_dir holds <subject>/video/front/<emotion>/"
    "level_<n>/<nnn>.mp4."
  )

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": common.image_feature(self.builder_config, encoding="png"),
          "subject": tfds.features.Text(),
          "emotion": tfds.features.ClassLabel(names=EMOTIONS),
          "intensity": np.int32,
          "clip": tfds.features.Text(),
          "frame": np.int32,
        }
      ),
    )

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    cfg = self.builder_config
    clips = {}
    for subject in sorted(os.listdir(manual)):
      root = os.path.join(manual, subject, "video", cfg.view)
      if not os.path.isdir(root):
        continue
      for emotion in sorted(os.listdir(root)):
        if emotion not in EMOTIONS:
          raise common.LayoutError(
            f"{os.path.join(root, emotion)}: unknown emotion; expected {EMOTIONS}"
          )
        for level in sorted(os.listdir(os.path.join(root, emotion))):
          m = re.fullmatch(r"level_(\d)", level)
          if not m:
            continue
          folder = os.path.join(root, emotion, level)
          for clip, path in common.clips_in(folder):
            clips.setdefault(subject, []).append((subject, emotion, int(m.group(1)), clip, path))
    if not clips:
      raise common.LayoutError(
        f"{manual}: no <subject>/video/{cfg.view}/<emotion>/level_<n>/ clips"
      )
    train, test = mead_split(clips, cfg.num_train_subjects, cfg.split_seed)
    out = {"train": self._generate_examples([c for s in train for c in clips[s]])}
    if test:
      out["test"] = self._generate_examples([c for s in test for c in clips[s]])
    return out

  def _generate_examples(self, items):
    cfg = self.builder_config
    for subject, emotion, level, clip, path in items:
      for frame, data in common.clip_frames(path, cfg):
        yield (
          f"{subject}/{emotion}/{level}/{clip}/{frame}",
          {
            "image": data,
            "subject": subject,
            "emotion": emotion,
            "intensity": level,
            "clip": clip,
            "frame": frame,
          },
        )
