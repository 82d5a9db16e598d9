"""The FaceForensics++ swap protocol: the shipped pairs file against the dataset's facts,
the frame-index formula written out, the frame extractor on a tiny fake FF++ tree of
lossless mp4 videos written with OpenCV (pixel for pixel), and the export step with
its eval pairs on videos of a real face."""

import json
import os

import cv2
import numpy as np
import pytest

from data_pipelines import records
from data_pipelines.protocols import ffpp
from data_pipelines.protocols import pairs as pairs_lib


def test_protocol_file_has_the_1000_ordered_pairs_of_the_splits():
  p = ffpp.load_protocol()
  assert p.name == "ffpp_swap" and p.frames_per_video == 10
  names = [x.name for x in p.pairs]
  assert len(names) == len(set(names)) == 1000
  ordered = {(x.target, x.source) for x in p.pairs}
  assert all((s, t) in ordered for t, s in ordered)  # a_b and b_a
  assert all(t != s for t, s in ordered)
  ids = {v for pair in ordered for v in pair}
  assert ids == {f"{i:03d}" for i in range(1000)}
  # Each original video is the target of one manipulated video and the source of one.
  assert sorted(t for t, _ in ordered) == sorted(ids) == sorted(s for _, s in ordered)
  # 360 / 70 / 70 unordered pairs: each split holds both orders of its pairs.
  for split, n in (("train", 720), ("val", 140), ("test", 140)):
    sel = p.select([split])
    assert len(sel.pairs) == n and len(sel.videos()) == n
    assert all((x.source, x.target) in {(y.target, y.source) for y in sel.pairs} for x in sel.pairs)
  with pytest.raises(ffpp.ProtocolError, match="unknown"):
    p.select(["dev"])


def test_frame_indices_are_the_segment_middles():
  assert ffpp.frame_indices(10) == list(range(10))
  assert ffpp.frame_indices(100) == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95]
  assert ffpp.frame_indices(25) == [1, 3, 6, 8, 11, 13, 16, 18, 21, 23]
  for n in (10, 11, 19, 397, 1000):
    idx = ffpp.frame_indices(n)
    for k, i in enumerate(idx):  # i_k = floor((2k + 1) n / 20), inside segment k
      assert i == int(np.floor((2 * k + 1) * n / 20))
      assert abs(i - (2 * k + 1) * n / 20) < 1  # the middle of segment k, rounded down
    assert idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < n
  assert ffpp.frame_indices(7, count=3) == [1, 3, 5]
  with pytest.raises(ffpp.ProtocolError, match="9 frames"):
    ffpp.frame_indices(9)


def _write_video(path, frames):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  h, w = frames[0].shape[:2]
  wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 25, (w, h))
  if not wr.isOpened():
    pytest.skip("this OpenCV cannot write FFV1 (lossless) mp4")
  for f in frames:
    wr.write(np.ascontiguousarray(f[..., ::-1]))  # RGB -> BGR
  wr.release()


def _fake_tree(root, lengths, compression_dir="c23", seed=0):
  rng = np.random.default_rng(seed)
  written = {}
  for video, n in lengths.items():
    frames = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(n)]
    _write_video(os.path.join(root, ffpp.VIDEOS, compression_dir, "videos", f"{video}.mp4"), frames)
    written[video] = frames
  return written


def _tiny_protocol(pairs, count=10):
  sp = tuple(ffpp.SwapPair(t, s, "test") for t, s in pairs)
  return ffpp.Protocol("ffpp_swap", sp, count)


def test_extractor_writes_the_protocol_frames_pixel_for_pixel(tmp_path):
  lengths = {"000": 12, "001": 23, "002": 10, "003": 31}
  written = _fake_tree(tmp_path / "ffpp", lengths)
  proto = _tiny_protocol([("000", "001"), ("001", "000"), ("002", "003"), ("003", "002")])
  frames_dir = tmp_path / "frames"
  index = ffpp.extract_frames(str(tmp_path / "ffpp"), str(frames_dir), proto, ffpp.FFPPConfig())
  assert sorted(index) == sorted(lengths)
  for video, n in lengths.items():
    assert index[video] == {"num_frames": n, "frames": ffpp.frame_indices(n)}
    files = sorted(os.listdir(frames_dir / video))
    assert files == [f"{i:06d}.png" for i in ffpp.frame_indices(n)]
    for i in ffpp.frame_indices(n):
      got = cv2.cvtColor(cv2.imread(str(frames_dir / ffpp.frame_key(video, i))), cv2.COLOR_BGR2RGB)
      np.testing.assert_array_equal(got, written[video][i])
  assert ffpp.count_frames(ffpp.video_path(str(tmp_path / "ffpp"), "003", "c23")) == lengths["003"]
  # A re-run finds everything extracted; the index on disk says the same.
  assert ffpp.extract_frames(str(tmp_path / "ffpp"), str(frames_dir), proto, ffpp.FFPPConfig()) == (
    index
  )
  with open(frames_dir / "index.json") as f:
    assert json.load(f) == index
  # Pairs: slot k pairs the k-th frames of target and source.
  wanted = ffpp.wanted_pairs(proto, index)
  assert len(wanted) == 40
  w = next(x for x in wanted if x["name"] == "002_003" and x["slot"] == 4)
  assert w["target_key"] == "002/000004.png"
  assert w["source_key"] == f"003/{ffpp.frame_indices(31)[4]:06d}.png"


