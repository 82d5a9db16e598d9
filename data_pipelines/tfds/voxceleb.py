"""VoxCeleb1 cropped-video builder.

Manual folder layout::

    id10001/<youtube id>/00001.mp4 ...

Each clip is either an ``.mp4`` (decoded with OpenCV's VideoCapture, which the
opencv-python-headless wheel ships with FFmpeg) or a folder ``00001/`` of frames
already extracted as ``<n>.png|jpg`` (used as is). Splits follow the official
VoxCeleb1 verification split: speakers id10270 ... id10309 form ``test``, the other
1,211 ``train``. One example per kept frame.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.tfds import common

TEST_SPEAKERS = tuple(f"id{n}" for n in range(10270, 10310))


@dataclasses.dataclass
class VoxConfig(common.FaceConfig):
  test_speakers: tuple[str, ...] = TEST_SPEAKERS


class FacediffVoxceleb1(common.Builder):
  """VoxCeleb1 face-video frames with speaker, video, clip and frame labels."""

  name = "facediff_voxceleb1"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = VoxConfig
  BUILDER_CONFIGS = [VoxConfig(name="default", description="every frame, original size")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Place the VoxCeleb1 cropped face videos (https://www.robots.ox.ac.uk/~vgg/data/"
    "voxceleb/) in manual_dir as id<nnnnn>/<youtube id>/<nnnnn>.mp4 (or folders of "
    "extracted frames in place of the .mp4 files)."
  )

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": common.image_feature(self.builder_config, encoding="png"),
          "speaker": tfds.features.Text(),
          "video": tfds.features.Text(),
          "clip": tfds.features.Text(),
          "frame": np.int32,
        }
      ),
    )

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    speakers = sorted(
      d for d in os.listdir(manual) if d.startswith("id") and os.path.isdir(os.path.join(manual, d))
    )
    if not speakers:
      raise common.LayoutError(f"{manual}: no id<nnnnn>/ speaker folders")
    test = set(self.builder_config.test_speakers)
    per_split: dict[str, list] = {}
    for spk in speakers:
      for video in sorted(os.listdir(os.path.join(manual, spk))):
        vdir = os.path.join(manual, spk, video)
        if not os.path.isdir(vdir):
          continue
        for clip, path in common.clips_in(vdir):
          per_split.setdefault("test" if spk in test else "train", []).append(
            (spk, video, clip, path)
          )
    return {k: self._generate_examples(v) for k, v in per_split.items()}

  def _generate_examples(self, items):
    cfg = self.builder_config
    for spk, video, clip, path in items:
      for frame, data in common.clip_frames(path, cfg):
        yield (
          f"{spk}/{video}/{clip}/{frame}",
          {"image": data, "speaker": spk, "video": video, "clip": clip, "frame": frame},
        )
