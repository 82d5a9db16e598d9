"""FaceForensics++ face-swap protocol (TGDM Sec. 5.4 and Tab. 4: "FaceForensics++ is
used for testing, which is a forensics dataset consisting of 1000 videos").

    python -m data_pipelines.protocols.ffpp --root FFPP --output DIR [--compression c23]
        [--splits train,val,test] [--encoders curricularface,d3dfr,fer,mask68_small]
        [--weights NAME=PATH ...] [--image-size 256]

then ``python -m launch.evaluate --workdir SWAP_WORKDIR --data DIR/dataset --protocol ffpp``.

The protocol (``ffpp_swap.json``, shipped with this module): FF++'s 1000 manipulated
videos are named TTT_SSS (target video TTT with the face of source video SSS); they come
from the dataset's published split of 500 unordered pairs of its original videos
(360 train / 70 val / 70 test, ``dataset/splits/*.json`` of github.com/ondyari/FaceForensics),
each pair {a, b} giving a_b and b_a. From every video the protocol takes
``frames_per_video`` = 10 evenly spaced frames (``frame_indices``). The evaluation pairs
are (pair TTT_SSS, slot k) for k = 0..9: target = TTT's k-th protocol frame, source =
SSS's k-th protocol frame: 10,000 swaps over all three splits.

Steps (``export``):

1. ``extract_frames``: the protocol frames of every video the selected splits use,
   decoded with OpenCV from ``<root>/original_sequences/youtube/<compression>/videos/
   <id>.mp4`` and written as ``<output>/frames/<id>/<frame:06d>.png`` (a re-run skips
   videos already extracted; ``frames/index.json`` records each video's frame count and
   indices).
2. ``data_pipelines.export`` on that folder: the exporter's face detection, crops and
   encoders; the record keys ``<id>/<frame:06d>.png`` identify video and frame.
3. ``pairs.write``: ``<output>/eval_pairs.json`` with the record indices of every
   (pair, slot) whose two frames were exported (a frame without exactly one face is
   dropped by the exporter, and its pairs are listed under ``dropped``).

Compression (``FFPPConfig.compression``): ``c0`` (FF++'s uncompressed videos, in the
folder ``raw``, as its download script names it; a folder ``c0`` is accepted too),
``c23`` (high quality) or ``c40`` (low quality).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Sequence

import numpy as np

from data_pipelines.protocols import pairs as pairs_lib

log = logging.getLogger("data_pipelines.protocols.ffpp")

PROTOCOL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ffpp_swap.json")
PROTOCOL_FORMAT = "facediff-protocol/1"
PROTOCOL_NAME = "ffpp_swap"
SPLITS = ("train", "val", "test")
# Compression level -> folder names under original_sequences/youtube/, tried in order.
COMPRESSIONS = {"c0": ("raw", "c0"), "c23": ("c23",), "c40": ("c40",)}
VIDEOS = os.path.join("original_sequences", "youtube")
# The swap model's inputs (configs/tgdm.py:swap): CurricularFace z_id, D3DFR
# coefficients, the fer expression the loaders read, and TGDM's "Small" mask.
DEFAULT_ENCODERS = ("curricularface", "d3dfr", "fer", "mask68_small")


class ProtocolError(ValueError):
  """A protocol file or FF++ folder that does not have the expected content."""


# ----------------------------------------------------------------------------- protocol


@dataclasses.dataclass(frozen=True)
class SwapPair:
  """One manipulated video TTT_SSS: ``target`` TTT with the face of ``source`` SSS."""

  target: str
  source: str
  split: str

  @property
  def name(self) -> str:
    return f"{self.target}_{self.source}"


@dataclasses.dataclass(frozen=True)
class Protocol:
  name: str
  pairs: tuple[SwapPair, ...]
  frames_per_video: int

  def select(self, splits: Sequence[str]) -> Protocol:
    bad = [s for s in splits if s not in SPLITS]
    if bad:
      raise ProtocolError(f"splits {bad}: unknown (one of {SPLITS})")
    return dataclasses.replace(self, pairs=tuple(p for p in self.pairs if p.split in splits))

  def videos(self) -> list[str]:
    """Every video id a pair uses, sorted."""
    return sorted({v for p in self.pairs for v in (p.target, p.source)})


def load_protocol(path: str = PROTOCOL_FILE) -> Protocol:
  """The protocol file (default: the shipped ``ffpp_swap.json``), checked: names
  TTT_SSS of 3-digit ids, no self pair, no pair twice."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ProtocolError(f"{path}: unreadable ({e})") from None
  if d.get("format") != PROTOCOL_FORMAT:
    raise ProtocolError(f"{path}: format {d.get('format')!r}, expected {PROTOCOL_FORMAT!r}")
  out, seen = [], set()
  for split, names in dict(d.get("pairs", {})).items():
    if split not in SPLITS:
      raise ProtocolError(f"{path}: split {split!r} unknown (one of {SPLITS})")
    for name in names:
      parts = str(name).split("_")
      if len(parts) != 2 or not all(len(p) == 3 and p.isdigit() for p in parts):
        raise ProtocolError(f"{path}: pair {name!r} is not TTT_SSS")
      if parts[0] == parts[1] or name in seen:
        raise ProtocolError(f"{path}: pair {name!r} is a self pair or listed twice")
      seen.add(name)
      out.append(SwapPair(parts[0], parts[1], split))
  n = int(d.get("frames_per_video", 0))
  if n < 1 or not out:
    raise ProtocolError(f"{path}: needs pairs and frames_per_video >= 1")
  return Protocol(str(d.get("name", "")), tuple(out), n)


