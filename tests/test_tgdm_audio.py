"""The audio stage of the TGDM demo (launch.tgdm_audio) and the synthetic audio set's
held-out split (data_pipelines.synthetic_audio).

The held-out split must share no audio with training while following the same hidden
audio -> expression map (checked against the map written out). The drive runs an
oracle TGDM whose x0 prediction is I_3d (so the frames are the renders of EmoA2E's
expressions, without a UNet to compile). (slow) The stage trains a shrunken EmoA2E for a
few steps through launch.runner; the full demo with a trained TGDM is the slow test in
test_tgdm_pipelines.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import emoa2e as emoa2e_configs
from data_pipelines import synthetic_3dmm, synthetic_audio
from facediff.diffusion import make_schedule
from facediff.models import tgdm
from facediff.pipelines import tgdm as pipe_lib
from facediff.render import bfm
from launch import tgdm_audio

SPEECH = synthetic_audio.speech_paths()


def _config(steps=1, records=32):
  c = emoa2e_configs.get_config("tiny")
  c.data.text_encoder = "random"  # MiniLM itself is tested in test_emoa2e.py (slow)
  c.data.num_records = records
  c.data.num_frames = 4
  c.model.num_layers = 1
  c.optim.lr = 3e-3
  c.train.update(
    dict(num_steps=steps, log_every=20, checkpoint_every=steps, async_checkpointing=False)
  )
  return c


def test_heldout_audio_is_disjoint_from_training_and_follows_the_same_map():
  c = _config()
  train, world = synthetic_audio.build_records(c, return_world=True)
  held, held_world = synthetic_audio.build_records(
    tgdm_audio.heldout_config(c, seed=1, num_records=32), return_world=True
  )
  names, _, kind = synthetic_audio.load_waves(c.data, 16000)
  n = len(names)
  assert kind == ("speech" if SPEECH else "synthetic") and n >= 4
  # Utterances: the last 2 are held out, the training split never draws them.
  used_train = {int(r["utterance"]) for r in train}
  used_held = {int(r["utterance"]) for r in held}
  assert used_held == {n - 2, n - 1} and used_train <= set(range(n - 2)) and len(used_train) > 1
  # No held-out clip equals any training clip, nor any identity.
  train_clips = {r["mfcc"][t].tobytes() for r in train for t in range(4)}
  assert not any(r["mfcc"][t].tobytes() in train_clips for r in held for t in range(4))
  train_ids = {r["identity"].tobytes() for r in train}
  assert not any(r["identity"].tobytes() in train_ids for r in held)
  # The same world in both: hidden map, directions, embeddings, standardisation.
  for f in ("w_audio", "directions", "z_emo", "mfcc_mean", "mfcc_std"):
    np.testing.assert_array_equal(getattr(world, f), getattr(held_world, f))
  # Held-out targets = tanh(A W) + eta d_e + N(0, 0.05^2), written out.
  res = np.concatenate(
    [
      r["expression"]
      - (
        np.tanh(r["mfcc"].reshape(4, -1).astype(np.float64) @ world.w_audio)
        + float(r["intensity"]) * world.directions[int(r["emotion_index"])]
      )
      for r in held
    ]
  )
  assert 0.04 < res.std() < 0.06 and abs(res.mean()) < 0.01
  # MFCCs are standardised with the training utterances' statistics.
  raw, _ = synthetic_audio.load_utterances(c.data, synthetic_audio.audio.MFCCConfig(**c.audio))
  train_raw = np.concatenate(raw[: n - 2]).astype(np.float64)
  np.testing.assert_allclose(world.mfcc_mean, train_raw.mean(axis=(0, 1)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(world.mfcc_std, train_raw.std(axis=(0, 1)), rtol=1e-4)
  np.testing.assert_array_equal(synthetic_audio.load_world(c).mfcc_mean, world.mfcc_mean)
  with pytest.raises(ValueError, match="training seed"):
    tgdm_audio.heldout_config(c, seed=int(c.data.seed))
  with pytest.raises(ValueError, match="heldout_utterances"):
    synthetic_audio.split_utterances(8, 8, "train")


def test_consistency_check_names_the_mismatch():
  c = _config()
  assert tgdm_audio.check_consistent(c, bfm.synthetic_bfm(800, seed=0))["expression_dim"] == 64
  with pytest.raises(ValueError, match="not the TGDM set's"):
    tgdm_audio.check_consistent(c, bfm.synthetic_bfm(400, seed=0))


def test_audio_flags_are_checked_before_any_work(tmp_path):
  c = _config()
  tgdm_audio.check_inputs(c, emotion="sad", intensity=1.5, frames=4)
  bad_wav = tmp_path / "x.wav"
  bad_wav.write_bytes(b"not a wav")
  for kw, flag in (
    (dict(intensity=3.5), "--audio_intensity"),
    (dict(frames=0), "--audio_frames"),
    (dict(wav=str(tmp_path / "missing.wav")), "--audio_wav"),
    (dict(wav=str(bad_wav)), "x.wav"),
    (dict(emotion="nostalgic"), "--audio_emotion"),  # the random encoder knows labels only
  ):
    with pytest.raises((ValueError, OSError), match=flag):
      tgdm_audio.check_inputs(c, **kw)
  from configs import tgdm as tgdm_configs

  with pytest.raises(ValueError, match="--emoa2e_config"):
    tgdm_audio.check_inputs(tgdm_configs.get_config("tiny"))


def _oracle_i3d(config, params, x, t, cond):
  """eps whose x0 prediction is I_3d: deterministic DDIM then ends exactly on I_3d."""
  del config, params
  abar = make_schedule("linear", 1000).alphas_cumprod[t][:, None, None, None]
  return (x - jnp.sqrt(abar) * cond["i3d"]) / jnp.sqrt(1 - abar)


def _oracle_pipeline(size, emoa2e_config=None):
  return pipe_lib.TGDMPipeline(
    tgdm.TGDMConfig(mode="reenact", image_size=size),
    bfm.synthetic_bfm(800, seed=0),  # configs/tgdm.py:tiny's synthetic 3DMM model
    pipe_lib.Settings(method="ddim", num_steps=2, clip_sample=None),
    emoa2e_config=emoa2e_config,
    apply_fn=_oracle_i3d,
  )


def _source(size):
  x = synthetic_3dmm.group_coefficients(np.random.default_rng(5), 1)[0]
  return {"image": np.zeros((size, size, 3), np.float32), "coeffs": x}


def _check_frames(d, frames, size):
  """The PNG strip (I_3d row over the result row) and the GIF of a drive."""
  from PIL import Image

  strip = np.asarray(Image.open(d["png"]).convert("RGB"))
  assert strip.shape == (2 * (size + 2) - 2, frames * (size + 2) - 2, 3)
  i3d_row, result_row = strip[:size], strip[size + 2 :]
  # The oracle's result is I_3d itself.
  np.testing.assert_allclose(result_row.astype(int), i3d_row.astype(int), atol=1)
  assert np.mean(i3d_row.max(-1) > 0) > 0.1  # a face was rendered (I_3d is -1 off it)
  gif = Image.open(d["gif"])
  assert gif.n_frames == frames and gif.size == (2 * size, 2 * size)


def test_drive_from_a_heldout_wav(tmp_path):
  """A held-out utterance -> standardised MFCC clips of its loudest frames -> EmoA2E
  (initial params) -> the oracle TGDM: the frames' expressions are EmoA2E's on exactly
  those clips, with the emotion's embedding and eta, smoothed over the video window."""
  from facediff import audio
  from facediff.models import emoa2e
  from facediff.train import emoa2e_task

  c, frames, size = _config(), 4, 32
  _, world = synthetic_audio.build_records(c, return_world=True)
  names, waves, _ = synthetic_audio.load_waves(c.data, 16000)
  cfg = emoa2e_task.model_config(c)
  params = tgdm_audio.initial_params(c)
  d = tgdm_audio.drive(
    _oracle_pipeline(size, cfg),
    {},
    params,
    c,
    world,
    _source(size),
    waves[-2],
    jax.random.key(0),
    str(tmp_path),
    emotion="sad",
    intensity=2.5,
    frames=frames,
  )
  _check_frames(d, frames, size)
  raw = audio.audio_clips(waves[-2], audio.MFCCConfig(**c.audio))
  c0 = raw[:, raw.shape[1] // 2, 0]
  start = max(range(len(raw) - frames + 1), key=lambda s: c0[s : s + frames].sum())
  assert d["start_frame"] == start
  clips = (raw[start : start + frames] - world.mfcc_mean) / world.mfcc_std
  z = world.z_emo[world.emotions.index("sad")]
  want = emoa2e.apply(
    cfg,
    params,
    jnp.asarray(clips, jnp.float32)[None],
    jnp.asarray(_source(size)["coeffs"][:80])[None],
    emotion=jnp.asarray(z)[None],
    intensity=jnp.full((1,), 2.5),
  )[0]
  # Frame i is driven by the mean over the radius-1 window i-1 .. i+1 (TGDM 4.2, k = 1).
  want = np.stack([np.mean(want[max(0, i - 1) : i + 2], axis=0) for i in range(frames)])
  np.testing.assert_allclose(d["expression"], want, atol=1e-5)
  assert d["mouth_motion_px"] > 0 and d["intensity"] == 2.5


@pytest.mark.slow
def test_audio_stage_trains_scores_and_drives(tmp_path):
  """launch.tgdm_audio.run with 40 steps of a 1-layer EmoA2E (about 50 s of CPU):
  held-out LMD drops; the summary section has its fields; the drive writes F frames."""
  steps, frames, size = 40, 4, 32
  a = tgdm_audio.run(
    _config(steps, records=64),
    str(tmp_path),
    pipe=_oracle_pipeline(size),
    params={},
    source=_source(size),
    key=jax.random.key(0),
    out_dir=str(tmp_path),
    heldout_records=16,
  )
  print({k: (a["lmd"]["before"][k], a["lmd"]["after"][k]) for k in ("lmd", "lmd_mouth")})
  assert a["train"]["restored_step"] == steps
  assert a["lmd"]["after"]["lmd"] < a["lmd"]["before"]["lmd"] and a["lmd"]["improved"]
  assert a["consistency"] == dict(a["consistency"], expression_dim=64, identity_dim=80)
  h = a["heldout"]
  assert h["seed"] == 1 and h["records"] == 16 and len(h["utterances"]) == 2
  assert not set(h["utterances"]) & set(h["train_utterances"])
  for k in ("intensity", "compound"):
    assert set(a[k]) == {"before", "after"}
  assert len(a["intensity"]["after"]["projection"]) == 3
  d = a["drive"]
  assert d["frames"] == frames and d["emotion"] == "happy" and d["mouth_motion_px"] > 0
  names, _, _ = synthetic_audio.load_waves(_config().data, 16000)
  assert d["wav"] == names[-2]  # the first held-out utterance
  _check_frames(d, frames, size)
  assert any("## Audio" in line for line in tgdm_audio.markdown(a))
