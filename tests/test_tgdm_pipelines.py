"""TGDM inference pipelines (facediff.pipelines.tgdm) and the demo (launch.tgdm_demo).

The recombinations are checked with an oracle denoiser whose eps makes every x0
prediction 0.5 (I_3d + source) + 0.01 mean(rho) (+ identity terms for swap): a
deterministic DDIM trajectory then ends exactly there, so the output shows what the
pipeline handed to the model. The expected I_3d is the renderer run on coefficient
vectors recombined by hand (D3DFR slices written out below). With random real TGDM
params each pipeline is compared with facediff.diffusion.sample called on a condition
built by hand. (slow) The demo trains, samples and improves on held-out groups.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import synthetic_3dmm
from facediff.diffusion import make_schedule
from facediff.models import emoa2e, tgdm
from facediff.pipelines import tgdm as pipe_lib
from facediff.render import bfm, coeffs, renderer

SIZE = 16
# D3DFR layout (FACTS.md): id 80 | exp 64 | tex 80 | angle 3 | gamma 27 | trans 3.
ID, EXP, TEX = slice(0, 80), slice(80, 144), slice(144, 224)
ANGLE, GAMMA, TRANS = slice(224, 227), slice(227, 254), slice(254, 257)
SETTINGS = pipe_lib.Settings(method="ddim", num_steps=3, clip_sample=None)


@pytest.fixture(scope="module")
def morph():
  return bfm.synthetic_bfm(400, seed=0)


def _coeffs(seed, n):
  """(n, 257) coefficients: two identity groups' worth of draws, one per row."""
  rng = np.random.default_rng(seed)
  return np.concatenate([synthetic_3dmm.group_coefficients(rng, 1) for _ in range(n)])


def _images(seed, n):
  return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _render(morph, vec):
  """I_3d in [-1, 1] and mask of (B, 257) vectors, straight from the renderer."""
  out = renderer.render(morph, coeffs.split(jnp.asarray(vec)), image_size=SIZE, window=8)
  assert int(np.max(out.overflow)) == 0
  return np.clip(np.asarray(out.image), 0, 1) * 2 - 1, np.asarray(out.mask)


def _tgdm_rho(vec, gaze=None):
  """(B, 257) D3DFR -> (B, 261) TGDM: id, exp, tex, gamma, angle, trans, gaze."""
  gaze = np.zeros((vec.shape[0], 4), np.float32) if gaze is None else gaze
  parts = [vec[:, ID], vec[:, EXP], vec[:, TEX], vec[:, GAMMA], vec[:, ANGLE], vec[:, TRANS], gaze]
  return np.concatenate(parts, axis=1)


def _oracle_x0(cond):
  x0 = 0.5 * (cond["i3d"] + cond["source"])
  x0 = x0 + 0.01 * jnp.mean(cond["rho"], axis=-1)[:, None, None, None]
  if "id" in cond:  # swap: the model sees the masked target and the identity
    x0 = 0.5 * (cond["i3d"] + cond["source"] * (1 - cond["source_mask"]))
    x0 = x0 + 0.01 * jnp.mean(cond["rho"], -1)[:, None, None, None]
    x0 = x0 + 0.1 * jnp.mean(cond["id"], -1)[:, None, None, None]
  return x0


def oracle_apply(config, params, x, t, cond):
  """eps whose x0 prediction (x - sqrt(1 - abar) eps) / sqrt(abar) is _oracle_x0."""
  del config, params
  abar = make_schedule("linear", 1000).alphas_cumprod[t][:, None, None, None]
  return (x - jnp.sqrt(abar) * _oracle_x0(cond)) / jnp.sqrt(1 - abar)


def _oracle_expected(i3d, source, rho, mask=None, z_id=None):
  if z_id is None:
    return 0.5 * (i3d + source) + 0.01 * rho.mean(-1)[:, None, None, None]
  x0 = 0.5 * (i3d + source * (1 - mask)) + 0.01 * rho.mean(-1)[:, None, None, None]
  return x0 + 0.1 * z_id.mean(-1)[:, None, None, None]


