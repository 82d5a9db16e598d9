"""A synthetic EmoA2E training set: real speech MFCC clips, 3DMM coefficient sequences of
the synthetic morphable model, and emotion text embeddings.

TGDM trains EmoA2E on MEAD (emotional) and VoxCeleb1 (emotion-free) with D3DFR
coefficients of every video frame; neither the videos nor D3DFR's weights can be had
here. This set stands in for them so the whole training path runs on a CPU:

* audio: the real speech WAVs of Debian's alsa-utils (``/usr/share/sounds/alsa``,
  "Front Center", ... spoken by a person; FACTS.md), resampled to 16 kHz, as MFCC
  clips per 25 fps video frame (facediff.audio), standardised per coefficient. With
  ``data.audio = "synthetic"`` (or "auto" when no WAV is found) a harmonic, syllable-
  modulated tone replaces it.
* targets: the expression of frame t is a fixed random function of that frame's clip
  (so the mapping is learnable), plus eta times a per-emotion direction and a little
  noise; identity is drawn per sequence, pose is a small smooth random walk. The
  synthetic morphable model (``facediff.render.synthetic_bfm``) gives the landmarks.
* emotion: MEAD's eight labels through the real MiniLM text encoder
  (data_pipelines.text_embed; ``data.text_encoder = "random"``: seeded unit vectors),
  intensity eta in {1, 2, 3}.

Records are built in memory once; :func:`make_train_iterator` is a grain iterator
(checkpointable position) of per-host numpy batches.
"""

from __future__ import annotations

import glob
import logging
import os

import grain
import numpy as np

from data_pipelines import text_embed
from facediff import audio

log = logging.getLogger(__name__)

ALSA_SOUNDS = "/usr/share/sounds/alsa"
# Noise.wav in that folder is white noise, not speech.
NOT_SPEECH = ("Noise.wav",)
IDENTITY_DIM, EXPRESSION_DIM = 80, 64


def speech_paths(paths=None) -> list[str]:
  """The speech WAVs to use: ``paths`` (files or folders) if given, else
  $FACEDIFF_SPEECH_DIR, else alsa-utils' folder. Missing entries are skipped."""
  if not paths:
    paths = [os.environ.get("FACEDIFF_SPEECH_DIR", ALSA_SOUNDS)]
  found = []
  for p in paths:
    p = os.fspath(p)
    if os.path.isdir(p):
      found += sorted(glob.glob(os.path.join(p, "*.wav")))
    elif os.path.isfile(p):
      found.append(p)
  return [f for f in found if os.path.basename(f) not in NOT_SPEECH]


