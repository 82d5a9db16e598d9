"""EmoA2E (TGDM Eq. 9-14): MFCC clips, the transformer, the loss, the task; video driving.

References: transformers.audio_utils (librosa-compatible numpy spectrogram and
filterbank) and scipy's DCT for the MFCCs; torch.nn.TransformerEncoderLayer for the
encoder; facediff.render's full reconstruction for the landmarks; the equations written
out with numpy for the losses and the video window.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.fft
import scipy.signal

from configs import emoa2e as emoa2e_configs
from data_pipelines import synthetic_audio
from facediff import audio
from facediff.losses import emoa2e as loss_lib
from facediff.models import emoa2e
from facediff.render import bfm, coeffs, mesh, renderer
from facediff.train import emoa2e_task, loop

SPEECH = synthetic_audio.speech_paths()


def _chirp(seconds=1.0, sr=16000):
  t = np.arange(int(seconds * sr)) / sr
  x = 0.3 * scipy.signal.chirp(t, 100, seconds, 6000) + 0.1 * np.sin(2 * np.pi * 440 * t)
  return x.astype(np.float32)


def _reference_mfcc(x: np.ndarray, cfg: audio.MFCCConfig) -> np.ndarray:
  """librosa.feature.mfcc's pipeline through transformers' numpy audio_utils + scipy."""
  from transformers import audio_utils  # noqa: PLC0415

  x = x.astype(np.float64)
  if cfg.preemphasis:
    x = np.concatenate([x[:1], x[1:] - cfg.preemphasis * x[:-1]])
  fb = audio_utils.mel_filter_bank(
    cfg.n_fft // 2 + 1, cfg.n_mels, cfg.fmin, cfg.sample_rate / 2, cfg.sample_rate,
    norm="slaney", mel_scale="slaney",
  )  # fmt: skip
  spec = audio_utils.spectrogram(
    x, audio_utils.window_function(cfg.win_length, "hann", periodic=True),
    frame_length=cfg.win_length, hop_length=cfg.hop_length, fft_length=cfg.n_fft, power=2.0,
    center=True, pad_mode="constant", mel_filters=fb, mel_floor=1e-10, log_mel="dB",
    db_range=cfg.top_db, dtype=np.float64,
  )  # fmt: skip
  return scipy.fft.dct(spec.T, type=2, norm="ortho", axis=-1)[:, : cfg.n_mfcc]


# ---- MFCC ----


def test_mfcc_pieces_match_scipy_and_transformers():
  from transformers import audio_utils  # noqa: PLC0415

  np.testing.assert_allclose(
    audio.hann_window(400), scipy.signal.get_window("hann", 400, fftbins=True), atol=1e-7
  )
  ref = audio_utils.mel_filter_bank(257, 40, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
  got = audio.mel_filterbank(16000, 512, 40)
  assert np.abs(got - ref).max() < 1e-8 * np.abs(ref).max() * 1e3
  x = np.random.default_rng(0).normal(size=(5, 40))
  np.testing.assert_allclose(
    audio.dct_ii(x, 13), scipy.fft.dct(x, type=2, norm="ortho")[:, :13], atol=1e-5
  )
  # Pre-emphasis: y[n] = x[n] - a x[n-1], y[0] = x[0].
  y = audio.preemphasis(np.array([1.0, 2.0, 4.0]), 0.5)
  np.testing.assert_allclose(y, [1.0, 1.5, 3.0])


@pytest.mark.parametrize("preemph", [0.0, 0.97])
def test_mfcc_matches_reference_numpy_and_jitted(preemph):
  cfg = audio.MFCCConfig(preemphasis=preemph)
  x = _chirp()
  ref = _reference_mfcc(x, cfg)
  got = audio.mfcc(x, cfg)
  assert isinstance(got, np.ndarray) and got.shape == (1 + len(x) // 160, 13) == ref.shape
  scale = np.abs(ref).max()
  assert np.abs(got - ref).max() < 2e-5 * scale
  jitted = jax.jit(lambda a: audio.mfcc(a, cfg))(jnp.asarray(x))
  assert isinstance(jitted, jax.Array)
  assert np.abs(np.asarray(jitted) - ref).max() < 2e-5 * scale


@pytest.mark.skipif(not SPEECH, reason="no speech WAV (apt-get install alsa-utils)")
def test_mfcc_of_real_speech_matches_reference():
  cfg = audio.MFCCConfig()
  x = audio.load_wav(SPEECH[0], 16000)
  ref = _reference_mfcc(x, cfg)
  got = audio.mfcc(x, cfg)
  assert np.abs(got - ref).max() < 2e-5 * np.abs(ref).max()
  clips = audio.audio_clips(x, cfg)
  assert clips.shape == (audio.num_video_frames(len(x), cfg), 32, 13)


def test_clips_follow_the_video_frames_with_clamped_edges():
  cfg = audio.MFCCConfig(clip_frames=6)  # 25 fps, 10 ms hop: frame i centred on MFCC 4 i
  m = np.arange(30, dtype=np.float32)[:, None] * np.ones((1, 13), np.float32)
  clips = audio.video_clips(m, 7, cfg)
  assert clips.shape == (7, 6, 13)
  np.testing.assert_array_equal(clips[0, :, 0], [0, 0, 0, 0, 1, 2])  # 0-3 .. 0+2, clamped
  np.testing.assert_array_equal(clips[2, :, 0], [5, 6, 7, 8, 9, 10])
  np.testing.assert_array_equal(clips[6, :, 0], [21, 22, 23, 24, 25, 26])
  clips_end = audio.video_clips(m, 8, cfg)
  np.testing.assert_array_equal(clips_end[7, :, 0], [25, 26, 27, 28, 29, 29])
  # 30 fps: centres round(i * 100 / 30).
  idx = audio.clip_indices(4, 100, audio.MFCCConfig(fps=30.0, clip_frames=2))
  np.testing.assert_array_equal(idx[:, 1], [0, 3, 7, 10])
  assert audio.num_video_frames(16000, cfg) == 25


# ---- Model ----

TINY = emoa2e.EmoA2EConfig(
  clip_frames=4, n_mfcc=5, text_dim=12, hidden=16, num_layers=2, num_heads=4, mlp_dim=24
)


def _inputs(cfg, b=2, f=5, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = {
    "mfcc": jax.random.normal(k[0], (b, f, cfg.clip_frames, cfg.n_mfcc)),
    "identity": jax.random.normal(k[1], (b, cfg.identity_dim)),
  }
  if cfg.emotion:
    x["emotion"] = jax.random.normal(k[2], (b, cfg.text_dim))
    x["intensity"] = jnp.array([1.0, 2.5])[:b]
  return x


# Jitted once per module (eager Flax init/apply is slow on CPU); calls with the same
# config and shapes reuse the compiled programs.
_init = jax.jit(emoa2e.init_params, static_argnums=0)
_apply = jax.jit(emoa2e.apply, static_argnums=0)
_embed = jax.jit(emoa2e.embed_tokens, static_argnums=0)


def _params(cfg, seed=0):
  return nn.unbox(_init(cfg, jax.random.key(seed)))


def _mlp(p, x):
  h = x @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
  h = np.asarray(jax.nn.gelu(jnp.asarray(h)))
  return h @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"])


def _torch_layer(p, cfg):
  import torch  # noqa: PLC0415

  layer = torch.nn.TransformerEncoderLayer(
    cfg.hidden, cfg.num_heads, cfg.mlp_dim, dropout=0.0, batch_first=True, norm_first=False
  )
  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
  sd = {
    "self_attn.in_proj_weight": torch.cat([t(p[n]["kernel"]).T for n in ("to_q", "to_k", "to_v")]),
    "self_attn.in_proj_bias": torch.cat([t(p[n]["bias"]) for n in ("to_q", "to_k", "to_v")]),
    "self_attn.out_proj.weight": t(p["to_out"]["kernel"]).T,
    "self_attn.out_proj.bias": t(p["to_out"]["bias"]),
    "linear1.weight": t(p["ff_1"]["kernel"]).T,
    "linear1.bias": t(p["ff_1"]["bias"]),
    "linear2.weight": t(p["ff_2"]["kernel"]).T,
    "linear2.bias": t(p["ff_2"]["bias"]),
    "norm1.weight": t(p["norm1"]["scale"]),
    "norm1.bias": t(p["norm1"]["bias"]),
    "norm2.weight": t(p["norm2"]["scale"]),
    "norm2.bias": t(p["norm2"]["bias"]),
  }
  layer.double().load_state_dict(sd)
  return layer.eval()


def _layer_norm(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _numpy_layer(p, cfg):
  """Vaswani et al.'s post-LN encoder layer written out (ReLU FFN, no dropout)."""

  def dense(name, x):
    return x @ np.asarray(p[name]["kernel"], np.float64) + np.asarray(p[name]["bias"])

  def layer(x):
    b, n, d = x.shape
    heads, dh = cfg.num_heads, cfg.hidden // cfg.num_heads
    q, k, v = (dense(name, x).reshape(b, n, heads, dh) for name in ("to_q", "to_k", "to_v"))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
    x = _layer_norm(x + dense("to_out", attn), p["norm1"])
    ff = dense("ff_2", np.maximum(dense("ff_1", x), 0.0))
    return _layer_norm(x + ff, p["norm2"])

  return layer


