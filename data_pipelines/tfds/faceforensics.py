"""FaceForensics++ frames builder (layout of the official download script).

Manual folder layout (https://github.com/ondyari/FaceForensics)::

    original_sequences/youtube/<c>/videos/000.mp4 ... 999.mp4
    original_sequences/youtube/<c>/images/000/0000.png ...     (extract_compressed_videos.py)
    manipulated_sequences/<Method>/<c>/videos/000_003.mp4 (and images/000_003/...)
    splits/train.json, val.json, test.json   (optional; the repo's dataset/splits/)

with compression <c> in raw, c23, c40. Frames come from ``images/<video>/`` where it
exists (already extracted), else they are decoded from ``videos/<video>.mp4`` with
OpenCV. With the official split files (lists of [target, source] id pairs; a
manipulated video a_b belongs to the split of its pair) the splits are train /
val / test; without them everything goes to one ``all`` split. One example per
kept frame.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.tfds import common

METHODS = ("original", "Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "FaceShifter")


def method_dir(method: str) -> str:
  if method == "original":
    return os.path.join("original_sequences", "youtube")
  if method not in METHODS:
    raise ValueError(f"unknown FaceForensics++ method {method!r}; expected {METHODS}")
  return os.path.join("manipulated_sequences", method)


@dataclasses.dataclass
class FFConfig(common.FaceConfig):
  compression: str = "c23"
  methods: tuple[str, ...] = ("original",)


def _split_of(manual: str) -> dict[str, str] | None:
  """{original video id: split} from splits/*.json, or None if there are none."""
  folder = os.path.join(manual, "splits")
  if not os.path.isdir(folder):
    return None
  table = {}
  for split in ("train", "val", "test"):
    path = os.path.join(folder, f"{split}.json")
    if not os.path.exists(path):
      raise common.LayoutError(f"{path}: missing (splits/ needs train, val, test)")
    with open(path) as f:
      try:
        pairs = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    for pair in pairs:
      for vid in pair:
        table[str(vid)] = split
  return table


class FacediffFaceforensics(common.Builder):
  """FaceForensics++ video frames with method, video and frame labels."""

  name = "facediff_faceforensics"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = FFConfig
  BUILDER_CONFIGS = [FFConfig(name="default", description="original youtube, c23")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download FaceForensics++ with the official script (videos, and optionally "
    "extract frames with dataset/extract_compressed_videos.py) into manual_dir, "
    "keeping original_sequences/ and manipulated_sequences/; copy the repo's "
    "dataset/splits/*.json to manual_dir/splits/ for train/val/test splits."
  )

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": common.image_feature(self.builder_config, encoding="png"),
          "method": tfds.features.ClassLabel(names=METHODS),
          "video": tfds.features.Text(),
          "frame": np.int32,
        }
      ),
    )

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    cfg = self.builder_config
    splits = _split_of(manual)
    per_split: dict[str, list] = {}
    for method in cfg.methods:
      base = os.path.join(manual, method_dir(method), cfg.compression)
      images, videos = os.path.join(base, "images"), os.path.join(base, "videos")
      clips = dict(common.clips_in(videos)) if os.path.isdir(videos) else {}
      if os.path.isdir(images):  # extracted frames win over the video
        clips.update({k: v for k, v in common.clips_in(images) if os.path.isdir(v)})
      if not clips:
        raise common.LayoutError(f"{base}: no videos/<video>.mp4 or images/<video>/")
      for video, path in sorted(clips.items()):
        if splits is None:
          split = "all"
        else:
          split = splits.get(video.split("_")[0])
          if split is None:
            continue  # not in the official splits
        per_split.setdefault(split, []).append((method, video, path))
    return {k: self._generate_examples(v) for k, v in per_split.items()}

  def _generate_examples(self, items):
    cfg = self.builder_config
    for method, video, path in items:
      for frame, data in common.clip_frames(path, cfg):
        yield (
          f"{method}/{video}/{frame}",
          {"image": data, "method": method, "video": video, "frame": frame},
        )
