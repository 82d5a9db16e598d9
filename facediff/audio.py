"""MFCC features of 16 kHz speech and the per-video-frame MFCC clips of TGDM's EmoA2E.

TGDM Sec. 4.2 feeds EmoA2E "Mel-frequency Cepstral Coefficients (MFCC) clips
A = {A_1, ..., A_N}", one clip per video frame; the paper does not spell out the MFCC
settings or the clip width, so this module uses the standard pipeline with librosa's
conventions (``librosa.feature.mfcc`` with a 25 ms Hann window and a 10 ms hop):

1. optional pre-emphasis y[n] = x[n] - a x[n-1] (:func:`preemphasis`);
2. framing: frames of ``win_length`` samples centred on t * hop (zero padding of
   win_length // 2 at both ends), so there are 1 + len // hop frames (:func:`frame`);
3. periodic Hann window, zero-padded FFT of ``n_fft`` points, power |X|^2
   (:func:`power_spectrum`);
4. Slaney-style mel filterbank with Slaney area normalisation (librosa's default,
   :func:`mel_filterbank`);
5. log: 10 log10(max(mel, 1e-10)), floored at ``top_db`` below the utterance's
   maximum (librosa ``power_to_db``; :func:`log_mel`);
6. orthonormal DCT-II, first ``n_mfcc`` coefficients (:func:`dct_ii`).

The hop ties MFCC frames to video frames: video frame i (time i / fps) is centred on
MFCC frame round(i * sample_rate / (fps * hop)) (exactly 4 i at 25 fps and a 10 ms
hop), and its clip is the ``clip_frames`` MFCC frames around it, edges clamped
(:func:`video_clips`).

Every function takes numpy or jax arrays: numpy in, numpy out (data pipelines stay on
the host); jax in, jax out (jit-able with the config static).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

_AMIN = 1e-10  # librosa power_to_db's amin


@dataclasses.dataclass(frozen=True)
class MFCCConfig:
  """MFCC and clip settings (defaults: 16 kHz speech, 25 fps video).

  Attributes:
    sample_rate: audio rate in Hz (audio at other rates is resampled by
      :func:`load_wav`).
    fps: video frame rate; each video frame gets one clip.
    win_length: analysis window in samples (400 = 25 ms).
    hop_length: frame step in samples (160 = 10 ms: 4 MFCC frames per 25 fps frame).
    n_fft: FFT size (>= win_length; the frame is zero-padded).
    n_mels: mel bands.
    n_mfcc: cepstral coefficients kept (including c0).
    fmin, fmax: filterbank edges in Hz (fmax None: sample_rate / 2).
    preemphasis: a of y[n] = x[n] - a x[n-1] (0 turns it off).
    top_db: floor of the log-mel spectrogram below its maximum (None: no floor).
    clip_frames: MFCC frames per video-frame clip (32 = 0.32 s at a 10 ms hop).
  """

  sample_rate: int = 16000
  fps: float = 25.0
  win_length: int = 400
  hop_length: int = 160
  n_fft: int = 512
  n_mels: int = 40
  n_mfcc: int = 13
  fmin: float = 0.0
  fmax: float | None = None
  preemphasis: float = 0.97
  top_db: float | None = 80.0
  clip_frames: int = 32

  def __post_init__(self):
    if self.n_fft < self.win_length:
      raise ValueError(f"MFCCConfig: n_fft {self.n_fft} < win_length {self.win_length}")
    if self.n_mfcc > self.n_mels:
      raise ValueError(f"MFCCConfig: n_mfcc {self.n_mfcc} > n_mels {self.n_mels}")
    if self.hop_length <= 0 or self.clip_frames <= 0 or self.fps <= 0:
      raise ValueError("MFCCConfig: hop_length, clip_frames and fps must be positive")

  @property
  def mfcc_per_video_frame(self) -> float:
    return self.sample_rate / (self.fps * self.hop_length)


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def preemphasis(audio, coef: float):
  """y[0] = x[0], y[n] = x[n] - coef x[n-1] along the last axis."""
  xp = _xp(audio)
  if coef == 0:
    return audio
  return xp.concatenate([audio[..., :1], audio[..., 1:] - coef * audio[..., :-1]], axis=-1)


def hann_window(length: int) -> np.ndarray:
  """Periodic Hann window (scipy ``get_window('hann', N)``, librosa's and torch's
  default): w[n] = 0.5 - 0.5 cos(2 pi n / N)."""
  n = np.arange(length)
  return (0.5 - 0.5 * np.cos(2 * np.pi * n / length)).astype(np.float32)


def frame(audio, win_length: int, hop_length: int):
  """(..., S) -> (..., 1 + S // hop, win_length) frames centred on t * hop, with
  win_length // 2 zeros padded at both ends (librosa ``center=True``, constant pad)."""
  xp = _xp(audio)
  half = win_length // 2
  pad = [(0, 0)] * (audio.ndim - 1) + [(half, win_length - half)]
  padded = xp.pad(audio, pad)
  num = 1 + audio.shape[-1] // hop_length
  idx = np.arange(num)[:, None] * hop_length + np.arange(win_length)[None, :]
  return padded[..., idx]


def power_spectrum(frames, n_fft: int):
  """|rfft(hann * frame, n_fft)|^2: (..., T, win) -> (..., T, n_fft // 2 + 1)."""
  xp = _xp(frames)
  window = hann_window(frames.shape[-1])
  spec = xp.fft.rfft(frames * window, n=n_fft, axis=-1)
  return (spec.real**2 + spec.imag**2).astype(frames.dtype)


def hz_to_mel(hz):
  """Slaney's mel scale (librosa ``hz_to_mel(htk=False)``): linear below 1 kHz
  (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4)."""
  hz = np.asarray(hz, np.float64)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
  return np.where(
    hz >= min_log_hz,
    min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
    hz / f_sp,
  )


def mel_to_hz(mel):
  """Inverse of :func:`hz_to_mel`."""
  mel = np.asarray(mel, np.float64)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
  return np.where(
    mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel
  )


def mel_filterbank(
  sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
  """(n_fft // 2 + 1, n_mels) triangular filters (librosa ``filters.mel`` defaults:
  Slaney mel scale, ``norm='slaney'``): n_mels + 2 points equally spaced in mel,
  triangles interpolated in Hz, each scaled by 2 / (f_{m+2} - f_m) (unit area)."""
  fmax = sample_rate / 2 if fmax is None else fmax
  fft_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  mel_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  lower = (fft_hz[None, :] - mel_hz[:-2, None]) / np.diff(mel_hz)[:-1, None]
  upper = (mel_hz[2:, None] - fft_hz[None, :]) / np.diff(mel_hz)[1:, None]
  weights = np.maximum(0.0, np.minimum(lower, upper))
  weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
  return weights.T.astype(np.float32)


def log_mel(mel, top_db: float | None = 80.0):
  """librosa ``power_to_db(ref=1.0)``: 10 log10(max(mel, 1e-10)), then (with
  ``top_db``) floored at top_db below its maximum over the last two axes (T, mels)."""
  xp = _xp(mel)
  db = 10.0 * xp.log10(xp.maximum(mel, _AMIN))
  if top_db is not None:
    db = xp.maximum(db, db.max(axis=(-2, -1), keepdims=True) - top_db)
  return db


def dct_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_in, n_out) orthonormal DCT-II (scipy ``dct(type=2, norm='ortho')``):
  c_k = s_k sum_n x_n cos(pi k (2n + 1) / (2 N)), s_0 = sqrt(1/N), s_k = sqrt(2/N)."""
  n = np.arange(n_in)[:, None]
  k = np.arange(n_out)[None, :]
  basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in))
  scale = np.where(k == 0, np.sqrt(1.0 / n_in), np.sqrt(2.0 / n_in))
  return (basis * scale).astype(np.float32)


def dct_ii(x, n_out: int):
  """Orthonormal DCT-II of the last axis, first ``n_out`` coefficients."""
  xp = _xp(x)
  m = dct_matrix(x.shape[-1], n_out)
  if xp is jnp:
    return jnp.matmul(x, m, precision=jax.lax.Precision.HIGHEST)
  return x @ m


def mfcc(audio, config: MFCCConfig = MFCCConfig()):
  """(..., S) float audio at ``config.sample_rate`` -> (..., T, n_mfcc), T = 1 + S // hop."""
  xp = _xp(audio)
  audio = audio.astype(np.float32) if xp is np else audio.astype(jnp.float32)
  x = preemphasis(audio, config.preemphasis)
  power = power_spectrum(frame(x, config.win_length, config.hop_length), config.n_fft)
  fb = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax)
  if xp is jnp:
    mel = jnp.matmul(power, fb, precision=jax.lax.Precision.HIGHEST)
  else:
    mel = power @ fb
  return dct_ii(log_mel(mel, config.top_db), config.n_mfcc)