def _check_forward(emotion, make_layer):
  """Eq. 10-11 step by step: tokens [eta phi_base, MLP(alpha), MLP(A)] + PE + MLP(z),
  the encoder layers (``make_layer``), the output MLP on the audio positions."""
  cfg = emoa2e.EmoA2EConfig(**{**TINY.__dict__, "emotion": emotion})
  p, x = _params(cfg), _inputs(cfg)
  xn = {k: np.asarray(v, np.float64) for k, v in x.items()}
  b, f = xn["mfcc"].shape[:2]
  audio_tok = _mlp(p["audio_mlp"], xn["mfcc"].reshape(b, f, -1))
  tokens = [_mlp(p["identity_mlp"], xn["identity"])[:, None], audio_tok]
  if emotion:
    phi = xn["intensity"][:, None, None] * np.asarray(p["intensity_base"])[None, None]
    tokens.insert(0, phi)
  h = np.concatenate(tokens, axis=1)
  length = h.shape[1]
  pos = np.arange(length)[:, None]
  i = np.arange(cfg.hidden // 2)[None, :]
  pe = np.zeros((length, cfg.hidden))
  pe[:, 0::2] = np.sin(pos / 10000 ** (2 * i / cfg.hidden))
  pe[:, 1::2] = np.cos(pos / 10000 ** (2 * i / cfg.hidden))
  h = h + pe[None]
  if emotion:
    h = h + _mlp(p["emotion_mlp"], xn["emotion"])[:, None]
  np.testing.assert_allclose(_embed(cfg, p, **x), h, atol=1e-5)
  for n in range(cfg.num_layers):
    h = make_layer(p[f"layers_{n}"], cfg)(h)
  want = _mlp(p["out_mlp"], np.asarray(h)[:, cfg.num_prefix_tokens :])
  got = _apply(cfg, p, **x)
  assert got.shape == (b, f, 64)
  np.testing.assert_allclose(got, want, atol=2e-5)
  return float(np.abs(np.asarray(got) - want).max())


def test_forward_matches_eq_10_11_written_out():
  _check_forward(True, _numpy_layer)


@pytest.mark.slow
def test_forward_matches_eq_10_11_written_out_emotion_free():
  _check_forward(False, _numpy_layer)


@pytest.mark.slow
@pytest.mark.parametrize("emotion", [True, False])
def test_forward_matches_torch_transformer_encoder_layer(emotion):
  import torch  # noqa: PLC0415

  def torch_layer(p, cfg):
    layer = _torch_layer(p, cfg)

    def run(h):
      with torch.no_grad():
        return layer(torch.tensor(np.asarray(h))).numpy()

    return run

  _check_forward(emotion, torch_layer)


def test_eta_scales_the_intensity_token_only():
  """Eq. 9: phi = eta phi_base; the other tokens do not depend on eta."""
  p, x = _params(TINY), _inputs(TINY)
  base = np.asarray(p["intensity_base"])
  tok = {}
  for eta in (0.0, 1.0, 1.7, 3.0):
    tok[eta] = np.asarray(_embed(TINY, p, **{**x, "intensity": jnp.full((2,), eta)}))
  for eta in (1.0, 1.7, 3.0):
    np.testing.assert_allclose(
      tok[eta][:, 0] - tok[0.0][:, 0], np.stack([eta * base] * 2), atol=1e-5
    )
    np.testing.assert_array_equal(tok[eta][:, 1:], tok[0.0][:, 1:])
  # A continuous eta moves the output continuously between the trained levels.
  out = [_apply(TINY, p, **{**x, "intensity": jnp.full((2,), e)}) for e in (1.0, 2.0)]
  assert float(jnp.abs(out[1] - out[0]).max()) > 1e-4


def test_encoder_is_bidirectional_and_per_frame():
  p, x = _params(TINY), _inputs(TINY)
  out = _apply(TINY, p, **x)
  late = x["mfcc"].at[:, -1].add(1.0)
  out2 = _apply(TINY, p, **{**x, "mfcc": late})
  assert float(jnp.abs(out2[:, 0] - out[:, 0]).max()) > 1e-5  # not causal


def test_variants_check_their_inputs():
  free = emoa2e.EmoA2EConfig(**{**TINY.__dict__, "emotion": False})
  p_free = nn.unbox(emoa2e.abstract_params(free))
  x = _inputs(TINY)
  with pytest.raises(ValueError, match="emotion-free"):
    jax.eval_shape(lambda: emoa2e.apply(free, p_free, **x))
  assert "intensity_base" not in p_free and "emotion_mlp" not in p_free
  p = nn.unbox(emoa2e.abstract_params(TINY))
  with pytest.raises(ValueError, match="needs emotion"):
    jax.eval_shape(lambda: emoa2e.apply(TINY, p, x["mfcc"], x["identity"]))
  with pytest.raises(ValueError, match="mfcc clips"):
    jax.eval_shape(lambda: emoa2e.apply(TINY, p, **{**x, "mfcc": x["mfcc"][:, :, :3]}))


def test_compound_emotion_is_the_mean_of_the_embeddings():
  z = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
  np.testing.assert_allclose(emoa2e.compound_emotion([z[0], z[1]]), (z[0] + z[1]) / 2, atol=1e-7)
  np.testing.assert_allclose(emoa2e.compound_emotion(z), z.mean(0), atol=1e-6)
  got = emoa2e.compound_emotion(jnp.asarray(z), weights=[1.0, 3.0, 0.0])
  np.testing.assert_allclose(got, (z[0] + 3 * z[1]) / 4, atol=1e-6)
  assert isinstance(got, jax.Array)


# ---- Loss ----


def _sequence(model, b=2, f=3, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "identity": rng.normal(size=(b, 80)).astype(np.float32) * 0.5,
    "expression": rng.normal(size=(b, f, 64)).astype(np.float32),
    "angle": rng.normal(size=(b, f, 3)).astype(np.float32) * 0.1,
    "translation": rng.normal(size=(b, f, 3)).astype(np.float32) * 0.05,
  }


def test_loss_terms_written_out():
  model = bfm.synthetic_bfm(200, seed=1)
  kp_model = loss_lib.landmark_model(model)
  camera = mesh.camera_for_size(224)
  tgt = _sequence(model)
  beta_hat = tgt["expression"] + np.random.default_rng(1).normal(size=(2, 3, 64)).astype(np.float32)
  loss_fn = jax.jit(lambda bh, t, km: loss_lib.emoa2e_loss(bh, t, km, camera))
  loss, m = loss_fn(jnp.asarray(beta_hat), tgt, kp_model)
  # Eq. 12: Euclidean distance of the expression vectors, mean over frames and batch.
  rec = np.mean([np.linalg.norm(tgt["expression"][i, t] - beta_hat[i, t]) for i in range(2)
                 for t in range(3)])  # fmt: skip
  # Eq. 13: the full renderer's landmarks of rho and of rho with beta_hat (D3DFR layout).
  vec = np.zeros((2, 2, 3, 257), np.float32)  # (rho / rho_hat, batch, frame, 257)
  vec[..., :80] = tgt["identity"][:, None]
  vec[0, ..., 80:144], vec[1, ..., 80:144] = tgt["expression"], beta_hat
  vec[..., 224:227] = tgt["angle"]
  vec[..., 254:257] = tgt["translation"]
  reconstruct = jax.jit(lambda v: renderer.reconstruct(model, coeffs.split(v), camera).landmarks)
  lms = np.asarray(reconstruct(jnp.asarray(vec.reshape(-1, 257)))).reshape(2, 2, 3, 68, 2)
  dist = np.linalg.norm(lms[0] - lms[1], axis=-1)
  lm = np.mean(dist)
  np.testing.assert_allclose(m["loss_rec"], rec, rtol=1e-5)
  np.testing.assert_allclose(m["loss_lm"], lm, rtol=1e-4)
  np.testing.assert_allclose(loss, 100 * rec + 0.1 * lm, rtol=1e-5)
  assert lm > 0.1  # the expression bases move the landmarks by pixels


def test_loss_is_zero_with_finite_gradient_at_the_target():
  kp_model = loss_lib.landmark_model(bfm.synthetic_bfm(200))
  tgt = _sequence(None)
  fn = lambda bh: loss_lib.emoa2e_loss(bh, tgt, kp_model, mesh.camera_for_size(224))[0]  # noqa: E731
  val, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(tgt["expression"]))
  # Zero up to float rounding of the two (identical) landmark computations.
  assert abs(float(val)) < 1e-6 and np.all(np.isfinite(grad))


