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
  noise; identity is drawn per sequence (as data_pipelines.synthetic_3dmm draws it),
  pose is a small smooth random walk. The trainer's morphable model (the config's
  ``model.bfm_*``) gives the landmarks.
* splits: the last ``data.heldout_utterances`` utterances are kept out of the "train"
  split and make the "heldout" one, so held-out sequences share no audio with training.
  The hidden map, the emotion directions and embeddings and the MFCC standardisation
  (:class:`World`) come from ``data.world_seed`` and are the same in every split;
  ``data.seed`` draws the sequences (utterance, window, identity, emotion, eta, pose).
* emotion: MEAD's eight labels through the real MiniLM text encoder
  (data_pipelines.text_embed; ``data.text_encoder = "random"``: seeded unit vectors),
  intensity eta in {1, 2, 3}.

Records are built in memory once; :func:`make_train_iterator` is a grain iterator
(checkpointable position) of per-host numpy batches.
"""

from __future__ import annotations

import dataclasses
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
# Identity coefficients are drawn as data_pipelines.synthetic_3dmm draws them (N(0, 0.7^2)),
# so EmoA2E sees the identities of the faces TGDM's demo is trained on.
IDENTITY_SCALE = 0.7
SYNTHETIC_UTTERANCES = 8


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


def load_waves(data_cfg, sample_rate: int) -> tuple[list[str], list[np.ndarray], str]:
  """(names, waveforms at ``sample_rate``, kind) of every utterance, in a fixed order
  (sorted file names; synthetic speech by seed), and the audio kind used ("speech" or
  "synthetic")."""
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
    return files, [audio.load_wav(f, sample_rate) for f in files], "speech"
  if kind == "auto":
    log.warning("no speech WAV found (%s): using synthetic speech", ALSA_SOUNDS)
  seeds = range(SYNTHETIC_UTTERANCES)
  return (
    [f"synthetic_speech(seed={s})" for s in seeds],
    [synthetic_speech(1.6, sample_rate, s) for s in seeds],
    "synthetic",
  )


def load_utterances(data_cfg, mfcc_cfg: audio.MFCCConfig) -> tuple[list[np.ndarray], str]:
  """The clip sequences (F_u, clip_frames, n_mfcc) of every utterance (unstandardised)
  and the audio kind used ("speech" or "synthetic")."""
  _, waves, kind = load_waves(data_cfg, mfcc_cfg.sample_rate)
  return [audio.audio_clips(w, mfcc_cfg) for w in waves], kind


def split_utterances(num: int, heldout: int, split: str) -> list[int]:
  """Indices of the utterances of ``split``: the last ``heldout`` of the ``num`` (in
  load order) are "heldout", the others "train"; "all" takes every one. Held-out
  sequences share no audio with training ones."""
  if split not in ("train", "heldout", "all"):
    raise ValueError(f"config.data.split={split!r}: expected train, heldout or all")
  if not 0 <= heldout < num:
    raise ValueError(
      f"config.data.heldout_utterances={heldout}: needs 0 <= it < the {num} utterances found"
    )
  if split == "all":
    return list(range(num))
  if split == "heldout":
    if heldout == 0:
      raise ValueError("config.data.split='heldout' needs config.data.heldout_utterances > 0")
    return list(range(num - heldout, num))
  return list(range(num - heldout))


@dataclasses.dataclass(frozen=True)
class World:
  """What every split and sampling seed of the set shares (``config.data.world_seed``):
  the hidden audio -> expression map, the per-emotion expression directions, the
  emotion embeddings and the MFCC standardisation (statistics of the training
  utterances).

  Attributes:
    emotions: the emotion labels; ``z_emo`` (E, text_dim) their text embeddings.
    w_audio: (clip_frames * n_mfcc, 64) the hidden linear map of a standardised clip.
    directions: (E, 64) expression direction of each emotion (scaled by eta).
    mfcc_mean, mfcc_std: (n_mfcc,) standardisation of the MFCC coefficients.
  """

  emotions: tuple[str, ...]
  z_emo: np.ndarray
  w_audio: np.ndarray
  directions: np.ndarray
  mfcc_mean: np.ndarray
  mfcc_std: np.ndarray

  def standardise(self, clips: np.ndarray) -> np.ndarray:
    """Raw MFCC clips (..., clip_frames, n_mfcc) -> the model's standardised input."""
    return ((clips - self.mfcc_mean) / self.mfcc_std).astype(np.float32)

  def expression(self, clips: np.ndarray, emotion_index, intensity) -> np.ndarray:
    """The noise-free target expression of standardised clips (F, clip_frames, n_mfcc):
    tanh(A W) + eta d_e, (F, 64). ``emotion_index`` may also be a (E,) weight vector
    (a mix of the directions)."""
    frames = clips.shape[0]
    w = np.asarray(emotion_index)
    d = self.directions[int(w)] if w.ndim == 0 else w @ self.directions
    return np.tanh(clips.reshape(frames, -1) @ self.w_audio) + float(intensity) * d


