"""Flag-free DiffSFSR evaluation (``launch.evaluate`` is its command line): metrics of
a trained workdir on evaluation triplets, as JSON and the papers' Markdown tables."""

from __future__ import annotations

import os

import numpy as np

TASKS = ("reconstruct", "swap", "reenact", "sfsr")
COLUMNS = {
  "reconstruct": ["MSE", "PSNR", "SSIM", "ID", "Exp", "Pose"],
  "swap": ["ID", "Exp", "Pose"],
  "reenact": ["ID", "Exp", "Pose"],
  "sfsr": ["ID", "Exp", "Pose"],
}


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