def _tiny(mode="reenact"):
  """3 levels at 16 px (TexAtt at 1/2 and 1/4): the topology, small enough to compile fast."""
  return tgdm.TGDMConfig.tiny(
    mode=mode,
    image_size=SIZE,
    block_channels=(8, 8, 8),
    texatt_factors=(2, 4),
    norm_num_groups=4,
    cond_dim=16,
  )


# ---- recombination, with the oracle denoiser ----


def test_reenact_hands_the_recombined_render_to_the_model(morph):
  src, drv = _coeffs(0, 2), _coeffs(1, 2)
  source = _images(2, 2)
  p = pipe_lib.TGDMPipeline(_tiny(), morph, SETTINGS, apply_fn=oracle_apply)
  out = jax.device_get(p.reenact(None, source, src, drv, jax.random.key(0)))

  # rho_hat = {alpha_s, beta_d, delta_s, gamma_s, p_d} (TGDM 4.2), D3DFR slices by hand.
  rho = np.concatenate(
    [src[:, ID], drv[:, EXP], src[:, TEX], drv[:, ANGLE], src[:, GAMMA], drv[:, TRANS]], axis=1
  )
  i3d, mask = _render(morph, rho)
  assert (mask > 0).mean() > 0.2  # a face is on screen
  np.testing.assert_allclose(out.rho, _tgdm_rho(rho), atol=0)
  np.testing.assert_allclose(out.i3d, i3d, atol=1e-5)
  np.testing.assert_allclose(out.mask, mask, atol=1e-6)
  want = _oracle_expected(i3d, source, _tgdm_rho(rho))
  err = np.abs(out.image - np.clip(want, -1, 1)).max()
  assert err < 2e-4, err  # what the model received, through 3 DDIM steps
  # Training renders I_3d the same way.
  from facediff.train import tgdm_task

  train_i3d = tgdm_task.render_i3d(morph, coeffs.split(jnp.asarray(rho)), SIZE, 8)
  np.testing.assert_allclose(out.i3d, np.asarray(train_i3d), atol=1e-6)
  # The same shapes reuse the compiled program; a different step count compiles anew.
  n = pipe_lib._reenact_program._cache_size()
  p.reenact(None, source, src, drv, jax.random.key(1))
  assert pipe_lib._reenact_program._cache_size() == n
  p.reenact(None, source, src, drv, jax.random.key(1), num_steps=2)
  assert pipe_lib._reenact_program._cache_size() == n + 1
  with pytest.raises(ValueError, match="swap"):
    pipe_lib.TGDMPipeline(_tiny("swap"), morph).reenact(None, source, src, drv, jax.random.key(0))


def test_drive_video_renders_the_radius_one_window_with_edges(morph):
  group = _coeffs(3, 1)[0]
  drivers = np.stack([group] * 5).copy()
  rng = np.random.default_rng(4)
  drivers[:, EXP] = rng.normal(size=(5, 64)) * 0.7  # per frame motion
  drivers[:, ANGLE] = rng.normal(size=(5, 3)) * 0.15
  drivers[:, TRANS] = rng.normal(size=(5, 3)) * 0.05
  src = _coeffs(5, 1)[0]
  source = _images(6, 1)[0]
  p = pipe_lib.TGDMPipeline(_tiny(), morph, SETTINGS, apply_fn=oracle_apply)
  out = jax.device_get(p.drive_video(None, source, src, drivers, jax.random.key(0), radius=1))

  # Window of radius 1, written out: the edges average the two frames they have.
  win = {0: [0, 1], 1: [0, 1, 2], 2: [1, 2, 3], 3: [2, 3, 4], 4: [3, 4]}
  rho = np.stack([src] * 5).copy()
  for i, frames in win.items():
    for part in (EXP, ANGLE, TRANS):
      rho[i, part] = drivers[frames, part].mean(0)
  i3d, _ = _render(morph, rho)
  np.testing.assert_allclose(out.rho, _tgdm_rho(rho), atol=1e-6)
  np.testing.assert_allclose(out.i3d, i3d, atol=1e-5)
  want = _oracle_expected(i3d, np.stack([source] * 5), _tgdm_rho(rho))
  assert np.abs(out.image - np.clip(want, -1, 1)).max() < 2e-4
  # The edge frames differ from their unsmoothed drivers (the window is really applied).
  raw_first = np.concatenate([src[ID], drivers[0, EXP], src[TEX], drivers[0, ANGLE]])
  assert np.abs(raw_first - rho[0, :227]).max() > 0.1


