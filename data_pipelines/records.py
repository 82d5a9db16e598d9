"""On-disk format of facediff embedding shards.

A dataset is a folder holding ``manifest.json`` and ArrayRecord shards. Each record
is one example: a flat ``{field: value}`` dict serialised with msgpack (numpy arrays
keep dtype and shape; ``bytes`` values hold encoded images). The manifest names every
field with its dtype and per-example shape, the encoder (name, version) that produced
it, the shards with their record counts, and the export's counters.

Shards are written under a temporary name and renamed only once closed, so a crash
never leaves a half-written shard under a final name; a manifest is likewise
replaced atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping

import numpy as np
from flax import serialization

FORMAT = "facediff-shards/1"
MANIFEST = "manifest.json"


class RecordError(ValueError):
  """A record or manifest does not match what the reader expects."""


def encode_record(example: Mapping[str, Any]) -> bytes:
  """Serialises one example (field -> ndarray | bytes | str | number)."""
  out = {}
  for k, v in example.items():
    if isinstance(v, (bytes, str, int, float)):
      out[k] = v
    else:
      out[k] = np.asarray(v)
  return serialization.msgpack_serialize(out)


def decode_record(data: bytes, *, source: str = "<record>") -> dict[str, Any]:
  try:
    rec = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types
    raise RecordError(f"{source}: not a facediff record ({e})") from e
  if not isinstance(rec, dict):
    raise RecordError(f"{source}: record is {type(rec).__name__}, expected a dict")
  return rec


@dataclasses.dataclass
class FieldSpec:
  dtype: str
  shape: list[int]
  encoder: str = ""
  version: str = ""

  @property
  def dim(self) -> int:
    return int(self.shape[-1]) if self.shape else 1


@dataclasses.dataclass
class ShardInfo:
  path: str  # relative to the dataset folder
  count: int


@dataclasses.dataclass
class Manifest:
  fields: dict[str, FieldSpec]
  shards: list[ShardInfo]
  source: str = ""
  counters: dict[str, int] = dataclasses.field(default_factory=dict)
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  format: str = FORMAT

  @property
  def num_records(self) -> int:
    return sum(s.count for s in self.shards)

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["num_records"] = self.num_records
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any], *, source: str = MANIFEST) -> "Manifest":
    if d.get("format") != FORMAT:
      raise RecordError(f"{source}: format {d.get('format')!r}, expected {FORMAT!r}")
    try:
      fields = {k: FieldSpec(**v) for k, v in d["fields"].items()}
      shards = [ShardInfo(**s) for s in d["shards"]]
    except (KeyError, TypeError) as e:
      raise RecordError(f"{source}: malformed manifest ({e})") from e
    return cls(
      fields=fields,
      shards=shards,
      source=d.get("source", ""),
      counters=dict(d.get("counters", {})),
      extra=dict(d.get("extra", {})),
    )

  def save(self, folder: str) -> None:
    path = os.path.join(folder, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.to_json(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)

  @classmethod
  def load(cls, folder: str) -> "Manifest":
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
      raise RecordError(f"{path}: no manifest (is {folder!r} an exported dataset?)")
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from e
    return cls.from_json(d, source=path)

  def check_fields(self, expected: Mapping[str, int | None], *, folder: str = "") -> None:
    """Fails naming both sides if a field is missing or has another last dim.

    ``expected`` maps field name -> expected last dimension (None: any).
    """
    where = os.path.join(folder, MANIFEST) if folder else MANIFEST
    missing = [k for k in expected if k not in self.fields]
    if missing:
      raise RecordError(
        f"{where}: missing field(s) {missing} required by the config; "
        f"the manifest has {sorted(self.fields)}"
      )
    for k, dim in expected.items():
      if dim is not None and self.fields[k].dim != dim:
        raise RecordError(
          f"{where}: field {k!r} has dimension {self.fields[k].dim} "
          f"(shape {self.fields[k].shape}), the config expects {dim}"
        )


def iter_records(folder: str) -> Iterator[dict[str, Any]]:
  """Every record of an exported dataset, shard by shard, decoded."""
  from array_record.python.array_record_module import ArrayRecordReader

  manifest = Manifest.load(folder)
  for shard in manifest.shards:
    path = os.path.join(folder, shard.path)
    reader = ArrayRecordReader(path)
    try:
      for i, data in enumerate(reader.read_all()):
        yield decode_record(data, source=f"{path}[{i}]")
    finally:
      reader.close()
