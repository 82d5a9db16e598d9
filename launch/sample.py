"""Inference from a trained workdir: DiffSFSR (SFSR, face swap, reenactment, expression
travel) and TGDM (image-, video- and audio-driven reenactment, face swap), batch jobs
from a CSV. The workdir's ``config.model.name`` picks the model.

    facediff --workdir TRAINED --out OUT --task sfsr \\
        --background bkg.jpg --id selfie.jpg --expression happiness
    python -m launch.sample --workdir TRAINED --out OUT --task swap --background a.jpg --id b.jpg
    python -m launch.sample --workdir TRAINED --out OUT --task reenact --background a.jpg \\
        --expression_image b.jpg
    python -m launch.sample --workdir TRAINED --out OUT --background a.jpg --id b.jpg \\
        --travel happiness,surprise --frames 8
    python -m launch.sample --workdir TRAINED --out OUT --csv jobs.csv

Tasks (DiffSFSR Sec. 3.4): ``sfsr`` takes background, identity and expression from
three inputs; ``swap`` keeps the background's expression; ``reenact`` keeps its
identity. ``--prompt`` generates the background with text-to-image (``--t2i_model``,
SD-1.x weights). ``--expression WORD`` (the 135-word vocabulary) picks a reference
expression from an expression index: the dataset ``--expression_index`` (default: the
training set) with a labelled ``expression`` field, or, without one, fer's own
predictions (``expression_index.index_from_fer``).

User photos go through the exporter's own detection, alignment and encoders (the
ones that wrote the training set's fields). A photo that is missing, unreadable,
shows no face or several faces, a word outside the vocabulary, or a workdir without
a checkpoint ends the command with one line naming the input and exit status 1;
nothing is written to ``--out`` until every result exists. Outputs: PNGs, an
animated GIF for travel, and ``record.json`` (inputs, checkpoint step, seeds,
sampler). One compiled sampler serves every job of the same shape.

TGDM (``launch/sample_tgdm.py``; ``--source``/``--driver``/``--target`` are photos or
records ``DATASET_DIR#RECORD_KEY``)::

    facediff --workdir TGDM --out OUT --task reenact --source a.jpg --driver b.jpg \
        --weights d3dfr=epoch_20.pth --weights d3dfr_lm3d=similarity_Lm3D_all.mat
    facediff --workdir TGDM --out OUT --task video --source DATA#g0/f0 --driver_video clip.mp4
    facediff --workdir TGDM --out OUT --task audio --source a.jpg --audio speech.wav \
        --emoa2e_workdir EMOA2E --emotion happy,surprised --intensity 2
    facediff --workdir TGDM_SWAP --out OUT --task swap --source a.jpg --target b.jpg

Video and audio write ``NAME/frame_NNN.png``, ``NAME.mp4`` (OpenCV ``mp4v``) and
``NAME.gif``. ``--steps``/``--method`` override the checkpoint config's sampler;
``--noema`` samples with the trained params instead of their EMA.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
from typing import Sequence

import numpy as np
from absl import app, flags

from launch import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("sfsr", "swap", "reenact")  # DiffSFSR's
TGDM_TASKS = ("reenact", "video", "audio", "swap")  # launch.sample_tgdm.TASKS
MODEL_TASKS = {"diffsfsr": TASKS, "tgdm": TGDM_TASKS}
# Flags (and CSV columns) each model reads; the others are refused for it.
DIFFSFSR_INPUTS = ("background", "prompt", "id", "expression", "expression_image", "travel")
TGDM_INPUTS = (
  "source",
  "driver",
  "driver_video",
  "target",
  "audio",
  "emotion",
  "intensity",
  "emoa2e_workdir",
)
FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined when it runs, so importing this module for
  ``run_jobs`` defines none)."""
  flags.DEFINE_string("workdir", None, "A launch.train / launch.main workdir.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_enum(
    "task",
    None,
    tuple(dict.fromkeys(TASKS + TGDM_TASKS)),
    "What to generate (default: sfsr for DiffSFSR, reenact for TGDM).",
  )
  flags.DEFINE_string("background", None, "Background photo.")
  flags.DEFINE_string("prompt", None, "Background from text (needs --t2i_model).")
  flags.DEFINE_string("t2i_model", "", "SD-1.x weights for --prompt.")
  flags.DEFINE_string("id", None, "Identity photo (a selfie).")
  flags.DEFINE_string("expression", None, "Expression word (135-word vocabulary).")
  flags.DEFINE_string("expression_image", None, "Expression reference photo.")
  flags.DEFINE_string("expression_index", None, "Dataset for --expression retrieval.")
  flags.DEFINE_string("travel", None, "WORD_A,WORD_B: expression travel.")
  flags.DEFINE_integer("frames", 8, "Frames of --travel.")
  flags.DEFINE_string(
    "csv", None, "Batch jobs, one a row; columns named as the flags (task,background,id,...)."
  )
  flags.DEFINE_integer("steps", None, "Sampler steps (DiffSFSR: 50; TGDM: the config's).")
  flags.DEFINE_enum(
    "method", None, ("pndm", "ddim", "ddpm"), "Sampler (DiffSFSR: pndm; TGDM: the config's)."
  )
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_float("id_scale", 1.0, "Identity guidance (needs id_dropout > 0).")
  flags.DEFINE_float("exp_scale", 1.0, "Expression guidance (needs exp_dropout > 0).")
  flags.DEFINE_string("compile_cache", None, "Persistent XLA compilation cache folder.")
  flags.DEFINE_multi_string("weights", [], "Encoder weights NAME=PATH (as the exporter).")
  # TGDM
  flags.DEFINE_string("source", None, "TGDM source face: photo or DATASET_DIR#RECORD_KEY.")
  flags.DEFINE_string("driver", None, "TGDM reenact: driving face (photo or record).")
  flags.DEFINE_string(
    "driver_video", None, "TGDM video: frames folder, video file or DATASET_DIR#KEY,KEY|GLOB|@FILE."
  )
  flags.DEFINE_string("target", None, "TGDM swap: target face (photo or record).")
  flags.DEFINE_string("audio", None, "TGDM audio: speech WAV (resampled to the EmoA2E rate).")
  flags.DEFINE_string("emotion", None, "TGDM audio: emotion text; a,b = compound emotion.")
  flags.DEFINE_float("intensity", None, "TGDM audio: emotion intensity eta (default 1).")
  flags.DEFINE_string("emoa2e_workdir", None, "TGDM audio: a trained EmoA2E workdir.")
  flags.DEFINE_integer("radius", 1, "TGDM video/audio: coefficient window radius k.")
  flags.DEFINE_integer("chunk", 16, "TGDM video/audio: frames per sampler batch (0 = all).")
  flags.DEFINE_float("fps", None, "TGDM video/audio: output frame rate (default: the input's).")
  flags.DEFINE_bool("ema", True, "Sample with the EMA params when the run kept them.")