# ---- Task, config, data ----


def _tiny_config(variant="tiny", **train):
  c = emoa2e_configs.get_config(variant)
  c.data.text_encoder = "random"  # the real MiniLM is checked in the slow test below
  c.data.num_records = 16
  c.data.num_frames = 4
  c.model.num_layers = 1
  c.train.update(dict(num_steps=1, log_every=1, checkpoint_every=1, async_checkpointing=False))
  c.train.update(train)
  return c


def _train_end_to_end(tmp_path, variant):
  cfg = _tiny_config(variant)
  task = emoa2e_task.make_task(cfg)
  it = synthetic_audio.make_train_iterator(cfg)
  summary = loop.train_and_evaluate(cfg, str(tmp_path), task, it)
  assert summary["step"] == 1 and summary["checkpoints"] == [1]
  m = summary["metrics"]
  assert np.isfinite(m["loss"]) and m["loss_rec"] > 0 and m["loss_lm"] > 0
  np.testing.assert_allclose(m["loss"], 100 * m["loss_rec"] + 0.1 * m["loss_lm"], rtol=1e-4)
  assert ("emotion_mlp" in summary["params_per_module"]) == (variant == "tiny")


def test_one_training_step_end_to_end(tmp_path):
  _train_end_to_end(tmp_path, "tiny")


