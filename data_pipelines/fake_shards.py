"""Small synthetic datasets in the shard format of ``records.py``, for tests and benchmarks.

Every value is a known function of the record index, so a test can tell from a
decoded batch which record each row came from: ``id_*`` and ``exp_*`` embeddings
hold ``index + k / 1000`` at position k, the image is a flat colour
``(index % 251, (3 * index) % 251, (7 * index) % 251)`` and the mask is the centred
half-size square. ``image="photo"`` stores a real portrait instead (benchmarks).
``crop_kinds`` adds ``crop_<kind>`` transforms (``crop_matrix``), as the exporter
writes them.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import cv2
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import records

DEFAULT_EMBEDDINGS = {"id_dlib": 128, "exp_fer": 7}


def image_colour(index: int) -> np.ndarray:
  return np.array([index % 251, (3 * index) % 251, (7 * index) % 251], np.uint8)


def embedding_value(index: int, dim: int) -> np.ndarray:
  return (index + np.arange(dim, dtype=np.float64) / 1000.0).astype(np.float32)


def face_mask(size: int) -> np.ndarray:
  m = np.zeros((size, size), np.uint8)
  q = size // 4
  m[q : size - q, q : size - q] = 1
  return m


def crop_matrix(index: int, kind: str, size: int) -> np.ndarray:
  """A known (2, 3) float32 similarity for record ``index`` and crop ``kind``."""
  angle = 0.01 * index + 0.1 * (len(kind) % 5)
  scale = 0.6 + 0.001 * index
  c, s = scale * np.cos(angle), scale * np.sin(angle)
  t = (0.1 * size + index % 5, 0.2 * size - index % 3)
  return np.array([[c, -s, t[0]], [s, c, t[1]]], np.float32)


def _photo(index: int, size: int) -> np.ndarray:
  from skimage import data  # a real portrait: PNG size and decode time like a face crop

  img = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)
  return np.roll(img, index % size, axis=1)


def make_example(
  index: int,
  size: int,
  embeddings: Mapping[str, int],
  latent_shape: tuple[int, ...] | None,
  image: str = "flat",
  crop_kinds: Sequence[str] = (),
) -> dict:
  """One record; ``image`` is "flat" (colour coding the index) or "photo"."""
  if image == "photo":
    img = _photo(index, size)
  elif image == "flat":
    img = np.broadcast_to(image_colour(index), (size, size, 3)).copy()
  else:
    raise ValueError(f"image={image!r}: expected 'flat' or 'photo'")
  ok, png = cv2.imencode(".png", img[..., ::-1])  # cv2 writes BGR
  assert ok
  ex = {"image": png.tobytes(), "mask": face_mask(size), "key": f"{index:06d}"}
  for name, dim in embeddings.items():
    ex[name] = embedding_value(index, dim)
  if latent_shape is not None:
    ex["latent"] = np.full(latent_shape, index, np.float32)
  for kind in crop_kinds:
    ex[f"crop_{kind}"] = crop_matrix(index, kind, size)
  return ex


def write_dataset(
  folder: str,
  num_records: int,
  *,
  image_size: int = 16,
  records_per_shard: int = 16,
  embeddings: Mapping[str, int] = DEFAULT_EMBEDDINGS,
  latent_shape: tuple[int, ...] | None = (2, 2, 4),
  image: str = "flat",
  crop_kinds: Sequence[str] = (),
) -> records.Manifest:
  """Writes ``num_records`` records into shards of ``folder`` plus its manifest."""
  os.makedirs(folder, exist_ok=True)
  fields = {
    "image": records.FieldSpec("bytes", [image_size, image_size, 3], "png", "1"),
    "mask": records.FieldSpec("uint8", [image_size, image_size], "fake_mask", "1"),
  }
  for name, dim in embeddings.items():
    fields[name] = records.FieldSpec("float32", [dim], name, "1")
  if latent_shape is not None:
    fields["latent"] = records.FieldSpec("float32", list(latent_shape), "fake_vae", "1")
  for kind in crop_kinds:
    fields[f"crop_{kind}"] = records.FieldSpec("float32", [2, 3], "crop-transform", "1")
  shards = []
  for k, start in enumerate(range(0, num_records, records_per_shard)):
    stop = min(start + records_per_shard, num_records)
    name = f"shard-{k:05d}.array_record"
    writer = ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
    for i in range(start, stop):
      writer.write(
        records.encode_record(
          make_example(i, image_size, embeddings, latent_shape, image, crop_kinds)
        )
      )
    writer.close()
    shards.append(records.ShardInfo(name, stop - start))
  manifest = records.Manifest(
    fields=fields, shards=shards, source="fake", counters={"written": num_records}
  )
  manifest.save(folder)
  return manifest