def synthetic_speech(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
  """A voiced-speech stand-in: a glottal-like harmonic series (f0 100-180 Hz, gliding)
  under a 4 Hz syllable envelope, two formant-like resonances, and breath noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  f0 = rng.uniform(100, 180) * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
  phase = 2 * np.pi * np.cumsum(f0) / sample_rate
  formants = rng.uniform([500, 1200], [900, 2400])
  x = sum(
    np.sin(k * phase) / k * (1 + 2 * np.exp(-(((k * f0 - formants[:, None]) / 150) ** 2)).sum(0))
    for k in range(1, 30)
  )
  syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None)
  x = x * syllables + 0.02 * rng.normal(size=t.shape)
  return (0.3 * x / np.abs(x).max()).astype(np.float32)


def load_utterances(data_cfg, mfcc_cfg: audio.MFCCConfig) -> tuple[list[np.ndarray], str]:
  """The clip sequences (F_u, clip_frames, n_mfcc) of every utterance and the audio
  kind used ("speech" or "synthetic")."""
  kind = str(data_cfg.get("audio", "auto"))
  if kind not in ("auto", "speech", "synthetic"):
    raise ValueError(f"config.data.audio={kind!r}: expected auto, speech or synthetic")
  files = [] if kind == "synthetic" else speech_paths(list(data_cfg.get("speech_paths", [])))
  if kind == "speech" and not files:
    raise FileNotFoundError(
      f"config.data.audio='speech' but no speech WAV was found (config.data.speech_paths, "
      f"$FACEDIFF_SPEECH_DIR or {ALSA_SOUNDS}: apt-get install alsa-utils)"
    )
  if files:
    waves = [audio.load_wav(f, mfcc_cfg.sample_rate) for f in files]
    kind = "speech"
  else:
    if kind == "auto":
      log.warning("no speech WAV found (%s): using synthetic speech", ALSA_SOUNDS)
    waves = [synthetic_speech(1.6, mfcc_cfg.sample_rate, seed) for seed in range(8)]
    kind = "synthetic"
  return [audio.audio_clips(w, mfcc_cfg) for w in waves], kind


def _smooth_walk(rng, frames: int, dims: int, step: float) -> np.ndarray:
  return np.cumsum(rng.normal(scale=step, size=(frames, dims)), axis=0)


def build_records(config) -> list[dict[str, np.ndarray]]:
  """``config.data.num_records`` training sequences of ``config.data.num_frames`` frames."""
  d = config.data
  mfcc_cfg = audio.MFCCConfig(**dict(config.audio))
  rng = np.random.default_rng(int(d.seed))
  utterances, kind = load_utterances(d, mfcc_cfg)
  stacked = np.concatenate(utterances)
  mean, std = stacked.mean(axis=(0, 1)), stacked.std(axis=(0, 1)) + 1e-6
  utterances = [((u - mean) / std).astype(np.float32) for u in utterances]
  emotions = tuple(d.get("emotions", text_embed.MEAD_EMOTIONS))
  z_emo = text_embed.emotion_embeddings(
    emotions, str(d.text_encoder), int(config.model.text_dim), int(d.seed)
  )
  # The hidden "ground-truth" audio -> expression map and emotion directions.
  clip_dim = mfcc_cfg.clip_frames * mfcc_cfg.n_mfcc
  w_audio = rng.normal(size=(clip_dim, EXPRESSION_DIM)) / np.sqrt(clip_dim)
  directions = rng.normal(size=(len(emotions), EXPRESSION_DIM)) * 0.3
  num_frames = int(d.num_frames)
  records = []
  for i in range(int(d.num_records)):
    u = utterances[rng.integers(len(utterances))]
    start = rng.integers(max(1, len(u) - num_frames + 1))
    idx = np.clip(start + np.arange(num_frames), 0, len(u) - 1)
    clips = u[idx]
    e, eta = rng.integers(len(emotions)), float(rng.integers(1, 4))
    expression = (
      np.tanh(clips.reshape(num_frames, -1) @ w_audio)
      + eta * directions[e]
      + 0.05 * rng.normal(size=(num_frames, EXPRESSION_DIM))
    )
    records.append(
      {
        "mfcc": clips,
        "identity": (0.5 * rng.normal(size=IDENTITY_DIM)).astype(np.float32),
        "expression": expression.astype(np.float32),
        "angle": _smooth_walk(rng, num_frames, 3, 0.02).astype(np.float32),
        "translation": _smooth_walk(rng, num_frames, 3, 0.01).astype(np.float32),
        "emotion": z_emo[e],
        "intensity": np.float32(eta),
        "emotion_index": np.int32(e),
        "index": np.int32(i),
      }
    )
  log.info("synthetic EmoA2E set: %d sequences, %s audio", len(records), kind)
  return records


def make_train_iterator(config, process_index: int = 0, process_count: int = 1):
  """Checkpointable grain iterator of per-host numpy batches of :func:`build_records`."""
  gbs = int(config.data.global_batch_size)
  if gbs % process_count:
    raise ValueError(
      f"config.data.global_batch_size={gbs} does not divide over {process_count} processes"
    )
  ds = grain.MapDataset.source(build_records(config))[process_index::process_count]
  ds = ds.shuffle(seed=int(config.data.seed)).repeat(None)
  return iter(ds.batch(gbs // process_count, drop_remainder=True).to_iter_dataset())