SampleError = inference.SampleError
load_trained = inference.load_trained
encoder_names = inference.encoder_names
expression_embedding = inference.expression_embedding


def stored_image_size(config) -> int:
  """The side of the training set's stored images: user photos are exported alike."""
  from data_pipelines import records

  return int(records.Manifest.load(config.data.path).fields["image"].shape[0])


def prepare(config, job: dict, tmp: str, weights: Sequence[str]) -> dict:
  """Exports the job's photos and returns one model-input batch (numpy, batch 1)."""
  from data_pipelines import loaders, photos

  bkg = job.get("background")
  if not bkg:
    raise SampleError("a background is needed: --background IMAGE or --prompt TEXT")
  roles = {"bkg": bkg}
  task = job["task"]
  if task in ("sfsr", "swap"):
    if not job.get("id"):
      raise SampleError(f"--task {task} needs --id IMAGE")
    roles["id"] = job["id"]
  if task in ("sfsr", "reenact"):
    if job.get("expression_image"):
      roles["exp"] = job["expression_image"]
    elif not job.get("expression") and not job.get("travel"):
      raise SampleError(f"--task {task} needs --expression WORD or --expression_image IMAGE")
  out = os.path.join(tmp, "photos")
  weight_map = dict(w.split("=", 1) for w in weights)
  try:
    photos.export_photos(roles, out, encoder_names(config), stored_image_size(config), weight_map)
  except photos.PhotoError as e:
    raise SampleError(str(e)) from None
  c = config.copy_and_resolve_references()
  c.data.path = out
  idx = {r: photos.record_index(out, r) for r in roles}
  row = (idx["bkg"], idx.get("id", idx["bkg"]), idx.get("exp", idx["bkg"]))
  batch = loaders.triplet_batch(c, [row])
  if task in ("sfsr", "reenact") and "exp" not in roles and job.get("expression"):
    batch["exp"] = expression_embedding(config, job["expression"], job.get("index"), job["seed"])[
      None
    ]
  return batch


def _png(img: np.ndarray, path: str) -> None:
  from facediff.train import writers

  writers.save_png(writers.image_grid(np.asarray(img)[None]), path)


