"""Evaluation pairs of an exported dataset: ``<dataset>/eval_pairs.json``.

A protocol step (e.g. ``data_pipelines.protocols.ffpp``) writes it next to the shards
once the export is done; ``launch.evaluate --protocol NAME`` reads it. Format
(facediff's own)::

    {"format": "facediff-eval-pairs/1", "protocol": "ffpp_swap", "task": "swap",
     ...protocol settings...,
     "pairs": [{"source": 12, "target": 0, "source_key": "003/000012.png",
                "target_key": "000/000012.png", "name": "000_003", "slot": 0,
                "split": "train"}, ...],
     "dropped": [{"name": ..., "slot": ..., "missing": [keys]}, ...]}

``source`` / ``target`` are record indices in the dataset's record order (shard by shard,
as ``records.iter_records`` and the loaders count them); the keys let a reader check
that the indices still name the records they were written for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

FILE = "eval_pairs.json"
FORMAT = "facediff-eval-pairs/1"


class PairsError(ValueError):
  """An eval-pairs file that is missing, malformed or does not fit its dataset."""


@dataclasses.dataclass(frozen=True)
class EvalPairs:
  """The pairs of one dataset: ``source``/``target`` (N,) int64 record indices, their
  keys, and the file's other entries (``meta``: protocol, task, settings)."""

  source: np.ndarray
  target: np.ndarray
  source_keys: tuple[str, ...]
  target_keys: tuple[str, ...]
  meta: dict[str, Any]

  def __len__(self) -> int:
    return int(self.source.shape[0])


def record_keys(folder: str) -> list[str]:
  """Every record's ``key`` in record order."""
  from data_pipelines import records

  out = []
  for rec in records.iter_records(folder):
    k = rec.get("key")
    out.append(k.decode() if isinstance(k, bytes) else str(k))
  return out


def write(
  folder: str,
  wanted: Sequence[Mapping[str, Any]],
  meta: Mapping[str, Any],
  keys: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Resolves ``wanted`` pairs ({"source_key", "target_key", and any labels}) to record
  indices of the dataset in ``folder`` and writes ``folder/eval_pairs.json``; a pair
  whose record is missing (e.g. no face found at export) goes to ``dropped``. Returns
  what was written."""
  keys = record_keys(folder) if keys is None else list(keys)
  index = {k: i for i, k in enumerate(keys)}
  pairs, dropped = [], []
  for w in wanted:
    missing = [k for k in (w["source_key"], w["target_key"]) if k not in index]
    labels = {k: v for k, v in w.items() if k not in ("source_key", "target_key")}
    if missing:
      dropped.append({**labels, "missing": missing})
      continue
    pairs.append(
      {
        "source": index[w["source_key"]],
        "target": index[w["target_key"]],
        "source_key": w["source_key"],
        "target_key": w["target_key"],
        **labels,
      }
    )
  out = {"format": FORMAT, **dict(meta), "pairs": pairs, "dropped": dropped}
  path = os.path.join(folder, FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
  os.replace(tmp, path)
  return out


def load(folder: str, protocol: str | None = None, task: str | None = None) -> EvalPairs:
  """The pairs of ``folder/eval_pairs.json``; ``protocol`` / ``task``: what the caller
  expects the file to hold (checked)."""
  path = os.path.join(folder, FILE)
  if not os.path.exists(path):
    raise PairsError(
      f"{path}: missing; the dataset has no evaluation pairs (write them with the "
      f"protocol's export step, e.g. python -m data_pipelines.protocols.ffpp)"
    )
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise PairsError(f"{path}: unreadable ({e})") from None
  if d.get("format") != FORMAT:
    raise PairsError(f"{path}: format {d.get('format')!r}, expected {FORMAT!r}")
  for name, want in (("protocol", protocol), ("task", task)):
    if want is not None and d.get(name) != want:
      raise PairsError(f"{path}: {name} {d.get(name)!r}, expected {want!r}")
  rows = d.get("pairs")
  if not isinstance(rows, list) or not rows:
    raise PairsError(f"{path}: no pairs")
  try:
    src = np.array([int(r["source"]) for r in rows], np.int64)
    tgt = np.array([int(r["target"]) for r in rows], np.int64)
    sk = tuple(str(r["source_key"]) for r in rows)
    tk = tuple(str(r["target_key"]) for r in rows)
  except (KeyError, TypeError, ValueError) as e:
    raise PairsError(f"{path}: malformed pair ({e!r})") from None
  meta = {k: v for k, v in d.items() if k not in ("pairs", "format")}
  return EvalPairs(src, tgt, sk, tk, meta)
