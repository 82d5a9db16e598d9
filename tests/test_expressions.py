"""The 135-word expression vocabulary against the labels DiffSFSR's appendix prints."""

import sys

import numpy as np
import pytest

from facediff import expressions

# Every "N. word" caption printed in the DiffSFSR appendix (Fig. 14-47).
PAPER_LABELS = {
  9: "amusement",
  10: "anger",
  11: "anguish",
  12: "annoyance",
  13: "anxiety",
  14: "apprehension",
  15: "arousal",
  16: "astonishment",
  21: "cheerfulness",
  22: "compassion",
  23: "contempt",
  24: "contentment",
  41: "embarrassment",
  42: "enjoyment",
  43: "enthrallment",
  44: "enthusiasm",
  97: "outrage",
  98: "panic",
  99: "passion",
  100: "pity",
  101: "pleasure",
  102: "pride",
  103: "rage",
  104: "rapture",
  105: "regret",
  106: "rejection",
  107: "relief",
  108: "remorse",
  109: "resentment",
  110: "revulsion",
  111: "sadness",
  112: "satisfaction",
  113: "scorn",
  114: "sentimentality",
  115: "shame",
  116: "shock",
  117: "sorrow",
  118: "spite",
  119: "suffering",
  120: "surprise",
  129: "unhappiness",
  130: "vengefulness",
  131: "woe",
  132: "worry",
}


def test_paper_labels_round_trip():
  v = expressions.vocabulary()
  assert len(v) == 135
  assert v.words == tuple(sorted(v.words))  # alphabetical, as Shaver et al.'s list
  for label, word in PAPER_LABELS.items():
    assert expressions.label_to_word(label) == word
    assert expressions.word_to_label(word) == label
  assert expressions.word_to_label("  Sadness ") == 111


def test_unknown_word_lists_closest():
  with pytest.raises(expressions.UnknownExpressionError) as e:
    expressions.word_to_label("sadnes")
  msg = str(e.value)
  assert "'sadnes'" in msg and "closest" in msg and "sadness" in msg
  with pytest.raises(expressions.UnknownExpressionError, match="out of range 1..135"):
    expressions.label_to_word(136)
  with pytest.raises(expressions.UnknownExpressionError, match="out of range"):
    expressions.label_to_word(0)


def test_index_seeded_retrieval():
  labels = {f"img{i:03d}": (9 if i % 3 == 0 else "worry") for i in range(30)}
  idx = expressions.ExpressionIndex.from_labels(labels)
  assert idx.labels() == [9, 132]
  amuse = set(idx.ids("amusement"))
  assert amuse == {f"img{i:03d}" for i in range(0, 30, 3)}
  draws = [idx.sample("amusement", seed) for seed in range(50)]
  assert draws == [idx.sample("amusement", seed) for seed in range(50)]  # seeded
  assert set(draws) <= amuse and len(set(draws)) > 3
  rng = np.random.default_rng(0)
  assert all(idx.sample(132, rng) not in amuse for _ in range(20))
  with pytest.raises(KeyError, match="'anger'.*no image"):
    idx.ids("anger")
  with pytest.raises(expressions.UnknownExpressionError, match="closest"):
    idx.sample("amusment", 0)


def test_index_from_records_names_missing_field():
  recs = [{"id": b"a", "expression": np.int32(10)}, {"id": "b", "expression": "anger"}]
  idx = expressions.ExpressionIndex.from_records(recs)
  assert idx.ids(10) == ("a", "b")
  with pytest.raises(KeyError, match="record 1: no field 'expression'"):
    expressions.ExpressionIndex.from_records([recs[0], {"id": "c"}])


def test_no_torch_import():
  assert "facediff.expressions" in sys.modules
  import subprocess

  code = (
    "import sys, facediff.expressions as e; e.vocabulary(); "
    "assert 'torch' not in sys.modules and 'jax' not in sys.modules"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def test_index_from_exported_dataset(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter

  from data_pipelines import records
  from data_pipelines.expression_index import index_from_dataset

  shards = []
  for k in range(2):
    name = f"shard-{k}.array_record"
    w = ArrayRecordWriter(str(tmp_path / name), "group_size:1")
    for i in range(3):
      w.write(records.encode_record({"key": f"s{k}i{i}", "expression": np.int32(9 + i)}))
    w.close()
    shards.append(records.ShardInfo(name, 3))
  records.Manifest(
    fields={"key": records.FieldSpec("str", []), "expression": records.FieldSpec("int32", [])},
    shards=shards,
  ).save(str(tmp_path))
  idx = index_from_dataset(str(tmp_path))
  assert idx.ids("amusement") == ("s0i0", "s1i0") and idx.ids(11) == ("s0i2", "s1i2")
  with pytest.raises(KeyError, match="no field 'emotion'"):
    index_from_dataset(str(tmp_path), field="emotion")