def num_video_frames(num_samples: int, config: MFCCConfig = MFCCConfig()) -> int:
  """Video frames that ``num_samples`` of audio cover: floor(S * fps / sample_rate)."""
  return int(math.floor(num_samples * config.fps / config.sample_rate + 1e-9))


def clip_indices(num_frames: int, num_mfcc: int, config: MFCCConfig = MFCCConfig()) -> np.ndarray:
  """(F, clip_frames) MFCC frame indices of each video frame's clip: the window of
  ``clip_frames`` frames starting clip_frames // 2 before the frame's centre
  round(i * sample_rate / (fps * hop)), clamped to [0, num_mfcc - 1] at the edges."""
  centre = np.round(np.arange(num_frames) * config.mfcc_per_video_frame).astype(np.int64)
  offsets = np.arange(config.clip_frames) - config.clip_frames // 2
  return np.clip(centre[:, None] + offsets[None, :], 0, num_mfcc - 1)


def video_clips(mfccs, num_frames: int | None = None, config: MFCCConfig = MFCCConfig()):
  """(..., T, n_mfcc) MFCCs -> (..., F, clip_frames, n_mfcc) clips A_1..A_F (TGDM
  Sec. 4.2), one per video frame. ``num_frames`` defaults to the frames the MFCCs
  cover, (T - 1) * hop * fps / sample_rate."""
  t = mfccs.shape[-2]
  if num_frames is None:
    num_frames = num_video_frames((t - 1) * config.hop_length, config)
  idx = clip_indices(num_frames, t, config)
  return mfccs[..., idx, :]


