"""A synthetic talking-face dataset rendered from a synthetic 3D morphable model.

    python -m data_pipelines.synthetic_3dmm --output DIR [--groups 8 --per-group 4
        --image-size 64 --vertices 800]

Faces of ``facediff.render.bfm.synthetic_bfm`` (saved next to the shards as
``BFM_model_front.mat``, in the real file's format, so the trainer renders I_3d with the
very model that made the images) rendered by ``facediff.render`` over a per-group
background. Records come in groups, like the frames of one video: a group shares the
identity, texture and lighting coefficients; each record draws its own expression,
pose (angles) and translation. So (source, driver, target) triplets exist within a group
(TGDM 5.1 samples source and target from the same video).

Same shard/manifest format as ``data_pipelines.export`` (``records.py``): one record per
face with ``key``, ``image`` (PNG, RGB), ``mask`` (uint8 (S, S), 1 = face, the mouth
inside the lips left as background: TGDM 4.4's "Small" mask), ``landmarks`` (68, 2),
``coeffs`` (257, D3DFR's layout, as the ``d3dfr`` encoder writes it), ``id_3dmm`` (80,
the identity coefficients, a stand-in identity embedding), ``exp_3dmm`` (64, the
expression coefficients) and ``group`` (int32). ``manifest.extra["groups"]["group"]``
lists every record's group for ``data_pipelines.loaders``' ``pair_field``.
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import records
from facediff import cli
from facediff.render import bfm, coeffs, renderer

BFM_FILE = "BFM_model_front.mat"
MOUTH = slice(60, 68)  # iBUG inner-lip points: the mouth opening
WINDOW = 8  # rasteriser window (pixels); overflow is checked


def group_coefficients(rng: np.random.Generator, per_group: int) -> np.ndarray:
  """(per_group, 257) D3DFR-layout coefficients: identity, texture and lighting shared by
  the group, expression, angles and translation per record."""
  x = np.zeros((per_group, 257), np.float32)
  x[:, 0:80] = rng.normal(size=80) * 0.7  # identity
  x[:, 144:224] = rng.normal(size=80) * 0.7  # texture
  gamma = rng.normal(size=27) * 0.08
  gamma[[0, 9, 18]] += 0.1  # a little brighter than D3DFR's init light
  x[:, 227:254] = gamma
  x[:, 80:144] = rng.normal(size=(per_group, 64)) * 0.7  # expression
  x[:, 224:227] = rng.normal(size=(per_group, 3)) * [0.15, 0.25, 0.08]  # pitch, yaw, roll
  x[:, 254:257] = rng.normal(size=(per_group, 3)) * [0.05, 0.05, 0.1]  # translation
  return x


def background(rng: np.random.Generator, size: int) -> np.ndarray:
  """(S, S, 3) float32 in [0, 1]: a smooth random colour gradient."""
  a, b = rng.uniform(0.1, 0.9, size=(2, 3))
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
  w = (0.5 * (xx + yy))[..., None]
  return ((1 - w) * a + w * b).astype(np.float32)


def small_mask(face: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
  """TGDM 4.4 "Small" mask: the face region without the mouth opening, uint8 (S, S)."""
  m = (face[..., 0] > 0.5).astype(np.uint8)
  pts = np.round(landmarks[MOUTH]).astype(np.int32)
  cv2.fillPoly(m, [pts], 0)
  return m


def _png(img01: np.ndarray) -> bytes:
  u8 = np.clip(np.round(img01 * 255.0), 0, 255).astype(np.uint8)
  ok, buf = cv2.imencode(".png", u8[..., ::-1])  # cv2 writes BGR
  if not ok:
    raise RuntimeError("PNG encoding failed")
  return buf.tobytes()


def manifest_fields(size: int) -> dict[str, records.FieldSpec]:
  return {
    "key": records.FieldSpec("str", [], "input", "1"),
    "image": records.FieldSpec("bytes", [size, size, 3], "png", "synthetic-3dmm/1"),
    "mask": records.FieldSpec("uint8", [size, size], "render-mask-small", "1"),
    "landmarks": records.FieldSpec("float32", [68, 2], "render-keypoints", "1"),
    "coeffs": records.FieldSpec("float32", [257], "synthetic-3dmm", "d3dfr-layout"),
    "id_3dmm": records.FieldSpec("float32", [80], "synthetic-3dmm", "identity-coeffs"),
    "exp_3dmm": records.FieldSpec("float32", [64], "synthetic-3dmm", "expression-coeffs"),
    "group": records.FieldSpec("int32", [], "synthetic-3dmm", "1"),
  }


def build(
  folder: str,
  *,
  num_groups: int = 8,
  per_group: int = 4,
  image_size: int = 64,
  num_vertices: int = 800,
  bfm_seed: int = 0,
  seed: int = 0,
  shard_size: int = 16,
) -> records.Manifest:
  """Writes ``num_groups * per_group`` records (groups contiguous) into ``folder`` with
  its manifest and the morphable model ``BFM_model_front.mat``; returns the manifest."""
  if num_groups < 1 or per_group < 1:
    raise ValueError(f"num_groups={num_groups}, per_group={per_group}: need at least 1 each")
  for name, value in (("image_size", image_size), ("shard_size", shard_size)):
    if value < 1:
      raise ValueError(f"{name}={value}: must be >= 1")
  model = bfm.synthetic_bfm(num_vertices, seed=bfm_seed)  # checks num_vertices
  cli.check_output_dir(folder, "output folder")
  os.makedirs(folder, exist_ok=True)
  bfm.save_bfm_mat(os.path.join(folder, BFM_FILE), model)
  model = bfm.load_bfm(os.path.join(folder, BFM_FILE))  # exactly what a trainer reads
  rng = np.random.default_rng(seed)
  examples, groups = [], []
  for g in range(num_groups):
    x = group_coefficients(rng, per_group)
    out = renderer.render(
      model, coeffs.split(jax.numpy.asarray(x)), image_size=image_size, window=WINDOW
    )
    out = jax.device_get(out)
    if int(np.max(out.overflow)) > 0:
      raise RuntimeError(f"group {g}: triangles larger than the rasteriser window {WINDOW}")
    bg = background(rng, image_size)
    for k in range(per_group):
      face = np.clip(out.image[k], 0.0, 1.0)
      visible = out.mask[k]
      img = face * visible + bg * (1.0 - visible)
      examples.append(
        {
          "key": f"g{g:04d}/f{k:04d}",
          "image": _png(img),
          "mask": small_mask(visible, out.landmarks[k]),
          "landmarks": out.landmarks[k].astype(np.float32),
          "coeffs": x[k],
          "id_3dmm": x[k, 0:80],
          "exp_3dmm": x[k, 80:144],
          "group": np.int32(g),
        }
      )
      groups.append(g)
  shards = []
  n_shards = -(-len(examples) // shard_size)
  for s in range(n_shards):
    name = f"shard-{s:05d}-of-{n_shards:05d}.array_record"
    chunk = examples[s * shard_size : (s + 1) * shard_size]
    path = os.path.join(folder, name)
    writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
    for ex in chunk:
      writer.write(records.encode_record(ex))
    writer.close()
    os.replace(path + ".tmp", path)
    shards.append(records.ShardInfo(name, len(chunk)))
  manifest = records.Manifest(
    fields=manifest_fields(image_size),
    shards=shards,
    source=f"synthetic-3dmm:groups={num_groups},per_group={per_group},seed={seed}",
    counters={"inputs": len(examples), "written": len(examples)},
    extra={
      "groups": {"group": groups},
      "bfm": f"{BFM_FILE} (synthetic_bfm({num_vertices}, seed={bfm_seed}))",
      "coeff_layout": "d3dfr",
      "mask": "1 = face, mouth opening excluded (TGDM 'Small' mask)",
    },
  )
  manifest.save(folder)
  return manifest


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(
    prog="python -m data_pipelines.synthetic_3dmm", description=__doc__.splitlines()[0]
  )
  p.add_argument("--output", required=True)
  p.add_argument("--groups", type=int, default=8)
  p.add_argument("--per-group", type=int, default=4)
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--vertices", type=int, default=800)
  p.add_argument("--bfm-seed", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--shard-size", type=int, default=16)
  a = p.parse_args(argv)
  try:  # the arguments are checked before anything is written
    m = build(
      a.output,
      num_groups=a.groups,
      per_group=a.per_group,
      image_size=a.image_size,
      num_vertices=a.vertices,
      bfm_seed=a.bfm_seed,
      seed=a.seed,
      shard_size=a.shard_size,
    )
  except (OSError, ValueError) as e:
    return cli.fail("synthetic_3dmm", e)
  print(f"wrote {a.output}: {m.num_records} records in {len(m.shards)} shards")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