class Sampler:
  """One compiled sampler per (shape, method, steps, scales)."""

  def __init__(self, model, params, frozen, method, steps, id_scale, exp_scale):
    import jax

    self.params, self.frozen = params, frozen
    self.fn = jax.jit(
      lambda p, f, b, k: model.sample(
        p,
        f,
        b,
        k,
        method=method,
        num_steps=steps,
        id_scale=id_scale,
        exp_scale=exp_scale,
      )
    )

  def __call__(self, batch, seed):
    import jax

    return np.asarray(self.fn(self.params, self.frozen, batch, jax.random.key(seed)))


def run_jobs(
  jobs: list[dict], workdir: str, out: str, *, weights=(), progress=True, use_ema=True
) -> dict:
  """Runs DiffSFSR ``jobs`` (dicts of the flags' names) and writes their outputs into
  ``out`` only once all of them have succeeded."""
  from PIL import Image

  config, model, params, frozen, step = load_trained(workdir, use_ema=use_ema)
  mc = config.model
  jobs = [dict(j) for j in jobs]
  for job in jobs:
    job["task"] = job.get("task") or "sfsr"
    if job["task"] not in TASKS:
      raise SampleError(
        f"--task {job['task']}: a DiffSFSR checkpoint has the tasks {', '.join(TASKS)}"
      )
    job["steps"] = int(job.get("steps") or 50)
    job["method"] = job.get("method") or "pndm"
  for job in jobs:
    for name, scale, p in (
      ("id_scale", job["id_scale"], mc.get("id_dropout", 0.0)),
      ("exp_scale", job["exp_scale"], mc.get("exp_dropout", 0.0)),
    ):
      if scale != 1.0 and not p:
        raise SampleError(
          f"--{name}={scale}: the checkpoint was trained without condition dropout "
          f"(config.model.{name.split('_')[0]}_dropout = 0), so it has no null token to guide from"
        )
  samplers: dict[tuple, Sampler] = {}
  records_out = []
  tmp = tempfile.mkdtemp(prefix="facediff_sample_")
  stage = os.path.join(tmp, "out")
  os.makedirs(stage)
  try:
    for n, job in enumerate(jobs):
      if progress:
        print(f"[{n + 1}/{len(jobs)}] {job['task']}", file=sys.stderr, flush=True)
      batch = prepare(config, job, os.path.join(tmp, f"job{n}"), weights)
      key = (job["method"], job["steps"], job["id_scale"], job["exp_scale"])
      if key not in samplers:
        samplers[key] = Sampler(model, params, frozen, *key)
      sampler = samplers[key]
      name = job.get("name") or f"{n:03d}_{job['task']}"
      files = []
      if job.get("travel"):
        a, b = (w.strip() for w in job["travel"].split(","))
        ea = expression_embedding(config, a, job.get("index"), job["seed"])
        eb = expression_embedding(config, b, job.get("index"), job["seed"])
        frames = []
        os.makedirs(os.path.join(stage, name), exist_ok=True)
        for i, w in enumerate(np.linspace(0.0, 1.0, int(job["frames"]))):
          batch["exp"] = ((1 - w) * ea + w * eb)[None]
          img = sampler(batch, job["seed"])[0]
          path = os.path.join(stage, name, f"frame_{i:03d}.png")
          _png(img, path)
          frames.append(Image.open(path).convert("RGB"))
          files.append(os.path.join(name, f"frame_{i:03d}.png"))
        frames[0].save(
          os.path.join(stage, f"{name}.gif"), save_all=True, append_images=frames[1:], duration=120
        )
        files.append(f"{name}.gif")
      else:
        img = sampler(batch, job["seed"])[0]
        _png(img, os.path.join(stage, f"{name}.png"))
        files.append(f"{name}.png")
      records_out.append({"job": job, "outputs": files})
    record = {
      "workdir": os.path.abspath(workdir),
      "checkpoint_step": int(step),
      "params": "ema" if use_ema and float(config.ema.get("decay", 0.0)) > 0 else "trained",
      "variant": config.get("variant"),
      "jobs": records_out,
    }
    with open(os.path.join(stage, "record.json"), "w") as f:
      json.dump(record, f, indent=2, default=str)
    os.makedirs(out, exist_ok=True)
    for entry in os.listdir(stage):
      dst = os.path.join(out, entry)
      if os.path.isdir(dst):
        shutil.rmtree(dst)
      shutil.move(os.path.join(stage, entry), dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return record


INT_FIELDS = ("steps", "seed", "frames", "radius", "chunk")
FLOAT_FIELDS = ("id_scale", "exp_scale", "intensity", "fps")


def jobs_from_flags(model: str = "diffsfsr") -> list[dict]:
  """The jobs of the command line (or of ``--csv``, whose columns are the flags' names)
  for ``model`` ("diffsfsr" or "tgdm"); inputs of the other model are refused."""
  other = TGDM_INPUTS if model == "diffsfsr" else DIFFSFSR_INPUTS
  label = {"diffsfsr": "DiffSFSR", "tgdm": "TGDM"}[model]
  for name in other:
    if FLAGS[name].value is not None:
      raise SampleError(f"--{name}: not an input of {label} (the workdir's model)")
  common = dict(steps=FLAGS.steps, method=FLAGS.method, seed=FLAGS.seed)
  if model == "diffsfsr":
    common.update(
      id_scale=FLAGS.id_scale,
      exp_scale=FLAGS.exp_scale,
      index=FLAGS.expression_index,
      frames=FLAGS.frames,
    )
  else:
    common.update(radius=FLAGS.radius, chunk=FLAGS.chunk, fps=FLAGS.fps)
  if FLAGS.csv:
    if not os.path.isfile(FLAGS.csv):
      raise SampleError(f"--csv {FLAGS.csv}: no such file")
    with open(FLAGS.csv, newline="") as f:
      rows = list(csv.DictReader(f))
    jobs = []
    for i, row in enumerate(rows):
      job = dict(common)
      job.update({k: v for k, v in row.items() if v not in (None, "")})
      job.setdefault("task", MODEL_TASKS[model][0])
      if job["task"] not in MODEL_TASKS[model]:
        raise SampleError(
          f"{FLAGS.csv} row {i + 2}: task {job['task']!r} (one of {MODEL_TASKS[model]})"
        )
      bad = [k for k in other if row.get(k)]
      if bad:
        raise SampleError(f"{FLAGS.csv} row {i + 2}: {bad[0]!r} is not an input of {label}")
      try:
        for k in INT_FIELDS:
          if job.get(k) is not None:
            job[k] = int(job[k])
        for k in FLOAT_FIELDS:
          if job.get(k) is not None:
            job[k] = float(job[k])
      except ValueError as e:
        raise SampleError(f"{FLAGS.csv} row {i + 2}: {e}") from None
      jobs.append(job)
    return jobs
  task = FLAGS.task or MODEL_TASKS[model][0]
  if task not in MODEL_TASKS[model]:
    raise SampleError(
      f"--task {task}: a {label} checkpoint has the tasks {', '.join(MODEL_TASKS[model])}"
    )
  if model == "tgdm":
    return [dict(common, task=task, **{k: FLAGS[k].value for k in TGDM_INPUTS})]
  job = dict(
    common,
    task=task,
    background=FLAGS.background,
    id=FLAGS.id,
    expression=FLAGS.expression,
    expression_image=FLAGS.expression_image,
    travel=FLAGS.travel,
  )
  if FLAGS.prompt:
    job["background"] = background_from_prompt(FLAGS.prompt, FLAGS.t2i_model, FLAGS.seed)
  return [job]


def background_from_prompt(prompt: str, model: str, seed: int) -> str:
  if not model:
    raise SampleError("--prompt needs --t2i_model (SD-1.x weights: diffusers folder or file)")
  import jax

  from facediff.convert.pipeline import load_models
  from facediff.pipelines.text_to_image import TextToImage, save_png

  images = TextToImage(load_models(model))([prompt], jax.random.key(seed))
  return save_png(images, tempfile.mkdtemp(prefix="facediff_bkg_"))[0]


def main(argv: Sequence[str]) -> None:
  from launch import cli as boundary  # one-line answers to flag mistakes

  boundary.no_extra_arguments("launch.sample", argv)
  if not FLAGS.workdir or not FLAGS.out:
    sys.exit(boundary.fail("launch.sample", "--workdir and --out are required"))
  if FLAGS.compile_cache:
    import jax

    jax.config.update("jax_compilation_cache_dir", FLAGS.compile_cache)
  try:
    model = inference.read_config(FLAGS.workdir, tuple(MODEL_TASKS)).model.name
    jobs = jobs_from_flags(model)
    if model == "tgdm":
      from launch import sample_tgdm

      record = sample_tgdm.run_jobs(
        jobs, FLAGS.workdir, FLAGS.out, weights=FLAGS.weights, use_ema=FLAGS.ema
      )
    else:
      record = run_jobs(jobs, FLAGS.workdir, FLAGS.out, weights=FLAGS.weights, use_ema=FLAGS.ema)
  except (SampleError, FileNotFoundError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    sys.exit(f"launch.sample: {msg}")
  for j in record["jobs"]:
    for f in j["outputs"]:
      print(os.path.join(FLAGS.out, f))


def cli() -> None:
  """The ``facediff`` console command."""
  from launch import cli as boundary

  define_flags()
  app.run(main, flags_parser=boundary.flags_parser("launch.sample", ()))


if __name__ == "__main__":
  cli()
