"""The offline demo dataset: real faces, real encoders, no network."""

import json
import os
import socket

import numpy as np
import pytest

pytest.importorskip("dlib")
from array_record.python.array_record_module import ArrayRecordReader  # noqa: E402

from data_pipelines import demo, records  # noqa: E402


def test_sources_are_single_faces():
  from data_pipelines.faces import FaceDetector

  src = demo.source_faces()
  assert len(src) == 8
  det = FaceDetector()
  for ident, img in src.items():
    assert len(det(img)) == 1, ident
  rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
  a = demo.augment(src["tom_hanks"], rng1)
  np.testing.assert_array_equal(a, demo.augment(src["tom_hanks"], rng2))  # seeded
  assert a.shape == (demo.CANVAS, demo.CANVAS, 3)


def test_build_small_offline(tmp_path, monkeypatch):
  def no_network(*a, **k):
    raise AssertionError("the demo must not touch the network")

  monkeypatch.setattr(socket, "socket", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  out = str(tmp_path / "demo")
  m = demo.build(out, num=24, seed=0, image_size=128, shard_size=10)
  c = m.counters
  assert c["inputs"] == 24 and c["written"] + c["no_face"] + c["multiple_faces"] == 24
  assert c["written"] >= 20 and c["corrupt"] == 0
  assert set(m.fields) >= {"image", "mask", "mask_small", "id_dlib", "exp_fer", "landmarks"}
  recs = []
  for s in m.shards:
    r = ArrayRecordReader(os.path.join(out, s.path))
    recs += [records.decode_record(b) for b in r.read_all()]
    r.close()
  assert len(recs) == m.num_records
  ident = np.array([r["key"].split("/")[0] for r in recs])
  assert len(set(ident)) == 8
  # real dlib embeddings: augmented copies of one person sit closer than other people
  e = np.stack([r["id_dlib"] for r in recs])
  d = np.linalg.norm(e[:, None] - e[None], axis=-1)
  same = ident[:, None] == ident[None]
  off = ~np.eye(len(e), dtype=bool)
  assert d[same & off].mean() < 0.45 < d[~same].mean()
  np.testing.assert_allclose(np.stack([r["exp_fer"] for r in recs]).sum(-1), 1, atol=1e-5)
  # re-running resumes: nothing redone, same manifest
  before = open(os.path.join(out, records.MANIFEST)).read()
  demo.build(out, num=24, seed=0, image_size=128, shard_size=10)
  assert json.loads(open(os.path.join(out, records.MANIFEST)).read()) == json.loads(before)
  with pytest.raises(Exception, match="another --out"):
    demo.build(out, num=30, seed=0, image_size=128, shard_size=10)