def frame_indices(num_frames: int, count: int = 10) -> list[int]:
  """The ``count`` evenly spaced frames of a video of ``num_frames`` frames (0-based):
  the middle frame of each of ``count`` equal segments,

      i_k = floor((2 k + 1) * num_frames / (2 count)),   k = 0 .. count - 1,

  e.g. 100 frames -> 5, 15, ..., 95; 10 frames -> 0 .. 9. Consecutive indices are
  num_frames / count >= 1 apart, so they are distinct; needs num_frames >= count."""
  n, c = int(num_frames), int(count)
  if c < 1 or n < c:
    raise ProtocolError(f"frame_indices: {n} frames cannot give {c} distinct frames")
  return [(2 * k + 1) * n // (2 * c) for k in range(c)]


# ----------------------------------------------------------------------------- videos


@dataclasses.dataclass
class FFPPConfig:
  """``compression``: c0, c23 or c40 (module doc). ``splits``: the protocol's splits to
  use. ``require_complete``: fail on a missing video (off: skip it; its pairs are
  dropped)."""

  compression: str = "c23"
  splits: tuple[str, ...] = SPLITS
  require_complete: bool = True


def video_path(root: str, video: str, compression: str) -> str:
  """``<root>/original_sequences/youtube/<c>/videos/<video>.mp4`` of the compression's
  folder; raises naming the paths tried when none exists."""
  if compression not in COMPRESSIONS:
    raise ProtocolError(f"compression {compression!r}: one of {sorted(COMPRESSIONS)}")
  tried = []
  for folder in COMPRESSIONS[compression]:
    p = os.path.join(root, VIDEOS, folder, "videos", f"{video}.mp4")
    if os.path.exists(p):
      return p
    tried.append(p)
  raise FileNotFoundError(f"FF++ video {video} ({compression}): none of {tried} exists")


def _open(path: str):
  import cv2

  cap = cv2.VideoCapture(os.fspath(path))
  if not cap.isOpened():
    raise ProtocolError(f"{path}: OpenCV cannot open this video")
  return cap


def count_frames(path: str) -> int:
  """Frames OpenCV decodes from the video (every frame grabbed: exact, unlike the
  container's frame-count field)."""
  cap = _open(path)
  n = 0
  try:
    while cap.grab():
      n += 1
  finally:
    cap.release()
  return n


def read_frames(path: str, count: int) -> tuple[int, dict[int, np.ndarray]]:
  """(number of frames, {index: RGB uint8 frame}) of the ``frame_indices(n, count)``
  frames. One decoding pass with n from the container; if the pass finds another
  number of frames, a second pass with the counted n."""
  import cv2

  cap = _open(path)
  n_hint = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
  cap.release()
  for n in (n_hint, None):
    if n is None:
      n = count_frames(path)
    if n < count:
      raise ProtocolError(f"{path}: {n} frames, fewer than the protocol's {count}")
    wanted = set(frame_indices(n, count))
    frames: dict[int, np.ndarray] = {}
    cap = _open(path)
    i = 0
    try:
      while cap.grab():
        if i in wanted:
          ok, bgr = cap.retrieve()
          if not ok:
            raise ProtocolError(f"{path}: frame {i} does not decode")
          frames[i] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        i += 1
    finally:
      cap.release()
    if i == n:
      return n, frames
    log.info("%s: the container says %d frames, %d decode; reading again", path, n, i)
  raise ProtocolError(f"{path}: the frame count changes between two decoding passes")


def frame_key(video: str, index: int) -> str:
  """The exported record key (and frame file path) of a video's frame."""
  return f"{video}/{index:06d}.png"


def extract_frames(
  root: str, frames_dir: str, protocol: Protocol, cfg: FFPPConfig
) -> dict[str, dict[str, Any]]:
  """Writes the protocol frames of every video of ``protocol`` (already restricted to
  ``cfg.splits``) as PNGs under ``frames_dir``; returns {video: {"num_frames",
  "frames"}} (also written to ``frames_dir/index.json``), missing videos left out
  (only when not ``cfg.require_complete``)."""
  import cv2

  os.makedirs(frames_dir, exist_ok=True)
  index_path = os.path.join(frames_dir, "index.json")
  index: dict[str, dict[str, Any]] = {}
  if os.path.exists(index_path):
    with open(index_path) as f:
      index = json.load(f)
  count = protocol.frames_per_video
  for video in protocol.videos():
    done = index.get(video)
    if done and all(
      os.path.exists(os.path.join(frames_dir, frame_key(video, i))) for i in done["frames"]
    ):
      continue
    try:
      path = video_path(root, video, cfg.compression)
    except FileNotFoundError:
      if cfg.require_complete:
        raise
      log.warning("FF++ video %s is missing, skipped", video)
      continue
    n, frames = read_frames(path, count)
    os.makedirs(os.path.join(frames_dir, video), exist_ok=True)
    for i, rgb in sorted(frames.items()):
      out = os.path.join(frames_dir, frame_key(video, i))
      if not cv2.imwrite(out, np.ascontiguousarray(rgb[..., ::-1])):
        raise ProtocolError(f"{out}: could not write the frame")
    index[video] = {"num_frames": n, "frames": sorted(frames)}
    tmp = index_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(index, f, indent=1, sort_keys=True)
    os.replace(tmp, index_path)
  return {v: index[v] for v in protocol.videos() if v in index}


def wanted_pairs(protocol: Protocol, index: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """(pair, slot k) -> target = TTT's k-th protocol frame, source = SSS's k-th; pairs of
  a video that was not extracted are left out."""
  out = []
  for p in protocol.pairs:
    if p.target not in index or p.source not in index:
      continue
    t, s = index[p.target]["frames"], index[p.source]["frames"]
    for k in range(min(len(t), len(s))):
      out.append(
        {
          "source_key": frame_key(p.source, s[k]),
          "target_key": frame_key(p.target, t[k]),
          "name": p.name,
          "slot": k,
          "split": p.split,
        }
      )
  return out


def export(
  root: str,
  output: str,
  export_cfg=None,
  cfg: FFPPConfig | None = None,
  protocol: Protocol | None = None,
) -> dict[str, Any]:
  """The three steps of the module doc; returns what ``eval_pairs.json`` holds.
  ``export_cfg``: a ``data_pipelines.export.ExportConfig`` (default: the
  ``DEFAULT_ENCODERS``, weights from nowhere: pass yours)."""
  from data_pipelines import export as export_lib

  cfg = cfg or FFPPConfig()
  if cfg.compression not in COMPRESSIONS:
    raise ProtocolError(f"compression {cfg.compression!r}: one of {sorted(COMPRESSIONS)}")
  protocol = (protocol or load_protocol()).select(cfg.splits)
  export_cfg = export_cfg or export_lib.ExportConfig(encoders=DEFAULT_ENCODERS)
  frames_dir = os.path.join(output, "frames")
  index = extract_frames(root, frames_dir, protocol, cfg)
  manifest = export_lib.export(
    export_lib.FolderSource(frames_dir), os.path.join(output, "dataset"), export_cfg
  )
  if manifest is None:  # another worker still exports
    return {}
  meta = {
    "protocol": protocol.name or PROTOCOL_NAME,
    "task": "swap",
    "compression": cfg.compression,
    "splits": list(cfg.splits),
    "frames_per_video": protocol.frames_per_video,
    "frame_rule": "i_k = floor((2k+1) n / (2 frames_per_video)), k = 0..frames_per_video-1",
    "pairing": "target = TTT's k-th protocol frame, source = SSS's k-th, per pair TTT_SSS",
  }
  return pairs_lib.write(os.path.join(output, "dataset"), wanted_pairs(protocol, index), meta)


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
  from data_pipelines import encoders as enc_lib
  from data_pipelines import export as export_lib

  p = argparse.ArgumentParser(
    prog="python -m data_pipelines.protocols.ffpp",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--root", required=True, help="the FF++ download folder")
  p.add_argument("--output", required=True, help="frames/ and dataset/ go here")
  p.add_argument("--compression", choices=sorted(COMPRESSIONS), default="c23")
  p.add_argument("--splits", default=",".join(SPLITS))
  p.add_argument("--encoders", default=",".join(DEFAULT_ENCODERS))
  p.add_argument("--weights", action="append", default=[], metavar="NAME=PATH")
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--shard-size", type=int, default=256)
  p.add_argument("--allow-missing", action="store_true", help="skip missing videos")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  weights = {}
  for item in a.weights:
    if "=" not in item:
      print(f"ffpp: error: --weights {item!r}: expected NAME=PATH", file=sys.stderr)
      return 2
    k, v = item.split("=", 1)
    weights[k.strip()] = v
  cfg = FFPPConfig(
    compression=a.compression,
    splits=tuple(s for s in a.splits.split(",") if s),
    require_complete=not a.allow_missing,
  )
  ecfg = export_lib.ExportConfig(
    encoders=[e for e in a.encoders.split(",") if e],
    weights=weights,
    image_size=a.image_size,
    shard_size=a.shard_size,
  )
  try:
    out = export(a.root, a.output, ecfg, cfg)
  except (ProtocolError, FileNotFoundError, export_lib.ExportError, enc_lib.WeightsError) as e:
    print(f"ffpp: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"pairs": len(out.get("pairs", [])), "dropped": len(out.get("dropped", []))}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