def make_world(config, utterances: list[np.ndarray]) -> World:
  """The :class:`World` of ``config`` for the raw clip sequences ``utterances`` (all of
  them, in load order; the statistics use the training split only)."""
  d = config.data
  mfcc_cfg = audio.MFCCConfig(**dict(config.audio))
  train = split_utterances(len(utterances), int(d.get("heldout_utterances", 0)), "train")
  stacked = np.concatenate([utterances[i] for i in train])
  world_seed = int(d.get("world_seed", 0))
  rng = np.random.default_rng(world_seed)
  emotions = tuple(d.get("emotions", text_embed.MEAD_EMOTIONS))
  clip_dim = mfcc_cfg.clip_frames * mfcc_cfg.n_mfcc
  return World(
    emotions=emotions,
    z_emo=text_embed.emotion_embeddings(
      emotions, str(d.text_encoder), int(config.model.text_dim), world_seed
    ),
    w_audio=rng.normal(size=(clip_dim, EXPRESSION_DIM)) / np.sqrt(clip_dim),
    directions=rng.normal(size=(len(emotions), EXPRESSION_DIM)) * 0.3,
    mfcc_mean=stacked.mean(axis=(0, 1)),
    mfcc_std=stacked.std(axis=(0, 1)) + 1e-6,
  )


def load_world(config) -> World:
  """The :class:`World` of ``config``, its utterances loaded: e.g. to standardise new
  speech (``world.standardise(audio.audio_clips(wave, ...))``) exactly as the
  training clips were, before feeding it to an EmoA2E trained on this set."""
  raw, _ = load_utterances(config.data, audio.MFCCConfig(**dict(config.audio)))
  return make_world(config, raw)


def _smooth_walk(rng, frames: int, dims: int, step: float) -> np.ndarray:
  return np.cumsum(rng.normal(scale=step, size=(frames, dims)), axis=0)


def build_records(config, return_world: bool = False):
  """``config.data.num_records`` sequences of ``config.data.num_frames`` frames from the
  utterances of ``config.data.split``, drawn with ``config.data.seed``; with
  ``return_world`` also the :class:`World` they follow."""
  d = config.data
  mfcc_cfg = audio.MFCCConfig(**dict(config.audio))
  raw, kind = load_utterances(d, mfcc_cfg)
  world = make_world(config, raw)
  split = str(d.get("split", "train"))
  chosen = split_utterances(len(raw), int(d.get("heldout_utterances", 0)), split)
  rng = np.random.default_rng(int(d.seed))
  num_frames = int(d.num_frames)
  records = []
  for i in range(int(d.num_records)):
    u = chosen[rng.integers(len(chosen))]
    clips_all = world.standardise(raw[u])
    start = rng.integers(max(1, len(clips_all) - num_frames + 1))
    idx = np.clip(start + np.arange(num_frames), 0, len(clips_all) - 1)
    clips = clips_all[idx]
    e, eta = rng.integers(len(world.emotions)), float(rng.integers(1, 4))
    expression = world.expression(clips, e, eta) + 0.05 * rng.normal(
      size=(num_frames, EXPRESSION_DIM)
    )
    records.append(
      {
        "mfcc": clips,
        "identity": (IDENTITY_SCALE * rng.normal(size=IDENTITY_DIM)).astype(np.float32),
        "expression": expression.astype(np.float32),
        "angle": _smooth_walk(rng, num_frames, 3, 0.02).astype(np.float32),
        "translation": _smooth_walk(rng, num_frames, 3, 0.01).astype(np.float32),
        "emotion": world.z_emo[e],
        "intensity": np.float32(eta),
        "emotion_index": np.int32(e),
        "utterance": np.int32(u),
        "start": np.int32(start),
        "index": np.int32(i),
      }
    )
  log.info(
    "synthetic EmoA2E set (%s split, seed %d): %d sequences, %s audio",
    split,
    int(d.seed),
    len(records),
    kind,
  )
  return (records, world) if return_world else records


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