def test_compression_folders_and_missing_videos(tmp_path):
  root = tmp_path / "ffpp"
  _fake_tree(root, {"010": 10}, compression_dir="raw")
  assert ffpp.video_path(str(root), "010", "c0").endswith(os.path.join("raw", "videos", "010.mp4"))
  with pytest.raises(FileNotFoundError, match="c40"):
    ffpp.video_path(str(root), "010", "c40")
  with pytest.raises(ffpp.ProtocolError, match="compression"):
    ffpp.video_path(str(root), "010", "c99")
  proto = _tiny_protocol([("010", "011"), ("011", "010")])
  cfg = ffpp.FFPPConfig(compression="c0")
  with pytest.raises(FileNotFoundError, match="011"):
    ffpp.extract_frames(str(root), str(tmp_path / "f"), proto, cfg)
  cfg.require_complete = False
  index = ffpp.extract_frames(str(root), str(tmp_path / "f"), proto, cfg)
  assert list(index) == ["010"] and ffpp.wanted_pairs(proto, index) == []


def test_eval_pairs_resolve_keys_to_record_indices(tmp_path):
  keys = ["000/000001.png", "001/000001.png", "001/000003.png"]
  wanted = [
    {"source_key": keys[1], "target_key": keys[0], "name": "000_001", "slot": 0},
    {"source_key": keys[0], "target_key": keys[2], "name": "001_000", "slot": 1},
    {"source_key": "000/000009.png", "target_key": keys[0], "name": "000_001", "slot": 1},
  ]
  out = pairs_lib.write(str(tmp_path), wanted, {"protocol": "ffpp_swap", "task": "swap"}, keys)
  assert len(out["pairs"]) == 2 and out["dropped"][0]["missing"] == ["000/000009.png"]
  got = pairs_lib.load(str(tmp_path), protocol="ffpp_swap", task="swap")
  np.testing.assert_array_equal(got.source, [1, 0])
  np.testing.assert_array_equal(got.target, [0, 2])
  assert got.target_keys == (keys[0], keys[2]) and got.meta["protocol"] == "ffpp_swap"
  with pytest.raises(pairs_lib.PairsError, match="task 'swap', expected 'reenact'"):
    pairs_lib.load(str(tmp_path), task="reenact")
  with pytest.raises(pairs_lib.PairsError, match="missing"):
    pairs_lib.load(str(tmp_path / "nowhere"))


def test_export_step_on_videos_of_a_real_face(tmp_path):
  """The whole step: frames of four videos of a real face (the astronaut, shifted per
  frame) through the exporter (dlib detection, the Small mask) into a dataset whose keys
  name video and frame, and eval pairs that point at them."""
  pytest.importorskip("dlib")
  import skimage.data

  from data_pipelines import export as export_lib

  # dlib's HOG box of the astronaut's face is (175, 76, 265, 166): cut it with a margin.
  face = skimage.data.astronaut()[46:196, 145:295]
  face = cv2.resize(face, (120, 120), interpolation=cv2.INTER_AREA)
  lengths = {"000": 10, "001": 11, "002": 12, "003": 10}
  root = tmp_path / "ffpp"
  for v, n in lengths.items():
    frames = []
    for i in range(n):
      canvas = np.full((140, 150, 3), 40 * int(v) + 20, np.uint8)
      canvas[10 : 10 + 120, 5 + i % 20 : 5 + i % 20 + 120] = face
      frames.append(canvas)
    _write_video(os.path.join(root, ffpp.VIDEOS, "c40", "videos", f"{v}.mp4"), frames)
  pairs = [("000", "001"), ("001", "000"), ("002", "003"), ("003", "002")]
  proto = _tiny_protocol(pairs, count=3)  # 3 frames per video keep the test short
  ecfg = export_lib.ExportConfig(encoders=("mask68_small",), image_size=64, shard_size=8)
  out = ffpp.export(
    str(root), str(tmp_path / "out"), ecfg, ffpp.FFPPConfig(compression="c40"), proto
  )
  data = str(tmp_path / "out" / "dataset")
  keys = pairs_lib.record_keys(data)
  assert len(keys) == 12 and keys == sorted(keys)
  assert keys[:3] == [ffpp.frame_key("000", i) for i in ffpp.frame_indices(10, 3)]
  assert records.Manifest.load(data).fields["mask_small"].shape == [64, 64]
  assert len(out["pairs"]) == 12 and not out["dropped"]
  got = pairs_lib.load(data, protocol="ffpp_swap", task="swap")
  assert got.meta["compression"] == "c40" and got.meta["frames_per_video"] == 3
  for s, t, sk, tk in zip(got.source, got.target, got.source_keys, got.target_keys, strict=True):
    assert keys[s] == sk and keys[t] == tk
    assert sk.split("/")[0] != tk.split("/")[0]  # different videos: different identities