def test_swap_takes_the_source_identity_and_masks_the_target(morph):
  src, tgt = _coeffs(7, 2), _coeffs(8, 2)
  source, target = _images(9, 2), _images(10, 2)
  z_id = src[:, ID]
  cfg = _tiny("swap").replace(id_dim=80)
  p = pipe_lib.TGDMPipeline(cfg, morph, SETTINGS, apply_fn=oracle_apply)
  out = jax.device_get(p.swap(None, source, src, target, tgt, z_id, jax.random.key(0)))

  rho = tgt.copy()
  rho[:, ID] = src[:, ID]  # TGDM 4.4: identity from the source, the rest from the target
  i3d, _ = _render(morph, rho)
  _, target_mask = _render(morph, tgt)  # the default mask: the target's rendered face
  np.testing.assert_allclose(out.rho, _tgdm_rho(rho), atol=0)
  np.testing.assert_allclose(out.i3d, i3d, atol=1e-5)
  want = _oracle_expected(i3d, target, _tgdm_rho(rho), target_mask, z_id)
  assert np.abs(out.image - np.clip(want, -1, 1)).max() < 2e-4
  # An explicit mask (the dataset's "Small" mask) is what the model sees instead.
  mask = np.zeros((2, SIZE, SIZE, 1), np.float32)
  mask[:, 4:12, 4:12] = 1
  out2 = jax.device_get(
    p.swap(None, source, src, target, tgt, z_id, jax.random.key(0), target_mask=mask)
  )
  want2 = _oracle_expected(i3d, target, _tgdm_rho(rho), mask, z_id)
  assert np.abs(out2.image - np.clip(want2, -1, 1)).max() < 2e-4


def _a2e_config():
  return emoa2e.EmoA2EConfig(
    clip_frames=4, n_mfcc=5, text_dim=6, hidden=8, num_layers=1, num_heads=2, mlp_dim=8
  )


# ---- random real params: two DDIM steps written out around the real denoiser ----


