"""TGDM end to end on CPU: train a tiny TGDM on the synthetic 3DMM set, then reenact,
swap and drive a video on held-out identities, before and after training.

    python -m launch.tgdm_demo --workdir DIR [--config configs/tgdm.py:tiny]
        [--swap_config configs/tgdm.py:tiny_swap] [--config.train.num_steps=300 ...]
        [--emoa2e_config configs/emoa2e.py:tiny] [--audio_wav X.wav]
        [--audio_emotion happy --audio_intensity 2] [--noaudio]

1. Builds the synthetic 3DMM set (data_pipelines/synthetic_3dmm.py, ``config.
   synthetic_3dmm``) into ``DIR/data`` and a held-out set of other identities (another
   seed, the same morphable model) into ``DIR/heldout``.
2. Trains the reenact model (``--config``) in ``DIR/reenact`` and the swap model
   (``--swap_config``, TGDM 4.4) in ``DIR/swap`` with ``launch.runner.run``; a second
   start resumes both from their checkpoints.
3. On every held-out group, with the initial and with the trained params
   (facediff.pipelines.tgdm, the config's sampler):
   * reenact: source = the group's record 0, driver = its record 1. The group shares
     identity, texture and lighting, so the driver's image is the exact answer;
   * swap: source = record 0 of group g, target = record 2 of group g + 1, the
     target's stored "Small" mask; the answer on the face is the render of the swapped
     coefficients (the synthetic images are exactly such renders).
   Scores: MSE and PSNR of result vs answer in [0, 1] on the face mask (the visible face
   of the recombined coefficients). Grids: source | driver/target | I_3d | result |
   ground truth (outside the face the swap's ground truth shows the target).
4. A video: the trained reenact model driven by a coefficient sequence interpolated
   between two records of a held-out group (radius-1 window) -> a frames PNG (I_3d row,
   result row) and an animated GIF.
5. Audio (launch.tgdm_audio; ``--noaudio`` skips it): trains EmoA2E
   (``--emoa2e_config``, TGDM 4.2) in ``DIR/emoa2e`` on the synthetic audio set with the
   3DMM set's morphable model, scores LMD on held-out audio (utterances never trained
   on, another seed) before and after training, checks the intensity knob and a
   compound emotion, and drives the trained reenact model from a held-out speech WAV
   -> ``audio.png`` (I_3d row, result row) and ``audio.gif`` beside the video.

Writes ``DIR/summary.json`` and ``DIR/summary.md``. Evaluation uses the trained params
themselves (not the EMA: the tiny configs' decay 0.999 over 300 steps still holds 74% of
the initial weights).
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
HELDOUT_PER_GROUP = 3


def _decode(png: bytes) -> np.ndarray:
  """PNG bytes -> (H, W, 3) float32 in [-1, 1]."""
  import io

  from PIL import Image

  img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32)
  return img / 127.5 - 1.0


def load_heldout(folder: str) -> list[list[dict]]:
  """Held-out records grouped: ``groups[g][k]`` with image [-1, 1], mask, coeffs, id."""
  from data_pipelines import records

  groups: dict[int, list[dict]] = {}
  for r in records.iter_records(folder):
    groups.setdefault(int(r["group"]), []).append(
      {
        "key": str(r["key"]),
        "image": _decode(r["image"]),
        "mask": np.asarray(r["mask"], np.float32)[..., None],
        "coeffs": np.asarray(r["coeffs"], np.float32),
        "id": np.asarray(r["id_3dmm"], np.float32),
      }
    )
  return [groups[g] for g in sorted(groups)]


def masked_scores(result: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
  """MSE over the masked pixels (all channels) of images in [0, 1] (given in [-1, 1]),
  and PSNR = 10 log10(1 / MSE) in dB; per example and their means."""
  a, b = (np.asarray(result, np.float64) + 1) / 2, (np.asarray(truth, np.float64) + 1) / 2
  m = np.broadcast_to(np.asarray(mask, np.float64) > 0.5, a.shape)
  mse = np.array([np.mean(np.square(a[i] - b[i])[m[i]]) for i in range(len(a))])
  psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
  return {
    "mse": float(mse.mean()),
    "psnr": float(psnr.mean()),
    "per_example_psnr": [round(float(p), 3) for p in psnr],
  }


def grid(rows: list[list[np.ndarray]]) -> np.ndarray:
  """Rows of equally sized (H, W, 3) images in [-1, 1] -> one uint8 grid, 2 px gaps."""
  from facediff.train import writers

  return writers.image_grid(np.stack([x for row in rows for x in row]), len(rows[0]), gap=2)


def _save_png(array: np.ndarray, path: str) -> str:
  from facediff.train import writers

  return writers.save_png(array, path)


def pairs(groups: list[list[dict]]) -> dict[str, dict[str, np.ndarray]]:
  """The held-out reenact and swap inputs, batched over the groups."""
  n = len(groups)
  src = [g[0] for g in groups]
  drv = [g[1] for g in groups]
  tgt = [groups[(i + 1) % n][2] for i in range(n)]

  def stack(recs, field):
    return np.stack([r[field] for r in recs])

  return {
    "reenact": {
      "source_image": stack(src, "image"),
      "source_coeffs": stack(src, "coeffs"),
      "driver_image": stack(drv, "image"),
      "driver_coeffs": stack(drv, "coeffs"),
    },
    "swap": {
      "source_image": stack(src, "image"),
      "source_coeffs": stack(src, "coeffs"),
      "target_image": stack(tgt, "image"),
      "target_coeffs": stack(tgt, "coeffs"),
      "target_mask": stack(tgt, "mask"),
      "id": stack(src, "id"),
    },
  }


def run_reenact(pipe, params, inputs, key) -> tuple[dict, np.ndarray, object]:
  """(scores, ground truth, result) of one reenactment pass."""
  import jax

  out = jax.device_get(
    pipe.reenact(
      params, inputs["source_image"], inputs["source_coeffs"], inputs["driver_coeffs"], key
    )
  )
  truth = inputs["driver_image"]  # same group: the driver's image is the answer
  return masked_scores(out.image, truth, out.mask), truth, out


def run_swap(pipe, params, inputs, key) -> tuple[dict, np.ndarray, object]:
  import jax

  out = jax.device_get(
    pipe.swap(
      params,
      inputs["source_image"],
      inputs["source_coeffs"],
      inputs["target_image"],
      inputs["target_coeffs"],
      inputs["id"],
      key,
      target_mask=inputs["target_mask"],
    )
  )
  # The synthetic images are the render over a background: on the face the answer is
  # the render of the swapped coefficients; elsewhere the target shows for the grid.
  truth = np.where(out.mask > 0.5, out.i3d, inputs["target_image"])
  return masked_scores(out.image, truth, out.mask), truth, out


def _prepare(config, workdir: str, data_dir: str):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.data.path = data_dir
  return c


def initial_params(config):
  """The params training starts from (``init_params`` with ``train.seed``)."""
  import flax.linen as nn
  import jax

  from facediff.models import tgdm
  from facediff.train import tgdm_task

  cfg = tgdm_task.model_config(config)
  init = jax.jit(lambda k: nn.unbox(tgdm.init_params(cfg, k)))
  return init(jax.random.key(int(config.train.seed)))


def make_pipeline(config, morph):
  from facediff.pipelines import tgdm as pipe_lib
  from facediff.train import tgdm_task

  mc = config.model
  settings = pipe_lib.Settings(
    schedule=str(mc.schedule),
    num_train_timesteps=int(mc.num_train_timesteps),
    method=str(mc.sample_method),
    num_steps=None if mc.sample_steps is None else int(mc.sample_steps),
    render_window=int(mc.render_window),
    coeff_layout=str(config.data.get("coeff_layout", "d3dfr")),
  )
  return pipe_lib.TGDMPipeline(tgdm_task.model_config(config), morph, settings)


def video(pipe, params, group: list[dict], frames: int, key, out_dir: str) -> dict:
  """Drives the group's record 0 with coefficients interpolated from its record 1 to its
  record 2 (expression and pose move; the window of radius 1 smooths them)."""
  import jax

  from launch import tgdm_audio

  w = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None]
  seq = (1 - w) * group[1]["coeffs"][None] + w * group[2]["coeffs"][None]
  out = jax.device_get(
    pipe.drive_video(params, group[0]["image"], group[0]["coeffs"], seq, key, radius=1)
  )
  return tgdm_audio.save_frames(out.i3d, out.image, out_dir, "video")


def run(
  config,
  workdir: str,
  swap_config=None,
  heldout_groups: int = 4,
  heldout_seed: int = 1,
  video_frames: int = 8,
  emoa2e_config=None,
  audio_options: dict | None = None,
) -> dict:
  """The demo (module docstring); ``emoa2e_config`` None skips the audio stage, whose
  keyword options (launch.tgdm_audio.run: ``wav``, ``emotion``, ``intensity``,
  ``frames``, ``compound``, ``heldout_records``) ``audio_options`` holds."""
  import jax

  from data_pipelines import synthetic_3dmm
  from facediff.render import bfm
  from launch import runner, tgdm_audio

  t0 = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  syn = dict(config.synthetic_3dmm)
  data_dir = os.path.join(workdir, "data")
  synthetic_3dmm.build(data_dir, **syn)
  heldout_dir = os.path.join(workdir, "heldout")
  held = dict(syn, num_groups=heldout_groups, per_group=HELDOUT_PER_GROUP, seed=heldout_seed)
  synthetic_3dmm.build(heldout_dir, **held)
  groups = load_heldout(heldout_dir)
  inputs = pairs(groups)
  morph = bfm.load_bfm(os.path.join(heldout_dir, synthetic_3dmm.BFM_FILE))
  out_dir = os.path.join(workdir, "results")
  os.makedirs(out_dir, exist_ok=True)
  summary: dict = {
    "workdir": workdir,
    "variant": str(config.variant),
    "heldout": {"path": heldout_dir, "groups": len(groups), "seed": heldout_seed},
    "metric": "MSE / PSNR (dB) in [0, 1] on the rendered face mask",
  }
  runs = {"reenact": (config, run_reenact)}
  if swap_config is not None:
    runs["swap"] = (swap_config, run_swap)
  key = jax.random.key(int(config.train.seed) + 1)
  trained = {}
  for task, (cfg, fn) in runs.items():
    cfg = _prepare(cfg, workdir, data_dir)
    pipe = make_pipeline(cfg, morph)
    before, _, _ = fn(pipe, initial_params(cfg), inputs[task], key)
    logging.info("%s before training: PSNR %.2f dB", task, before["psnr"])
    train_summary, params = runner.train_and_restore(cfg, os.path.join(workdir, task))
    after, truth, out = fn(pipe, params, inputs[task], key)
    logging.info("%s after training: PSNR %.2f dB", task, after["psnr"])
    second = inputs[task].get("driver_image", inputs[task].get("target_image"))
    rows = [
      [inputs[task]["source_image"][i], second[i], out.i3d[i], out.image[i], truth[i]]
      for i in range(len(truth))
    ]
    path = _save_png(grid(rows), os.path.join(out_dir, f"{task}.png"))
    summary[task] = {
      "train": train_summary,
      "before": before,
      "after": after,
      "improved": after["psnr"] > before["psnr"],
      "grid": path,
      "columns": [
        "source",
        "driver" if task == "reenact" else "target",
        "I_3d",
        "result",
        "ground truth",
      ],
      "sampler": f"{pipe.settings.method}, {pipe.settings.num_steps or 'all'} steps",
    }
    trained[task] = (pipe, params)
  pipe, params = trained["reenact"]
  summary["video"] = video(pipe, params, groups[0], video_frames, key, out_dir)
  if emoa2e_config is not None:
    summary["audio"] = tgdm_audio.run(
      tgdm_audio.prepare(emoa2e_config, os.path.join(data_dir, synthetic_3dmm.BFM_FILE)),
      workdir,
      pipe=pipe,
      params=params,
      source=groups[0][0],
      key=key,
      out_dir=out_dir,
      tgdm_config=config,
      heldout_seed=heldout_seed,
      **(audio_options or {}),
    )
  summary["seconds"] = round(time.time() - t0, 1)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(markdown(summary))
  return summary


def markdown(summary: dict) -> str:
  lines = [
    f"# TGDM demo ({summary['variant']})",
    "",
    f"Held-out: {summary['heldout']['groups']} synthetic identity groups "
    f"(seed {summary['heldout']['seed']}). {summary['metric']}.",
    "",
    "| task | step | sampler | MSE before | MSE after | PSNR before | PSNR after | grid |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for task in ("reenact", "swap"):
    if task not in summary:
      continue
    r = summary[task]
    lines.append(
      f"| {task} | {r['train']['restored_step']} | {r['sampler']} | {r['before']['mse']:.4f} | "
      f"{r['after']['mse']:.4f} | {r['before']['psnr']:.2f} | {r['after']['psnr']:.2f} | "
      f"{os.path.basename(r['grid'])} |"
    )
  v = summary["video"]
  lines += [
    "",
    f"Video: {v['frames']} frames, {os.path.basename(v['png'])} (I_3d row, result row), "
    f"{os.path.basename(v['gif'])}.",
  ]
  if "audio" in summary:
    from launch import tgdm_audio

    lines += tgdm_audio.markdown(summary["audio"])
  return "\n".join(lines) + "\n"


_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(ROOT, "configs", "tgdm.py") + ":tiny",
  "The reenact config (``configs/tgdm.py:<variant>``, with ``synthetic_3dmm``); any field "
  "is overridable with --config.<field>=<value>.",
  lock_config=True,
)
_SWAP_CONFIG = config_flags.DEFINE_config_file(
  "swap_config",
  os.path.join(ROOT, "configs", "tgdm.py") + ":tiny_swap",
  "The swap config (TGDM 4.4); it trains on the reenact config's synthetic set.",
  lock_config=True,
)
_EMOA2E_CONFIG = config_flags.DEFINE_config_file(
  "emoa2e_config",
  os.path.join(ROOT, "configs", "emoa2e.py") + ":tiny",
  "The EmoA2E config (TGDM 4.2) of the audio stage; its landmark loss uses the synthetic "
  "3DMM set's morphable model.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)
_GROUPS = flags.DEFINE_integer("heldout_groups", 4, "Held-out identity groups.")
_FRAMES = flags.DEFINE_integer("video_frames", 8, "Frames of the driven video.")
_AUDIO = flags.DEFINE_bool("audio", True, "Run the audio stage (EmoA2E, audio driving).")
_WAV = flags.DEFINE_string(
  "audio_wav", None, "Speech WAV that drives the face (default: a held-out utterance)."
)
_EMOTION = flags.DEFINE_string("audio_emotion", "happy", "Emotion text of the audio drive.")
_INTENSITY = flags.DEFINE_float("audio_intensity", 2.0, "Emotion intensity eta, in [1, 3].")
_AUDIO_FRAMES = flags.DEFINE_integer(
  "audio_frames", None, "Frames of the audio drive (default: EmoA2E's sequence length)."
)


PROG = "launch.tgdm_demo"


def check_inputs(
  config,
  swap_config,
  workdir: str,
  heldout_groups: int,
  video_frames: int,
  emoa2e_config=None,
  audio_options: dict | None = None,
):
  """The checks that need no data: raises ValueError / OSError naming the flag."""
  from facediff import cli
  from facediff.train import tgdm_task
  from launch import tgdm_audio

  cli.check_output_dir(workdir, "--workdir")
  for flag, c in (("--config", config), ("--swap_config", swap_config)):
    if "synthetic_3dmm" not in c:
      raise ValueError(f"{flag}: variant {c.get('variant')!r} has no synthetic_3dmm set")
    tgdm_task.check_config(c)
  for flag, value in (("--heldout_groups", heldout_groups), ("--video_frames", video_frames)):
    if value < 1:
      raise ValueError(f"{flag}={value}: must be >= 1")
  if emoa2e_config is not None:
    tgdm_audio.check_inputs(emoa2e_config, **(audio_options or {}))


def main(argv: Sequence[str]) -> None:
  from launch import cli

  cli.no_extra_arguments(PROG, argv)
  emoa2e_config = _EMOA2E_CONFIG.value if _AUDIO.value else None
  audio_options = dict(
    wav=_WAV.value, emotion=_EMOTION.value, intensity=_INTENSITY.value, frames=_AUDIO_FRAMES.value
  )
  try:
    check_inputs(
      _CONFIG.value,
      _SWAP_CONFIG.value,
      _WORKDIR.value,
      _GROUPS.value,
      _FRAMES.value,
      emoa2e_config,
      audio_options,
    )
  except cli.INPUT_ERRORS as e:
    raise SystemExit(cli.fail(PROG, e)) from None
  summary = run(
    _CONFIG.value,
    _WORKDIR.value,
    _SWAP_CONFIG.value,
    heldout_groups=_GROUPS.value,
    video_frames=_FRAMES.value,
    emoa2e_config=emoa2e_config,
    audio_options=audio_options,
  )
  print(markdown(summary))
  print(f"summary: {os.path.join(summary['workdir'], 'summary.json')}")


if __name__ == "__main__":
  from launch import cli

  app.run(main, flags_parser=cli.flags_parser(PROG, ("config", "swap_config", "emoa2e_config")))
