"""tfds builders: tiny fake folders in the real layouts, built to ArrayRecord and read
back with tfds data sources, all without TensorFlow."""

import json
import os

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import tfds as facediff_tfds
from data_pipelines.tfds import celeba, mead


def write_image(path, rgb):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(path, np.ascontiguousarray(rgb[..., ::-1]))


def colour(i):
  return np.array([(40 * i) % 256, 100, 200 - 10 * (i % 10)], np.uint8)


def flat(i, h=8, w=8):
  return np.broadcast_to(colour(i), (h, w, 3)).copy()


def write_video(path, num_frames, h=16, w=16):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 25, (w, h))
  assert vw.isOpened()
  for i in range(num_frames):
    vw.write(np.ascontiguousarray(flat(i, h, w)[..., ::-1]))
  vw.release()


def read_all(source):
  return [source[i] for i in range(len(source))]


def close_colour(img, i, tol=14):
  return np.abs(img.reshape(-1, 3).mean(0) - colour(i)).max() < tol


# ----------------------------------------------------------------------------- splits


def test_celeba_hq_split_is_the_fixed_29k_1k_partition():
  train, test = celeba.celeba_hq_split(range(30000), seed=0)
  assert len(train) == 29000 and len(test) == 1000
  assert not set(train.tolist()) & set(test.tolist())
  assert set(train.tolist()) | set(test.tolist()) == set(range(30000))
  t2, s2 = celeba.celeba_hq_split(seed=0)  # default id list = range(30000)
  np.testing.assert_array_equal(train, t2)
  np.testing.assert_array_equal(test, s2)
  _, other = celeba.celeba_hq_split(seed=1)
  assert not np.array_equal(test, other)


def test_mead_split():
  subjects = [f"M{i:03d}" for i in range(48)]
  train, test = mead.mead_split(subjects, 36, seed=0)
  assert len(train) == 36 and len(test) == 12 and not set(train) & set(test)
  assert mead.mead_split(reversed(subjects), 36, seed=0) == (train, test)
  with pytest.raises(ValueError, match="num_train=50"):
    mead.mead_split(subjects, 50)


# ----------------------------------------------------------------------------- images


def _celeba_ids():
  train, test = celeba.celeba_hq_split()
  return [int(i) for i in train[:3]], [int(i) for i in test[:2]]


def test_celeba_hq(tmp_path):
  train_ids, test_ids = _celeba_ids()
  manual = tmp_path / "manual"
  for i in train_ids + test_ids:
    write_image(str(manual / "CelebA-HQ-img" / f"{i}.jpg"), flat(i))
  with pytest.raises(facediff_tfds.LayoutError, match="5 of 30000 images"):
    facediff_tfds.prepare("facediff_celeba_hq", manual, tmp_path / "data0")
  cfg = facediff_tfds.CelebAConfig(name="partial", require_complete=False)
  src = facediff_tfds.prepare("facediff_celeba_hq", manual, tmp_path / "data", cfg)
  assert len(src["train"]) == 3 and len(src["test"]) == 2
  for split, ids in (("train", train_ids), ("test", test_ids)):
    exs = read_all(src[split])
    assert sorted(e["image_id"] for e in exs) == sorted(ids)
    for e in exs:
      want = cv2.imread(str(manual / "CelebA-HQ-img" / f"{e['image_id']}.jpg"))[..., ::-1]
      np.testing.assert_array_equal(e["image"], want)  # the file's own bytes
  again = tfds.data_source("facediff_celeba_hq/partial", data_dir=str(tmp_path / "data"))
  assert len(again["test"]) == 2

  small = facediff_tfds.CelebAConfig(name="small", require_complete=False, image_size=4)
  src = facediff_tfds.prepare("facediff_celeba_hq", manual, tmp_path / "data", small)
  e = src["train"][0]
  assert e["image"].shape == (4, 4, 3) and close_colour(e["image"], e["image_id"], 4)