@pytest.mark.slow
def test_one_training_step_end_to_end_emotion_free(tmp_path):
  _train_end_to_end(tmp_path, "tiny_free")


def test_emotion_free_variant_trains():
  """The task's loss under Adam: a few steps on one batch lower it."""
  cfg = _tiny_config("tiny_free")
  task = emoa2e_task.make_task(cfg)
  params = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
  assert "emotion_mlp" not in params and "intensity_base" not in params
  batch = jax.tree.map(jnp.asarray, next(synthetic_audio.make_train_iterator(cfg)))
  tx = optax.adam(3e-3)
  grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)

  @jax.jit
  def step(params, opt_state):
    (loss, _), grads = grad_fn(params, task.frozen, batch, jax.random.key(1), {})
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(3):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_synthetic_set_and_iterator_state():
  cfg = _tiny_config()
  recs = synthetic_audio.build_records(cfg)
  r = recs[0]
  assert r["mfcc"].shape == (4, 8, 13) and r["expression"].shape == (4, 64)
  assert r["emotion"].shape == (384,) and r["intensity"] in (1.0, 2.0, 3.0)
  it = synthetic_audio.make_train_iterator(cfg)
  next(it)
  state = it.get_state()
  want = next(it)
  it2 = synthetic_audio.make_train_iterator(cfg)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["mfcc"], want["mfcc"])


