"""The audio stage of launch.tgdm_demo: EmoA2E (TGDM 4.2, Eq. 9-14) trained on the
synthetic audio set, scored on held-out audio, then driving the trained TGDM reenact
model from speech.

1. Trains the EmoA2E config (``configs/emoa2e.py:tiny``) in ``DIR/emoa2e`` with
   ``launch.runner.run`` (a second start resumes). Its landmark loss uses the morphable
   model of the TGDM demo's synthetic 3DMM set (``model.bfm_path`` = that set's
   ``BFM_model_front.mat``), and :func:`check_consistent` checks that EmoA2E's identity
   and expression sizes, the synthetic audio set's and the 3DMM set's agree.
2. A held-out set (data_pipelines.synthetic_audio, ``split="heldout"``: utterances the
   training never hears, another sampling seed; the same hidden audio -> expression
   map) scores the initial and the trained params: LMD = mean distance of the 68
   landmarks (all, and the 20 mouth points) of the predicted vs the true expression,
   with the record's identity and pose, in pixels of D3DFR's 224-px camera
   (facediff.metrics.expression_landmark_distance).
3. Emotion checks (emotional variant): the intensity knob, eta = 1, 2, 3 on the same
   audio and emotion, must move the prediction along that emotion's true expression
   direction d_e (the set's truth moves by (eta - 1) d_e); a compound emotion, the mean
   of two emotions' text embeddings (TGDM Fig. 9 a), is compared with the mean of the
   two emotions' true expressions.
4. Driving: a held-out speech WAV -> MFCC clips (facediff.audio, standardised as in
   training) -> ``TGDMPipeline.drive_audio`` with the trained EmoA2E, an emotion text
   (its MiniLM embedding) and eta -> a frames PNG (I_3d row, result row) and a GIF.
"""

from __future__ import annotations

import functools
import os

import numpy as np

HELDOUT_RECORDS = 32
ETAS = (1.0, 2.0, 3.0)