def test_celebamask_hq_face_mask(tmp_path):
  train_ids, test_ids = _celeba_ids()
  manual = tmp_path / "manual"
  parts = {
    "skin": (slice(2, 6), slice(2, 6)),
    "nose": (slice(3, 5), slice(3, 5)),
    "eye_g": (slice(2, 3), slice(2, 6)),
    "hair": (slice(0, 2), slice(0, 8)),
  }
  for i in train_ids + test_ids:
    write_image(str(manual / "CelebA-HQ-img" / f"{i}.jpg"), flat(i, 16, 16))
    for part, sl in parts.items():
      m = np.zeros((8, 8), np.uint8)
      m[sl] = 255
      p = manual / "CelebAMask-HQ-mask-anno" / str(i // 2000) / f"{i:05d}_{part}.png"
      os.makedirs(p.parent, exist_ok=True)
      cv2.imwrite(str(p), m)
  cfg = facediff_tfds.CelebAConfig(name="partial", require_complete=False)
  src = facediff_tfds.prepare("facediff_celebamask_hq", manual, tmp_path / "data", cfg)
  assert len(src["train"]) == 3 and len(src["test"]) == 2
  want_mask = np.zeros((8, 8), np.uint8)
  want_mask[3:6, 2:6] = 1  # skin and nose, less the glasses' row
  want_parse = np.zeros((8, 8), np.uint8)
  want_parse[2:6, 2:6] = 1  # skin
  want_parse[3:5, 3:5] = 2  # nose over skin
  want_parse[2, 2:6] = 3  # glasses over skin
  want_parse[0:2, :] = 13  # hair
  for e in read_all(src["train"]) + read_all(src["test"]):
    np.testing.assert_array_equal(e["face_mask"][..., 0], want_mask)
    np.testing.assert_array_equal(e["parsing"][..., 0], want_parse)
    assert e["image"].shape == (16, 16, 3)


def test_ffhq(tmp_path):
  manual = tmp_path / "manual"
  ids = [0, 1, 1000]
  for i in ids:
    write_image(
      str(manual / "images1024x1024" / f"{i // 1000 * 1000:05d}" / f"{i:05d}.png"), flat(i)
    )
  cfg = facediff_tfds.FaceConfig(name="partial", require_complete=False)
  src = facediff_tfds.prepare("facediff_ffhq", manual, tmp_path / "data", cfg)
  exs = read_all(src["train"])
  assert sorted(e["image_id"] for e in exs) == ids
  for e in exs:
    np.testing.assert_array_equal(e["image"], flat(e["image_id"]))  # PNG is lossless
  with pytest.raises(facediff_tfds.LayoutError, match="images1024x1024"):
    facediff_tfds.prepare("facediff_ffhq", tmp_path, tmp_path / "data1", cfg)


# ----------------------------------------------------------------------------- videos


def test_faceforensics(tmp_path):
  manual = tmp_path / "manual"
  orig = manual / "original_sequences" / "youtube" / "c23"
  write_video(str(orig / "videos" / "000.mp4"), 5)
  write_video(str(orig / "videos" / "001.mp4"), 5)
  for f in range(2):  # 002 only as extracted frames (extract_compressed_videos.py)
    write_image(str(orig / "images" / "002" / f"{f:04d}.png"), flat(f, 16, 16))
  write_video(
    str(manual / "manipulated_sequences" / "Deepfakes" / "c23" / "videos" / "000_001.mp4"), 5
  )
  os.makedirs(manual / "splits")
  for split, pairs in (
    ("train", [["000", "001"]]),
    ("val", [["004", "005"]]),
    ("test", [["002", "003"]]),
  ):
    (manual / "splits" / f"{split}.json").write_text(json.dumps(pairs))
  cfg = facediff_tfds.FFConfig(name="t", methods=("original", "Deepfakes"), frame_step=2)
  src = facediff_tfds.prepare("facediff_faceforensics", manual, tmp_path / "data", cfg)
  assert sorted(src) == ["test", "train"]  # val has no videos here
  train = read_all(src["train"])
  names = src["train"].dataset_info.features["method"].names
  got = sorted((names[e["method"]], e["video"].decode(), e["frame"]) for e in train)
  assert got == sorted(
    [("original", v, f) for v in ("000", "001") for f in (0, 2, 4)]
    + [("Deepfakes", "000_001", f) for f in (0, 2, 4)]
  )
  for e in train:
    assert e["image"].shape == (16, 16, 3) and close_colour(e["image"], e["frame"])
  test = read_all(src["test"])
  assert [(e["video"], e["frame"]) for e in test] == [(b"002", 0)]
  np.testing.assert_array_equal(test[0]["image"], flat(0, 16, 16))


def test_voxceleb1(tmp_path):
  manual = tmp_path / "manual"
  write_video(str(manual / "id10001" / "abcDEF" / "00001.mp4"), 4)
  for f in range(2):  # a clip given as extracted frames
    write_image(str(manual / "id10001" / "abcDEF" / "00002" / f"{f}.png"), flat(f, 16, 16))
  write_video(str(manual / "id10270" / "xyz" / "00001.mp4"), 3)
  cfg = facediff_tfds.VoxConfig(name="t", max_frames=3)
  src = facediff_tfds.prepare("facediff_voxceleb1", manual, tmp_path / "data", cfg)
  train, test = read_all(src["train"]), read_all(src["test"])
  assert sorted((e["clip"], e["frame"]) for e in train) == [
    (b"00001", 0),
    (b"00001", 1),
    (b"00001", 2),
    (b"00002", 0),
    (b"00002", 1),
  ]
  assert {e["speaker"] for e in train} == {b"id10001"}
  assert sorted(e["frame"] for e in test) == [0, 1, 2]
  assert {(e["speaker"], e["video"]) for e in test} == {(b"id10270", b"xyz")}
  for e in train + test:
    assert close_colour(e["image"], e["frame"])


def test_mead(tmp_path):
  manual = tmp_path / "manual"
  front = lambda s: manual / s / "video" / "front"  # noqa: E731
  write_video(str(front("M003") / "angry" / "level_2" / "001.mp4"), 3)
  write_video(str(front("M003") / "neutral" / "level_1" / "001.mp4"), 2)
  write_video(str(front("W009") / "happy" / "level_3" / "002.mp4"), 2)
  write_video(str(manual / "W009" / "video" / "left_30" / "happy" / "level_3" / "002.mp4"), 2)
  cfg = facediff_tfds.MeadConfig(name="t", num_train_subjects=1, image_size=8)
  src = facediff_tfds.prepare("facediff_mead", manual, tmp_path / "data", cfg)
  train_subj, test_subj = mead.mead_split(["M003", "W009"], 1, 0)
  names = src["train"].dataset_info.features["emotion"].names
  exs = {"train": read_all(src["train"]), "test": read_all(src["test"])}
  assert {e["subject"].decode() for e in exs["train"]} == set(train_subj)
  assert {e["subject"].decode() for e in exs["test"]} == set(test_subj)
  got = sorted(
    (e["subject"].decode(), names[e["emotion"]], e["intensity"], e["frame"])
    for e in exs["train"] + exs["test"]
  )
  assert got == [
    ("M003", "angry", 2, 0),
    ("M003", "angry", 2, 1),
    ("M003", "angry", 2, 2),
    ("M003", "neutral", 1, 0),
    ("M003", "neutral", 1, 1),
    ("W009", "happy", 3, 0),
    ("W009", "happy", 3, 1),
  ]
  for e in exs["train"] + exs["test"]:
    assert e["image"].shape == (8, 8, 3) and close_colour(e["image"], e["frame"])