def _random_params(cfg, seed):
  """Random params of the right shapes (compiling ``init_params`` costs seconds), TexAtt's
  tau non-zero so that the source image matters."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda a: (rng.normal(size=a.shape) * 0.2).astype(np.float32),
    nn.unbox(tgdm.abstract_params(cfg)),
  )


def _two_ddim_steps(eps_fn, x_T):
  """DDIM (eta 0, leading spacing) with 2 of T = 1000 steps: t = 500 then t = 0, x0
  clipped to [-1, 1] at each step, alpha_bar = 1 after the last (Song et al. Eq. 12)."""
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  x = np.asarray(x_T, np.float64)
  for t, prev in ((500, abar[0]), (0, 1.0)):
    eps = np.asarray(eps_fn(x.astype(np.float32), t), np.float64)
    x0 = np.clip((x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t]), -1, 1)
    x = np.sqrt(prev) * x0 + np.sqrt(1 - prev) * eps
  return np.clip(x, -1, 1)


def test_every_pipeline_runs_the_real_denoiser_with_random_params(morph):
  rcfg = _tiny()
  scfg = _tiny("swap").replace(id_dim=80)
  rparams, sparams = _random_params(rcfg, 0), _random_params(scfg, 1)
  settings = pipe_lib.Settings(method="ddim", num_steps=2)
  a2e = _a2e_config()
  rng = np.random.default_rng(2)
  a2e_params = jax.tree.map(
    lambda a: (rng.normal(size=a.shape) * 0.3).astype(np.float32),
    nn.unbox(emoa2e.abstract_params(a2e)),
  )
  rp = pipe_lib.TGDMPipeline(rcfg, morph, settings, emoa2e_config=a2e)
  sp = pipe_lib.TGDMPipeline(scfg, morph, settings)
  src, drv = _coeffs(14, 3), _coeffs(15, 3)
  images = _images(16, 3)
  key = jax.random.key(3)
  k_noise, _ = jax.random.split(key)
  apply_r = jax.jit(lambda x, t, c: tgdm.apply(rcfg, rparams, x, jnp.full((3,), t), c))
  apply_s = jax.jit(lambda x, t, c: tgdm.apply(scfg, sparams, x, jnp.full((3,), t), c))

  def check(out, apply, cond, x_T):
    i3d, _ = _render(morph, cond.pop("vec"))
    np.testing.assert_allclose(out.i3d, i3d, atol=1e-5)
    want = _two_ddim_steps(lambda x, t: apply(x, t, dict(cond, i3d=i3d)), x_T)
    err = np.abs(np.asarray(out.image) - want).max()
    assert err < 1e-4 and np.std(want) > 0.05, (err, np.std(want))
    return err

  # Reenact: x_T = normal(split(key)[0]) of the batch's shape.
  out = rp.reenact(rparams, images, src, drv, key)
  rho = np.concatenate(
    [src[:, ID], drv[:, EXP], src[:, TEX], drv[:, ANGLE], src[:, GAMMA], drv[:, TRANS]], axis=1
  )
  x_T = jax.random.normal(k_noise, images.shape)
  cond = {"source": images, "rho": _tgdm_rho(rho), "vec": rho}
  errs = [check(out, apply_r, cond, x_T)]

  # Video: one x_T (of one frame) shared by the frames; window of radius 1.
  vid = rp.drive_video(rparams, images[0], src[0], drv, key)
  rho = np.stack([src[0]] * 3).copy()
  for i, frames in {0: [0, 1], 1: [0, 1, 2], 2: [1, 2]}.items():
    for part in (EXP, ANGLE, TRANS):
      rho[i, part] = drv[frames, part].mean(0)
  shared = jnp.broadcast_to(jax.random.normal(k_noise, images[0].shape), images.shape)
  cond = {"source": np.stack([images[0]] * 3), "rho": _tgdm_rho(rho), "vec": rho}
  errs.append(check(vid, apply_r, cond, shared))
  assert np.abs(np.asarray(vid.image[0] - vid.image[1])).max() > 1e-3

  # Audio: EmoA2E's expressions (Eq. 9-11: emotion embedding, intensity 2.5), pose and
  # gaze from a driver sequence.
  mfcc = rng.normal(size=(3, 4, 5)).astype(np.float32)
  emotion = rng.normal(size=(6,)).astype(np.float32)
  aud = rp.drive_audio(
    rparams,
    a2e_params,
    images[0],
    src[0],
    mfcc,
    key,
    emotion=emotion,
    intensity=2.5,
    driver_pose=drv,
  )
  eta = np.array([2.5], np.float32)
  beta = np.asarray(emoa2e.apply(a2e, a2e_params, mfcc[None], src[:1, ID], emotion[None], eta))
  beta = beta[0]
  assert np.ptp(beta, axis=0).max() > 0.01  # the expression moves over the frames
  rho = np.stack([src[0]] * 3).copy()
  for i, frames in {0: [0, 1], 1: [0, 1, 2], 2: [1, 2]}.items():
    rho[i, EXP] = beta[frames].mean(0)
    rho[i, ANGLE] = drv[frames, ANGLE].mean(0)
    rho[i, TRANS] = drv[frames, TRANS].mean(0)
  np.testing.assert_allclose(aud.expression, rho[:, EXP], atol=1e-5)
  cond = {"source": np.stack([images[0]] * 3), "rho": _tgdm_rho(rho), "vec": rho}
  errs.append(check(aud, apply_r, cond, shared))

  # Swap: the target masked by its rendered face, the source's identity embedding.
  tgt, z_id = _coeffs(17, 3), src[:, ID]
  sw = sp.swap(sparams, images, src, images[::-1], tgt, z_id, key)
  rho = tgt.copy()
  rho[:, ID] = src[:, ID]
  _, mask = _render(morph, tgt)
  cond = {"source": images[::-1], "source_mask": mask, "id": z_id}
  cond.update(rho=_tgdm_rho(rho), vec=rho)
  errs.append(check(sw, apply_s, cond, x_T))
  print("max abs errors reenact/video/audio/swap:", errs)


# ---- the demo ----


def _demo_config(variant, steps):
  from configs import tgdm as tgdm_configs

  c = tgdm_configs.get_config(variant)
  c.synthetic_3dmm.update(dict(num_groups=4, per_group=3, image_size=32))
  c.data.image_size = 32
  c.data.global_batch_size = 8  # one example per virtual device (data=8 mesh)
  c.model.sample_steps = 4
  c.optim.update(dict(lr=1e-3, warmup_steps=0))
  c.ema.decay = 0.0
  c.train.update(dict(num_steps=steps, checkpoint_every=steps, sample_every=0, log_every=5))
  c.train.async_checkpointing = False
  return c


def _emoa2e_config():
  """configs/emoa2e.py:tiny as the demo runs it (1000 steps, the real MiniLM)."""
  from configs import emoa2e as emoa2e_configs

  c = emoa2e_configs.get_config("tiny")
  c.train.async_checkpointing = False
  return c


@pytest.mark.slow
def test_demo_trains_improves_and_writes_its_outputs(tmp_path):
  """launch.tgdm_demo at 32 px with 30 training steps per model: held-out reenactment
  and swap get closer to the exact answer on the face than with the initial params.
  The audio stage (the tiny EmoA2E as configured): held-out LMD drops, eta moves the
  prediction along the emotion's direction, the compound emotion lands nearest the
  mixed truth, and the trained reenact model is driven by a held-out WAV."""
  from PIL import Image

  from launch import tgdm_demo

  summary = tgdm_demo.run(
    _demo_config("tiny", 30),
    str(tmp_path),
    _demo_config("tiny_swap", 30),
    heldout_groups=3,
    video_frames=4,
    emoa2e_config=_emoa2e_config(),
  )
  for task in ("reenact", "swap"):
    r = summary[task]
    assert r["train"]["restored_step"] == 30
    assert r["after"]["psnr"] > r["before"]["psnr"], (task, r["before"], r["after"])
    assert r["after"]["mse"] < r["before"]["mse"] and r["improved"]
    g = np.asarray(Image.open(r["grid"]))
    assert g.shape == (3 * 34 - 2, 5 * 34 - 2, 3)
  print(
    {t: (summary[t]["before"]["psnr"], summary[t]["after"]["psnr"]) for t in ("reenact", "swap")}
  )
  gif = Image.open(summary["video"]["gif"])
  assert gif.n_frames == 4
  assert json.load(open(tmp_path / "summary.json"))["reenact"]["improved"]
  assert "| reenact |" in open(tmp_path / "summary.md").read()
  a = summary["audio"]
  print({k: a[k] for k in ("lmd", "intensity", "compound", "seconds")})
  assert a["train"]["restored_step"] == 1000 and a["heldout"]["audio"] == "speech"
  assert a["lmd"]["after"]["lmd"] < a["lmd"]["before"]["lmd"] and a["lmd"]["improved"]
  it = a["intensity"]["after"]
  assert it["toward_emotion"] and not a["intensity"]["before"]["toward_emotion"]
  assert 0.5 < it["projection"][1] < 1.5 and 1.0 < it["projection"][2] < 3.0
  assert a["compound"]["after"]["closest_to_mix"] and 0 < a["compound"]["after"]["blend"] < 1
  d = a["drive"]
  assert d["frames"] == 8 and os.path.dirname(d["gif"]) == os.path.dirname(summary["video"]["gif"])
  assert Image.open(d["gif"]).n_frames == 8
  assert np.asarray(Image.open(d["png"])).shape == (2 * 34 - 2, 8 * 34 - 2, 3)
  assert json.load(open(tmp_path / "summary.json"))["audio"]["lmd"]["improved"]
  assert "## Audio" in open(tmp_path / "summary.md").read()
  # A second start resumes: nothing left to train, the same scores.
  again = tgdm_demo.run(
    _demo_config("tiny", 30),
    str(tmp_path),
    None,
    heldout_groups=3,
    video_frames=4,
    emoa2e_config=_emoa2e_config(),
  )
  assert again["reenact"]["train"]["start_step"] == 30
  np.testing.assert_allclose(again["reenact"]["after"]["psnr"], summary["reenact"]["after"]["psnr"])
  assert again["audio"]["train"]["start_step"] == 1000
  np.testing.assert_allclose(again["audio"]["lmd"]["after"]["lmd"], a["lmd"]["after"]["lmd"])