def save_frames(i3d, images, out_dir: str, name: str) -> dict:
  """Frames (F, H, W, 3) in [-1, 1] -> ``name.png`` (I_3d row over the result row) and
  ``name.gif`` (the results, 2x nearest upscale, 120 ms per frame)."""
  from PIL import Image

  from facediff.train import writers

  rows = np.stack(list(i3d) + list(images))
  strip = writers.save_png(
    writers.image_grid(rows, len(images), gap=2), os.path.join(out_dir, f"{name}.png")
  )
  px = [np.clip((f + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8) for f in images]
  gif = os.path.join(out_dir, f"{name}.gif")
  imgs = [Image.fromarray(p).resize((p.shape[1] * 2, p.shape[0] * 2), Image.NEAREST) for p in px]
  imgs[0].save(gif, save_all=True, append_images=imgs[1:], duration=120, loop=0)
  return {"frames": len(images), "png": strip, "gif": gif, "rows": ["I_3d", "result"]}


def check_inputs(
  config,
  wav: str | None = None,
  emotion: str = "happy",
  intensity: float = 2.0,
  frames: int | None = None,
  **_,
) -> None:
  """The audio stage's checks that need no data (ValueError / OSError naming the flag):
  an EmoA2E config, eta in [1, 3] (TGDM Eq. 9's test-time range), a positive frame
  count, a readable WAV, and an emotion the text encoder can embed."""
  from data_pipelines import text_embed
  from facediff import audio
  from facediff.train import emoa2e_task

  if config.model.get("name") != "emoa2e":
    raise ValueError(f"--emoa2e_config: model.name is {config.model.get('name')!r}, not emoa2e")
  emoa2e_task.model_config(config)  # the model's own shape checks
  if not 1.0 <= float(intensity) <= 3.0:
    raise ValueError(f"--audio_intensity={intensity}: eta must lie in [1, 3] (TGDM Eq. 9)")
  if frames is not None and int(frames) < 1:
    raise ValueError(f"--audio_frames={frames}: must be >= 1")
  if wav is not None:
    if not os.path.isfile(wav):
      raise FileNotFoundError(f"--audio_wav={wav}: no such file")
    audio.load_wav(wav, int(config.audio.sample_rate))  # raises naming the file
  labels = tuple(config.data.get("emotions", text_embed.MEAD_EMOTIONS))
  if not str(emotion).strip():
    raise ValueError("--audio_emotion: empty text")
  if str(config.data.text_encoder) != "minilm" and emotion not in labels:
    raise ValueError(
      f"--audio_emotion={emotion!r}: the {config.data.text_encoder!r} text encoder embeds "
      f"only the set's labels {labels}"
    )


def prepare(config, bfm_file: str):
  """The EmoA2E config whose landmark loss uses the morphable model in ``bfm_file``."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.bfm_path = bfm_file
  return c


def check_consistent(config, morph, tgdm_config=None) -> dict:
  """Raises if EmoA2E (``config``), the synthetic audio set and the morphable model
  ``morph`` (and the TGDM config's expression field) disagree on the identity and
  expression sizes, or if EmoA2E's landmark model is not ``morph``'s."""
  from data_pipelines import synthetic_audio
  from facediff.losses import emoa2e as emoa2e_loss
  from facediff.train import emoa2e_task

  cfg = emoa2e_task.model_config(config)
  sizes = {
    "expression": {
      "EmoA2EConfig.expression_dim": cfg.expression_dim,
      "synthetic_audio.EXPRESSION_DIM": synthetic_audio.EXPRESSION_DIM,
      "morphable model exp_base": int(np.shape(morph.exp_base)[-1]),
    },
    "identity": {
      "EmoA2EConfig.identity_dim": cfg.identity_dim,
      "synthetic_audio.IDENTITY_DIM": synthetic_audio.IDENTITY_DIM,
      "morphable model id_base": int(np.shape(morph.id_base)[-1]),
    },
  }
  if tgdm_config is not None:
    sizes["expression"]["TGDM config.data.exp_dim"] = int(tgdm_config.data.exp_dim)
  for what, found in sizes.items():
    if len(set(found.values())) != 1:
      raise ValueError(f"EmoA2E and the TGDM demo disagree on the {what} size: {found}")
  ours = emoa2e_loss.landmark_model(emoa2e_task.morphable_model(config))
  theirs = emoa2e_loss.landmark_model(morph)
  for field in ("mean_shape", "id_base", "exp_base"):
    a, b = np.asarray(getattr(ours, field)), np.asarray(getattr(theirs, field))
    if a.shape != b.shape or not np.allclose(a, b, atol=1e-6):
      raise ValueError(
        f"EmoA2E's morphable model (config.model.bfm_path={config.model.bfm_path!r}, "
        f"bfm_vertices={config.model.get('bfm_vertices')}) is not the TGDM set's: the 68 "
        f"keypoints' {field} differ"
      )
  return {
    "expression_dim": cfg.expression_dim,
    "identity_dim": cfg.identity_dim,
    "morphable_model": str(config.model.bfm_path or "synthetic_bfm"),
  }


def heldout_config(config, seed: int, num_records: int = HELDOUT_RECORDS):
  """The held-out split of ``config``'s synthetic audio set drawn with ``seed``."""
  if seed == int(config.data.seed):
    raise ValueError(f"held-out seed {seed} is the training seed (config.data.seed)")
  if int(config.data.get("heldout_utterances", 0)) < 1:
    raise ValueError("config.data.heldout_utterances must be >= 1 for a held-out set")
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.data.split = "heldout"
    c.data.seed = seed
    c.data.num_records = num_records
  return c


def stack(records: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


@functools.lru_cache(maxsize=4)
def _predictor(cfg):
  import jax

  from facediff.models import emoa2e

  @jax.jit
  def predict(params, mfcc, identity, emotion, intensity):
    extra = {"emotion": emotion, "intensity": intensity} if cfg.emotion else {}
    return emoa2e.apply(cfg, params, mfcc, identity, **extra)

  return predict


def predict(cfg, params, batch: dict, emotion=None, intensity=None) -> np.ndarray:
  """beta_hat (B, F, 64) for a batch; ``emotion`` (B, D) / ``intensity`` (B,) replace
  the batch's."""
  import jax

  emotion = batch.get("emotion") if emotion is None else emotion
  intensity = batch.get("intensity") if intensity is None else intensity
  params = jax.device_get(params)  # one compiled program for initial and restored params
  out = _predictor(cfg)(params, batch["mfcc"], batch["identity"], emotion, intensity)
  return np.asarray(jax.device_get(out))


@functools.lru_cache(maxsize=1)
def _lmd_fn():
  import jax
  import jax.numpy as jnp

  from facediff import metrics

  @jax.jit
  def f(model, identity, pred, true, angle, translation, camera):
    args = (model, identity, pred, true, angle, translation, camera)
    every = metrics.expression_landmark_distance(*args)
    mouth = metrics.expression_landmark_distance(*args, indices=metrics.MOUTH)
    return jnp.mean(every), jnp.mean(mouth)

  return f


def lmd(landmark_model, camera, batch: dict, beta_hat, beta=None) -> dict:
  """Mean LMD (pixels) of ``beta_hat`` (B, F, 64) against ``beta`` (default: the
  batch's expression), with the batch's identity and pose, over all 68 landmarks and
  over the mouth's 20 (facediff.metrics.expression_landmark_distance)."""
  beta = batch["expression"] if beta is None else beta
  every, mouth = _lmd_fn()(
    landmark_model,
    np.asarray(batch["identity"])[:, None],
    np.asarray(beta_hat, np.float32),
    np.asarray(beta, np.float32),
    np.asarray(batch["angle"]),
    np.asarray(batch["translation"]),
    camera,
  )
  return {"lmd": float(every), "lmd_mouth": float(mouth)}


def embed(world, config, texts) -> np.ndarray:
  """Emotion text embeddings (len(texts), D): the set's own for its labels, else the
  config's text encoder (MiniLM)."""
  from data_pipelines import text_embed

  out = []
  for t in texts:
    if t in world.emotions:
      out.append(world.z_emo[world.emotions.index(t)])
    elif str(config.data.text_encoder) == "minilm":
      out.append(text_embed.MiniLMEncoder()([text_embed.emotion_prompt(t)])[0])
    else:
      raise ValueError(
        f"emotion {t!r} is not one of the set's labels {world.emotions} and the text "
        f"encoder is {config.data.text_encoder!r} (only 'minilm' embeds any text)"
      )
  return np.stack(out).astype(np.float32)


def _cosine(a, b) -> np.ndarray:
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def intensity_check(cfg, params, batch: dict, world) -> dict:
  """eta = 1, 2, 3 on each held-out sequence with its own emotion e. ``projection[k]``:
  the mean over sequences of <mean_t(beta_hat(eta_k) - beta_hat(1)), d_e> / |d_e|^2,
  which the set's truth makes eta_k - 1; ``cosine``: the mean cosine between
  mean_t(beta_hat(3) - beta_hat(1)) and d_e. ``toward_emotion``: cosine > 0.5 and the
  projection grows with eta."""
  n = len(batch["mfcc"])
  preds = {
    eta: predict(cfg, params, batch, intensity=np.full((n,), eta, np.float32)) for eta in ETAS
  }
  d = world.directions[batch["emotion_index"]]  # (B, 64)
  proj = [
    float(np.mean(np.sum((preds[eta] - preds[1.0]).mean(1) * d, -1) / np.sum(d * d, -1)))
    for eta in ETAS
  ]
  cos = float(np.mean(_cosine((preds[3.0] - preds[1.0]).mean(1), d)))
  return {
    "eta": list(ETAS),
    "projection": [round(p, 4) for p in proj],
    "expected_projection": [eta - 1 for eta in ETAS],
    "cosine": round(cos, 4),
    "toward_emotion": bool(cos > 0.5 and proj[2] > proj[1] > proj[0]),
  }


def compound_check(cfg, params, batch: dict, world, config, pair, eta: float = 2.0) -> dict:
  """The compound of the emotions ``pair`` (a, b): z_c = mean(z_a, z_b)
  (models.emoa2e.compound_emotion) at intensity ``eta`` on the held-out audio. Compared
  (LMD, pixels) with the truth of a, of b and of the mix (eta (d_a + d_b) / 2), and
  ``blend`` = where beta_hat(c) falls on the segment beta_hat(b) -> beta_hat(a) (0 = b,
  1 = a; frame-mean expressions, mean over sequences)."""
  from facediff.models import emoa2e

  a, b = pair
  z = embed(world, config, [a, b])
  zc = np.asarray(emoa2e.compound_emotion([z[0], z[1]]))
  n = len(batch["mfcc"])
  eta_b = np.full((n,), eta, np.float32)
  preds = {
    k: predict(cfg, params, batch, emotion=np.broadcast_to(v, (n, v.shape[-1])), intensity=eta_b)
    for k, v in (("a", z[0]), ("b", z[1]), ("compound", zc))
  }
  weights = {}
  for k, e in (("a", a), ("b", b)):
    if e not in world.emotions:
      raise ValueError(f"compound emotion {e!r}: not one of the set's labels {world.emotions}")
    weights[k] = np.eye(len(world.emotions))[world.emotions.index(e)]
  weights["mix"] = 0.5 * (weights["a"] + weights["b"])
  truths = {
    k: np.stack([world.expression(c, w, eta) for c in batch["mfcc"]]) for k, w in weights.items()
  }
  lm_model, camera = _landmarks_of(config)
  dist = {
    f"to_{k}": lmd(lm_model, camera, batch, preds["compound"], t)["lmd"] for k, t in truths.items()
  }
  seg = (preds["a"] - preds["b"]).mean(1)
  blend = np.sum((preds["compound"] - preds["b"]).mean(1) * seg, -1) / np.sum(seg * seg, -1)
  return {
    "emotions": [a, b],
    "eta": eta,
    "lmd_compound": {k: round(v, 4) for k, v in dist.items()},
    "lmd_a_to_a": round(lmd(lm_model, camera, batch, preds["a"], truths["a"])["lmd"], 4),
    "blend": round(float(np.mean(blend)), 4),
    "closest_to_mix": bool(dist["to_mix"] < min(dist["to_a"], dist["to_b"])),
  }


def _landmarks_of(config):
  """(the 68-keypoint landmark model, the landmark camera) of an EmoA2E config."""
  from facediff.losses import emoa2e as emoa2e_loss
  from facediff.render import mesh
  from facediff.train import emoa2e_task

  cam = mesh.camera_for_size(int(config.model.get("landmark_image_size", 224)))
  return emoa2e_loss.landmark_model(emoa2e_task.morphable_model(config)), cam


def initial_params(config):
  """The params EmoA2E training starts from (``task.init`` with ``train.seed``)."""
  import flax.linen as nn
  import jax

  from launch import runner

  task = runner.build_task(config)
  return jax.jit(lambda k: nn.unbox(task.init(k)))(jax.random.key(int(config.train.seed)))


def loudest_window(raw_clips: np.ndarray, frames: int) -> int:
  """Start of the ``frames`` consecutive video frames with the most energy (MFCC c0 at
  each clip's centre)."""
  if frames > len(raw_clips):
    raise ValueError(f"{frames} frames asked for, the audio has {len(raw_clips)}")
  c0 = raw_clips[:, raw_clips.shape[1] // 2, 0]
  sums = np.convolve(c0, np.ones(frames), mode="valid")
  return int(np.argmax(sums))


def drive(
  pipe,
  params,
  a2e_params,
  config,
  world,
  source: dict,
  wave,
  key,
  out_dir: str,
  *,
  emotion: str,
  intensity: float,
  frames: int,
  name: str = "audio",
) -> dict:
  """Drives ``source`` (a held-out record: image, coeffs) with the speech ``wave``."""
  import jax

  from facediff import audio

  mfcc_cfg = audio.MFCCConfig(**dict(config.audio))
  raw = audio.audio_clips(wave, mfcc_cfg)
  start = loudest_window(raw, frames)
  clips = world.standardise(raw[start : start + frames])
  z = embed(world, config, [emotion])[0] if pipe.emoa2e_config.emotion else None
  out = jax.device_get(
    pipe.drive_audio(
      params,
      a2e_params,
      source["image"],
      source["coeffs"],
      clips,
      key,
      emotion=z,
      intensity=intensity,
    )
  )
  files = save_frames(out.i3d, out.image, out_dir, name)
  # How much the mouth moves: LMD (mouth) of each frame's driving expression (EmoA2E's,
  # smoothed over the video window) against their mean over the frames (source
  # identity, frontal pose), in pixels.
  lm_model, camera = _landmarks_of(config)
  beta = np.asarray(out.expression)[None]
  zero = np.zeros(beta.shape[:2] + (3,), np.float32)
  still = {"identity": np.asarray(source["coeffs"])[None, :80], "angle": zero, "translation": zero}
  motion = lmd(
    lm_model, camera, still, beta, np.broadcast_to(beta.mean(1, keepdims=True), beta.shape)
  )
  return dict(
    files,
    start_frame=start,
    emotion=emotion,
    intensity=float(intensity),
    mouth_motion_px=round(motion["lmd_mouth"], 4),
    expression=out.expression,
  )


def run(
  config,
  workdir: str,
  *,
  pipe,
  params,
  source: dict,
  key,
  out_dir: str,
  tgdm_config=None,
  heldout_seed: int = 1,
  heldout_records: int = HELDOUT_RECORDS,
  frames: int | None = None,
  wav: str | None = None,
  emotion: str = "happy",
  intensity: float = 2.0,
  compound: tuple[str, str] = ("happy", "surprised"),
) -> dict:
  """The audio stage (module docstring). ``pipe``/``params``: the TGDM reenact pipeline
  and its trained params; ``config``: the EmoA2E config (``prepare``d). Returns the
  summary's "audio" section."""
  import time

  from data_pipelines import synthetic_audio
  from facediff.pipelines import tgdm as pipe_lib
  from facediff.train import emoa2e_task
  from launch import runner

  t0 = time.time()
  consistency = check_consistent(config, pipe.morphable_model, tgdm_config)
  cfg = emoa2e_task.model_config(config)
  held_cfg = heldout_config(config, heldout_seed, heldout_records)
  records, world = synthetic_audio.build_records(held_cfg, return_world=True)
  batch = stack(records)
  names, waves, kind = synthetic_audio.load_waves(config.data, int(config.audio.sample_rate))
  heldout = synthetic_audio.split_utterances(
    len(names), int(config.data.heldout_utterances), "heldout"
  )
  lm_model, camera = _landmarks_of(config)

  def score(p):
    s = {"lmd": lmd(lm_model, camera, batch, predict(cfg, p, batch))}
    if cfg.emotion:
      s["intensity"] = intensity_check(cfg, p, batch, world)
      s["compound"] = compound_check(cfg, p, batch, world, config, tuple(compound))
    return s

  before = score(initial_params(config))
  train_summary, a2e_params = runner.train_and_restore(config, os.path.join(workdir, "emoa2e"))
  after = score(a2e_params)
  t_train = time.time()
  if wav is None:
    wav = names[heldout[0]]
    wave = waves[heldout[0]]
  else:
    from facediff import audio

    wave = audio.load_wav(wav, int(config.audio.sample_rate))
  driven = pipe_lib.TGDMPipeline(
    pipe.config, pipe.morphable_model, pipe.settings, emoa2e_config=cfg, apply_fn=pipe.apply_fn
  )
  d = drive(
    driven,
    params,
    a2e_params,
    config,
    world,
    source,
    wave,
    key,
    out_dir,
    emotion=emotion,
    intensity=intensity,
    frames=int(frames or config.data.num_frames),
  )
  d.pop("expression")
  d["wav"] = wav
  section = {
    "variant": str(config.variant),
    "train": train_summary,
    "consistency": consistency,
    "heldout": {
      "split": "heldout",
      "seed": heldout_seed,
      "records": len(records),
      "frames": int(config.data.num_frames),
      "audio": kind,
      "utterances": [os.path.basename(names[i]) for i in heldout],
      "train_utterances": [
        os.path.basename(names[i])
        for i in synthetic_audio.split_utterances(
          len(names), int(config.data.heldout_utterances), "train"
        )
      ],
    },
    "metric": "LMD: mean landmark distance, pixels of the 224-px D3DFR camera",
    "lmd": {
      "before": before["lmd"],
      "after": after["lmd"],
      "improved": after["lmd"]["lmd"] < before["lmd"]["lmd"],
    },
    "drive": d,
    "seconds": {"emoa2e": round(t_train - t0, 1), "drive": round(time.time() - t_train, 1)},
  }
  for k in ("intensity", "compound"):
    if k in after:
      section[k] = {"before": before[k], "after": after[k]}
  return section


def markdown(a: dict) -> list[str]:
  """The summary.md lines of the "audio" section."""
  b, f = a["lmd"]["before"], a["lmd"]["after"]
  h = a["heldout"]
  lines = [
    "",
    f"## Audio: EmoA2E ({a['variant']}, step {a['train']['restored_step']})",
    "",
    f"Held-out: {h['records']} sequences of {h['frames']} frames (seed {h['seed']}) from "
    f"utterances never trained on ({', '.join(h['utterances'])}; {h['audio']} audio). "
    f"{a['metric']}.",
    "",
    "| | LMD (68) | LMD (mouth) |",
    "|---|---|---|",
    f"| before training | {b['lmd']:.3f} | {b['lmd_mouth']:.3f} |",
    f"| after training | {f['lmd']:.3f} | {f['lmd_mouth']:.3f} |",
  ]
  if "intensity" in a:
    i0, i1 = a["intensity"]["before"], a["intensity"]["after"]
    c = a["compound"]["after"]
    lines += [
      "",
      f"Intensity eta = {i1['eta']}: projection of the change on the emotion's direction "
      f"{i1['projection']} (truth {i1['expected_projection']}; before training "
      f"{i0['projection']}), cosine {i1['cosine']:.3f} (before {i0['cosine']:.3f}).",
      f"Compound {' + '.join(c['emotions'])} (mean of the text embeddings, eta {c['eta']}): "
      f"LMD to the mixed truth {c['lmd_compound']['to_mix']:.3f}, to {c['emotions'][0]} "
      f"{c['lmd_compound']['to_a']:.3f}, to {c['emotions'][1]} {c['lmd_compound']['to_b']:.3f}; "
      f"blend {c['blend']:.2f} (0 = {c['emotions'][1]}, 1 = {c['emotions'][0]}).",
    ]
  d = a["drive"]
  lines += [
    "",
    f"Driven by {os.path.basename(d['wav'])} (frames {d['start_frame']}.."
    f"{d['start_frame'] + d['frames'] - 1}), emotion {d['emotion']!r}, eta {d['intensity']}: "
    f"{os.path.basename(d['png'])} (I_3d row, result row), {os.path.basename(d['gif'])}; "
    f"mouth landmarks move {d['mouth_motion_px']:.2f} px around their mean.",
  ]
  return lines