def audio_clips(audio, config: MFCCConfig = MFCCConfig()):
  """(S,) audio -> (F, clip_frames, n_mfcc) clips, F = :func:`num_video_frames`."""
  return video_clips(mfcc(audio, config), num_video_frames(audio.shape[-1], config), config)


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Polyphase resampling (scipy ``resample_poly``, Kaiser-windowed FIR)."""
  import scipy.signal  # noqa: PLC0415

  if rate_in == rate_out:
    return audio.astype(np.float32)
  g = math.gcd(int(rate_in), int(rate_out))
  return scipy.signal.resample_poly(audio, rate_out // g, rate_in // g).astype(np.float32)


def load_wav(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
  """A PCM/float WAV file as mono float32 in [-1, 1] at ``sample_rate`` (channels
  averaged, resampled if needed)."""
  import scipy.io.wavfile  # noqa: PLC0415

  try:
    rate, data = scipy.io.wavfile.read(os.fspath(path))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable WAV file ({e})") from e
  if np.issubdtype(data.dtype, np.integer):
    info = np.iinfo(data.dtype)
    if info.min == 0:  # unsigned 8-bit PCM is offset by 128
      data = (data.astype(np.float32) - (info.max + 1) / 2) / ((info.max + 1) / 2)
    else:
      data = data.astype(np.float32) / -float(info.min)
  data = np.asarray(data, np.float32)
  if data.ndim == 2:
    data = data.mean(axis=1)
  if data.ndim != 1 or data.size == 0:
    raise ValueError(f"{path}: expected mono or multi-channel audio, got shape {data.shape}")
  return resample(data, int(rate), sample_rate)