def test_configs_build():
  for v in emoa2e_configs.VARIANTS:
    c = emoa2e_configs.get_config(v)
    cfg = emoa2e_task.model_config(c)
    assert cfg.emotion == (not v.endswith("_free"))
  paper = emoa2e_configs.get_config("paper")
  assert paper.data.num_frames == 32 and paper.data.global_batch_size == 128
  assert paper.optim.lr == 2e-4 and paper.model.lambda_rec == 100 and paper.model.lambda_lm == 0.1
  n = sum(x.size for x in jax.tree.leaves(nn.unbox(emoa2e.abstract_params(
    emoa2e_task.model_config(paper)))))  # fmt: skip
  assert 2e6 < n < 6e6


@pytest.mark.slow
def test_minilm_emotion_embeddings_are_real():
  from data_pipelines import text_embed  # noqa: PLC0415

  z = text_embed.MiniLMEncoder()(["happy", "joyful", "angry", "a wooden table"])
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
  cos = z @ z.T
  assert cos[0, 1] > 0.5 > cos[0, 3] and cos[0, 1] > cos[0, 2] > cos[0, 3]


# ---- Video driving ----


def test_drive_video_window_at_the_edges():
  rng = np.random.default_rng(3)
  source = coeffs.split(rng.normal(size=(261,)).astype(np.float32), "tgdm")
  frames = rng.normal(size=(4, 261)).astype(np.float32)
  drivers = coeffs.split(frames, "tgdm")
  out = coeffs.drive_video(source, drivers, radius=1)
  e = frames[:, 80:144]
  want = np.stack([(e[0] + e[1]) / 2, (e[0] + e[1] + e[2]) / 3, (e[1] + e[2] + e[3]) / 3,
                   (e[2] + e[3]) / 2])  # fmt: skip
  np.testing.assert_allclose(out.expression, want, atol=1e-6)
  pose = frames[:, 251:257]
  np.testing.assert_allclose(
    np.concatenate([out.angle, out.translation], -1)[3], (pose[2] + pose[3]) / 2, atol=1e-6
  )
  np.testing.assert_array_equal(out.gaze, drivers.gaze)  # gaze per frame, not averaged
  for field in ("identity", "texture", "gamma"):
    got = np.asarray(getattr(out, field))
    assert got.shape == (4, getattr(source, field).shape[-1])
    np.testing.assert_array_equal(got, np.broadcast_to(getattr(source, field), got.shape))
  # Batched (B, F, ...) with jax arrays.
  seq = coeffs.split(jnp.asarray(rng.normal(size=(2, 3, 261)), jnp.float32), "tgdm")
  src = coeffs.split(jnp.asarray(rng.normal(size=(2, 261)), jnp.float32), "tgdm")
  out_b = coeffs.drive_video(src, seq, radius=1, axis=1)
  np.testing.assert_allclose(out_b.expression[:, 1], seq.expression.mean(axis=1), atol=1e-6)
  np.testing.assert_array_equal(out_b.identity[:, 2], src.identity)


def test_speech_paths_skip_noise(tmp_path):
  for name in ("Front_Center.wav", "Noise.wav"):
    (tmp_path / name).write_bytes(b"")
  assert [os.path.basename(p) for p in synthetic_audio.speech_paths([tmp_path])] == [
    "Front_Center.wav"
  ]
