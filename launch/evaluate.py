"""DiffSFSR evaluation of a trained workdir on evaluation triplets, as the papers' tables.

    python -m launch.evaluate --workdir TRAINED [--data DIR] [--tasks swap,reenact,sfsr]
        [--num 64] [--batch 8] [--steps 50] [--method pndm] [--out DIR]

For each task (``reconstruct``, ``swap``, ``reenact``, ``sfsr``: the loaders'
``make_eval_triplets``, deterministic in ``--seed``), samples every triplet with one
compiled, mesh-sharded sampler and scores the results with ``facediff.metrics``:

* ID: identity retrieval top-1 accuracy: the result's identity embedding (the
  training set's first identity field, e.g. the real dlib recogniser) against a
  gallery of every record's stored embedding, labelled by person (the first path
  component of the record key, as the demo and folder exports name them); correct
  when the top match is the identity source's person. ID-cos: mean cosine to the
  identity source's stored embedding.
* Exp: Euclidean distance between the result's expression embedding (the training
  set's expression field, e.g. fer) and the expression source's stored one.
* Pose: mean absolute yaw/pitch/roll difference (degrees) between the result and the
  background (whose pose the result must keep), from 68 landmarks (dlib's predictor on
  the result inside the background's landmark box; the background's stored landmarks)
  through solvePnP on a generic 3D face (``metrics.head_pose``).
* MSE, PSNR, SSIM against the background for ``reconstruct`` (the result should
  reproduce it).

Writes ``OUT/evaluation.json`` and ``OUT/evaluation.md`` (default OUT: the workdir).
Defaults to the workdir's held-out demo set when it has one, else its training set.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import numpy as np
from absl import app, flags

TASKS = ("reconstruct", "swap", "reenact", "sfsr")
COLUMNS = {
  "reconstruct": ["MSE", "PSNR", "SSIM", "ID", "Exp", "Pose"],
  "swap": ["ID", "Exp", "Pose"],
  "reenact": ["ID", "Exp", "Pose"],
  "sfsr": ["ID", "Exp", "Pose"],
}

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir (launch.train / launch.main).")
_DATA = flags.DEFINE_string("data", None, "Evaluation dataset (default: held-out or training).")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), "Tasks to evaluate.")
_NUM = flags.DEFINE_integer("num", 64, "Triplets per task.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (a multiple of the device count).")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps.")
_METHOD = flags.DEFINE_enum("method", "pndm", ("pndm", "ddim", "ddpm"), "Sampler.")
_SEED = flags.DEFINE_integer("seed", 0, "Triplet and noise seed.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: the workdir).")


def person(key: str) -> str:
  return key.replace("\\", "/").split("/")[0]


def gallery(folder: str, id_field: str):
  """(embeddings (N, D), person labels (N,) int, landmarks (N, 68, 2), stored image
  side, keys) of every record."""
  from data_pipelines import records

  embs, people, lms, keys = [], [], [], []
  for rec in records.iter_records(folder):
    key = rec["key"].decode() if isinstance(rec["key"], bytes) else str(rec["key"])
    keys.append(key)
    people.append(person(key))
    embs.append(np.asarray(rec[id_field], np.float32))
    lms.append(np.asarray(rec["landmarks"], np.float32))
  names = sorted(set(people))
  labels = np.array([names.index(p) for p in people], np.int32)
  side = records.Manifest.load(folder).fields["image"].shape[0]
  return np.stack(embs), labels, np.stack(lms), int(side), keys


def result_landmarks(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """68 landmarks on each generated image (uint8 RGB) inside its box (l, t, r, b)."""
  from data_pipelines import faces

  predictor = faces.LandmarkPredictor()
  return np.stack(
    [
      predictor(img, tuple(int(round(v)) for v in box))
      for img, box in zip(images, boxes, strict=True)
    ]
  ).astype(np.float32)


def evaluate(workdir: str, data: str | None, tasks, num: int, batch: int, steps, method, seed):
  import jax

  from data_pipelines import loaders
  from facediff import metrics, partitioning
  from facediff.losses import face_encoders
  from launch import inference

  config, model, params, frozen, step = inference.load_trained(workdir)
  data = data or next(
    p for p in (os.path.join(workdir, "heldout"), config.data.path) if os.path.isdir(p)
  )
  id_field, exp_field = config.data.id_fields[0], config.data.exp_field
  id_enc, id_params = face_encoders.load(id_field, config.model.encoder_weights.get(id_field, ""))
  exp_enc, exp_params = face_encoders.load(
    exp_field, config.model.encoder_weights.get(exp_field, "")
  )
  g_emb, g_labels, g_lms, side, _ = gallery(data, id_field)
  c = config.copy_and_resolve_references()
  c.data.path = data
  c.data.global_batch_size = batch
  c.data.num_eval = num
  c.data.eval_source_images = False
  for kind in (id_enc.crop, exp_enc.crop):
    if kind not in c.data.crop_fields:
      c.data.crop_fields = [*c.data.crop_fields, kind]
  mesh = partitioning.make_mesh({"data": -1, "fsdp": 1})
  sampler = jax.jit(lambda p, f, b, k: model.sample(p, f, b, k, method=method, num_steps=steps))

  @jax.jit
  def score(images, batch):
    crops = batch["crops"]
    e_id = metrics.face_embeddings(id_enc, id_params, images, crops)
    e_exp = metrics.face_embeddings(exp_enc, exp_params, images, crops)
    out = {
      "e_id": e_id,
      "id_cos": metrics.identity_cosine(e_id, batch["id"][id_field]),
      "exp": metrics.expression_error(e_exp, batch["exp"]),
    }
    out.update(metrics.image_metrics(images, batch["bkg_image"]))
    return out

  results = {}
  size = int(c.data.image_size)
  for task in tasks:
    rows = []
    for i, b in enumerate(loaders.make_eval_triplets(c, task, seed, mesh=mesh)):
      images = sampler(params, frozen, b, jax.random.fold_in(jax.random.key(seed), i))
      s = jax.device_get(score(images, b))
      valid = np.asarray(jax.device_get(b["valid"]), bool)
      src = {k: np.asarray(jax.device_get(v)) for k, v in b["src"].items()}
      bkg_lm = g_lms[src["bkg"]] * (size / side)
      lo, hi = bkg_lm.min(1), bkg_lm.max(1)
      boxes = np.concatenate([lo, hi], 1)
      px = np.clip((np.asarray(jax.device_get(images)) + 1) * 127.5 + 0.5, 0, 255)
      res_lm = result_landmarks(px.astype(np.uint8), boxes)
      rows.append((s, valid, src, bkg_lm, res_lm))
    results[task] = _summarise(task, rows, g_emb, g_labels, size)
  return config, step, data, results


def _summarise(task, rows, g_emb, g_labels, size) -> dict:
  import jax.numpy as jnp

  from facediff import metrics
  from facediff.metrics import pose as pose_lib

  cam = pose_lib.generic_camera_matrix(size, size)
  cat = {k: [] for k in ("id_cos", "exp", "MSE", "PSNR", "SSIM", "pose", "hit")}
  for s, valid, src, bkg_lm, res_lm in rows:
    hit = np.asarray(
      g_labels[np.asarray(metrics.retrieve(jnp.asarray(s["e_id"]), jnp.asarray(g_emb)))]
      == g_labels[src["id"]]
    )
    pose = metrics.pose_error(pose_lib.head_pose(res_lm, cam), pose_lib.head_pose(bkg_lm, cam))
    for k, v in (
      ("id_cos", s["id_cos"]),
      ("exp", s["exp"]),
      ("MSE", s["MSE"]),
      ("PSNR", s["PSNR"]),
      ("SSIM", s["SSIM"]),
      ("pose", pose),
      ("hit", hit),
    ):
      cat[k].append(np.asarray(v, np.float64).reshape(-1)[valid])
  m = {k: float(np.mean(np.concatenate(v))) for k, v in cat.items()}
  out = {
    "count": int(sum(len(x) for x in cat["hit"])),
    "ID": m["hit"],
    "ID-cos": m["id_cos"],
    "Exp": m["exp"],
    "Pose": m["pose"],
  }
  if task == "reconstruct":
    out.update(MSE=m["MSE"], PSNR=m["PSNR"], SSIM=m["SSIM"])
  return out


def markdown(name: str, results: dict) -> str:
  from facediff import metrics

  parts = []
  for task, r in results.items():
    parts.append(f"### {task} ({r['count']} triplets)\n")
    parts.append(metrics.format_table({name: r}, COLUMNS[task], bold_best=False))
    parts.append(f"\nID-cos (mean cosine to the identity source): {r['ID-cos']:.3f}\n")
  return "\n".join(parts)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  from launch import inference

  bad = [t for t in _TASKS.value if t not in TASKS]
  if bad:
    sys.exit(f"launch.evaluate: --tasks {bad}: unknown (one of {TASKS})")
  try:
    config, step, data, results = evaluate(
      _WORKDIR.value,
      _DATA.value,
      _TASKS.value,
      _NUM.value,
      _BATCH.value,
      _STEPS.value,
      _METHOD.value,
      _SEED.value,
    )
  except (inference.SampleError, FileNotFoundError, KeyError, ValueError) as e:
    sys.exit(f"launch.evaluate: {e}")
  out = _OUT.value or _WORKDIR.value
  os.makedirs(out, exist_ok=True)
  name = f"facediff {config.get('variant', '')} @ {step}"
  md = markdown(name, results)
  with open(os.path.join(out, "evaluation.json"), "w") as f:
    json.dump({"workdir": _WORKDIR.value, "data": data, "step": step, "results": results}, f)
  with open(os.path.join(out, "evaluation.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  app.run(main)
