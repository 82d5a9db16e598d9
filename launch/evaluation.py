"""Flag-free DiffSFSR evaluation (``launch.evaluate`` is its command line): metrics of
a trained workdir on evaluation triplets, as JSON and the papers' Markdown tables.

Every task's table has DiffSFSR Tab. 1's columns (ID, Exp, Pose), the reconstruction's
also MSE / PSNR / SSIM, then the extra columns: LMD for every task, LPIPS for
``reconstruct`` when a VGG16 trunk is given, FID for every task when the FID Inception is
given. A column is shown only when it was computed."""

from __future__ import annotations

import os

import numpy as np

TASKS = ("reconstruct", "swap", "reenact", "sfsr")
# The columns each task can have, in table order (DiffSFSR Tab. 1's first; see markdown).
COLUMNS = {
  "reconstruct": ["MSE", "PSNR", "SSIM", "LPIPS", "ID", "Exp", "Pose", "LMD", "FID"],
  "swap": ["ID", "Exp", "Pose", "LMD", "FID"],
  "reenact": ["ID", "Exp", "Pose", "LMD", "FID"],
  "sfsr": ["ID", "Exp", "Pose", "LMD", "FID"],
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


def real_features(folder: str, image_field: str, size: int, fid_config, fid_params, batch: int):
  """FID features (N, 2048) of every record's image of the evaluation set, decoded and
  resized to ``size`` as the loaders give backgrounds (``loaders.decode_image``), in
  batches of ``batch``."""
  from data_pipelines import loaders, records
  from facediff import metrics

  feats, chunk = [], []

  def flush():
    if chunk:
      feats.append(metrics.inception_features(fid_params, np.stack(chunk), fid_config, batch))
      chunk.clear()

  for i, rec in enumerate(records.iter_records(folder)):
    if image_field not in rec:
      raise KeyError(f"{folder} record {i}: no image field {image_field!r} (for the FID)")
    chunk.append(loaders.decode_image(rec[image_field], size, source=f"{folder} record {i}"))
    if len(chunk) == batch:
      flush()
  flush()
  return np.concatenate(feats)


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


def evaluate(
  workdir: str,
  data: str | None,
  tasks,
  num: int,
  batch: int,
  steps,
  method,
  seed,
  *,
  inception: str | None = None,
  lpips_vgg16: str | None = None,
  samples_dir: str | None = None,
):
  """Scores every task (see launch.evaluate). ``inception``: pytorch-fid's FID Inception
  file (adds FID, generated images of each task against the real images of the
  evaluation set); ``lpips_vgg16``: a torchvision VGG16 state dict, with the lpips
  package's linear heads (adds LPIPS to ``reconstruct``); ``samples_dir``: writes each
  task's valid results as ``<task>.npz`` (``images`` as sampled, in [-1, 1]; ``landmarks``
  found on them; record indices ``bkg``, ``id``, ``exp``)."""
  import jax

  from data_pipelines import loaders
  from facediff import metrics, partitioning
  from facediff.convert import inception as inception_convert
  from facediff.convert import lpips as lpips_convert
  from facediff.losses import face_encoders
  from launch import inference

  # The optional networks first: a wrong path fails before the model is restored.
  fid_config, fid_params = inception_convert.load(inception) if inception else (None, None)
  lpips_params = lpips_convert.load_params(lpips_vgg16) if lpips_vgg16 else None
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
  lpips_fn = jax.jit(metrics.lpips)

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

  size = int(c.data.image_size)
  real_feats = None
  if fid_params is not None:
    image_field = c.data.get("image_field", "image")
    real_feats = real_features(data, image_field, size, fid_config, fid_params, batch)
  if samples_dir:
    os.makedirs(samples_dir, exist_ok=True)
  results = {}
  for task in tasks:
    rows, samples = [], []
    for i, b in enumerate(loaders.make_eval_triplets(c, task, seed, mesh=mesh)):
      images = sampler(params, frozen, b, jax.random.fold_in(jax.random.key(seed), i))
      s = jax.device_get(score(images, b))
      if lpips_params is not None and task == "reconstruct":
        s["LPIPS"] = jax.device_get(lpips_fn(lpips_params, images, b["bkg_image"]))
      valid = np.asarray(jax.device_get(b["valid"]), bool)
      src = {k: np.asarray(jax.device_get(v)) for k, v in b["src"].items()}
      bkg_lm = g_lms[src["bkg"]] * (size / side)
      lo, hi = bkg_lm.min(1), bkg_lm.max(1)
      boxes = np.concatenate([lo, hi], 1)
      host_images = np.asarray(jax.device_get(images), np.float32)
      px = np.clip((host_images + 1) * 127.5 + 0.5, 0, 255)
      res_lm = result_landmarks(px.astype(np.uint8), boxes)
      if fid_params is not None:
        # FID of the images clipped to [-1, 1], as an image file holds them (unquantised).
        s["fid_features"] = metrics.inception_features(
          fid_params, np.clip(host_images, -1.0, 1.0), fid_config, batch
        )
      rows.append((s, valid, src, bkg_lm, res_lm))
      if samples_dir:
        samples.append((host_images[valid], res_lm[valid], {k: v[valid] for k, v in src.items()}))
    results[task] = _summarise(task, rows, g_emb, g_labels, size, real_feats)
    if samples_dir:
      _save_samples(os.path.join(samples_dir, f"{task}.npz"), samples)
  return config, step, data, results


def _save_samples(path: str, samples) -> None:
  images, lms, src = zip(*samples, strict=True)
  np.savez(
    path,
    images=np.concatenate(images),
    landmarks=np.concatenate(lms),
    **{k: np.concatenate([s[k] for s in src]) for k in ("bkg", "id", "exp")},
  )


def _summarise(task, rows, g_emb, g_labels, size, real_feats=None) -> dict:
  import jax.numpy as jnp

  from facediff import metrics
  from facediff.metrics import pose as pose_lib

  cam = pose_lib.generic_camera_matrix(size, size)
  cat = {k: [] for k in ("id_cos", "exp", "MSE", "PSNR", "SSIM", "LPIPS", "pose", "hit", "lmd")}
  fid_feats = []
  for s, valid, src, bkg_lm, res_lm in rows:
    hit = np.asarray(
      g_labels[np.asarray(metrics.retrieve(jnp.asarray(s["e_id"]), jnp.asarray(g_emb)))]
      == g_labels[src["id"]]
    )
    pose = metrics.pose_error(pose_lib.head_pose(res_lm, cam), pose_lib.head_pose(bkg_lm, cam))
    # LMD: mean distance (pixels at the evaluation size) of the 68 landmarks found on the
    # result to the background's stored ones (the face must stay where the background's is).
    lmd = metrics.landmark_distance(jnp.asarray(res_lm), jnp.asarray(bkg_lm))
    for k, v in (
      ("id_cos", s["id_cos"]),
      ("exp", s["exp"]),
      ("MSE", s["MSE"]),
      ("PSNR", s["PSNR"]),
      ("SSIM", s["SSIM"]),
      ("LPIPS", s.get("LPIPS")),
      ("pose", pose),
      ("hit", hit),
      ("lmd", lmd),
    ):
      if v is not None:
        cat[k].append(np.asarray(v, np.float64).reshape(-1)[valid])
    if "fid_features" in s:
      fid_feats.append(np.asarray(s["fid_features"])[valid])
  m = {k: float(np.mean(np.concatenate(v))) for k, v in cat.items() if v}
  out = {
    "count": int(sum(len(x) for x in cat["hit"])),
    "ID": m["hit"],
    "ID-cos": m["id_cos"],
    "Exp": m["exp"],
    "Pose": m["pose"],
    "LMD": m["lmd"],
  }
  if task == "reconstruct":
    out.update(MSE=m["MSE"], PSNR=m["PSNR"], SSIM=m["SSIM"])
    if "LPIPS" in m:
      out["LPIPS"] = m["LPIPS"]
  if real_feats is not None and fid_feats:
    out["FID"] = metrics.fid_from_features(np.concatenate(fid_feats), real_feats)
  return out


def markdown(name: str, results: dict) -> str:
  from facediff import metrics

  parts = []
  for task, r in results.items():
    parts.append(f"### {task} ({r['count']} triplets)\n")
    columns = [col for col in COLUMNS[task] if col in r]
    parts.append(metrics.format_table({name: r}, columns, bold_best=False))
    parts.append(f"\nID-cos (mean cosine to the identity source): {r['ID-cos']:.3f}\n")
  return "\n".join(parts)
