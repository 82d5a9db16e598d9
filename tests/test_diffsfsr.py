"""DiffSFSR: the conditioned denoiser, the loss of Eq. 3-7, the task on the trainer,
and launch.train end to end (with resume) on a small synthetic dataset."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import diffsfsr as diffsfsr_config
from data_pipelines import fake_shards
from facediff.diffusion import improved_midpoint_x0, make_schedule
from facediff.losses import diffsfsr as loss_lib
from facediff.models import diffsfsr
from facediff.models import unet as unet_model
from facediff.train import diffsfsr_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg():
  c = diffsfsr_config.get_config("tiny")
  c.data.image_size = 16
  return c


def _batch(b=2, s=16, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, s, s, 1), np.float32)
  mask[:, 4:12, 4:12] = 1
  return {
    "bkg_image": jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32),
    "bkg_mask": jnp.asarray(mask),
    "id": {"id_dlib": jnp.asarray(rng.normal(size=(b, 128)), jnp.float32)},
    "exp": jnp.asarray(rng.normal(size=(b, 7)), jnp.float32),
  }


def test_zero_new_input_channels_reproduce_the_source_unet():
  cfg = diffsfsr_task.model_config(_cfg())
  src_cfg = cfg.unet.replace(in_channels=3)
  src = unet_model.init_params(src_cfg, jax.random.key(1))
  _, widened = unet_model_widen(src, src_cfg, cfg.unet.in_channels)
  params = jax.tree.map(np.asarray, jax.device_get(diffsfsr.init_params(cfg, jax.random.key(2))))
  import flax.linen as nn

  params = dict(nn.unbox(params))
  params["unet"] = widened
  batch = _batch()
  cond = diffsfsr_task.batch_condition(batch, ["id_dlib"])
  z = batch["bkg_image"]
  t = jnp.array([10, 500])
  got = diffsfsr.apply(cfg, params, z, t, cond)
  ctx = diffsfsr.DiffSFSRDenoiser(cfg).apply({"params": params}, cond, method="context")
  want = unet_model.UNet2DConditionModel(src_cfg).apply({"params": nn.unbox(src)}, z, t, ctx)
  # Zero kernel slots add exact zeros, but the wider conv sums in another order: ~1e-6.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def unet_model_widen(params, config, channels):
  from facediff.convert.unet import widen_conv_in

  return widen_conv_in(params, config, channels)


def _eps_fn():
  w = jnp.linspace(0.5, 1.5, 3)

  def eps_fn(z, t, cond):
    return jnp.tanh(z * w + cond["scale"][:, None, None, None] * t[:, None, None, None] / 1000.0)

  return eps_fn


def test_loss_with_zero_lambdas_equals_ldm_only_and_estimator_is_improved_midpoint():
  sched = make_schedule("linear")
  z0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  cond = {"scale": jnp.array([0.3, -0.2])}
  rng = jax.random.key(5)
  eps_fn = _eps_fn()
  l_none, m_none = loss_lib.diffsfsr_loss(eps_fn, sched, z0, cond, rng, estimator="none")
  l_zero, _ = loss_lib.diffsfsr_loss(
    eps_fn, sched, z0, cond, rng, estimator="improved_midpoint", lambda_id=0.0, lambda_exp=0.0
  )
  assert float(l_none) == float(l_zero) == float(m_none["l_dm"])

  # With both terms on, the image the encoders see is improved_midpoint_x0's z0*, and
  # L_DM uses its first call's eps (Eq. 3 written out here).
  seen = {}

  def identity_fn(image):
    seen["image"] = image
    return [image.reshape(image.shape[0], -1)]

  target = [jnp.ones((2, 48))]
  total, metrics = loss_lib.diffsfsr_loss(
    eps_fn,
    sched,
    z0,
    cond,
    rng,
    estimator="improved_midpoint",
    lambda_id=0.003,
    lambda_exp=0.01,
    identity_fn=identity_fn,
    expression_fn=lambda img: img.mean(axis=(1, 2)),
    target_id=target,
    target_exp=jnp.zeros((2, 3)),
  )
  key_t, key_noise = jax.random.split(rng)
  t = jax.random.randint(key_t, (2,), 0, 1000, jnp.int32)
  noise = jax.random.normal(key_noise, z0.shape)
  ab = sched.alphas_cumprod[t][:, None, None, None]
  z_t = jnp.sqrt(ab) * z0 + jnp.sqrt(1 - ab) * noise
  est = improved_midpoint_x0(eps_fn, sched, z_t, t, cond)
  np.testing.assert_allclose(np.asarray(seen["image"]), np.asarray(est.x0), rtol=1e-6, atol=1e-6)
  l_dm = jnp.mean((est.eps - noise) ** 2)
  g = est.x0.reshape(2, -1)
  cos = jnp.sum(g, -1) / (jnp.linalg.norm(g, axis=-1) * jnp.sqrt(48.0))
  l_id = jnp.mean(1 - cos)
  l_exp = jnp.mean(est.x0.mean(axis=(1, 2)) ** 2)
  np.testing.assert_allclose(float(metrics["l_dm"]), float(l_dm), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["l_id"]), float(l_id), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["l_exp"]), float(l_exp), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(l_dm + 0.003 * l_id + 0.01 * l_exp), rtol=1e-6)
  with pytest.raises(ValueError, match="estimator"):
    loss_lib.diffsfsr_loss(eps_fn, sched, z0, cond, rng, estimator="two_step")


def test_task_step_gradients_reach_the_condition_mlps():
  config = _cfg()
  task = diffsfsr_task.make_task(config)
  import flax.linen as nn

  params = nn.unbox(task.init(jax.random.key(0)))
  grads = jax.grad(lambda p: task.loss_fn(p, None, _batch(), jax.random.key(1), {})[0])(params)
  for name in ("id_mlp_0", "exp_mlp", "unet"):
    norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads[name]))
    assert np.isfinite(norm) and norm > 0, name


def test_config_mismatch_is_named():
  config = _cfg()
  config.data.id_dims = [128, 512]
  with pytest.raises(ValueError, match="id_dims"):
    diffsfsr_task.make_task(config)


@pytest.mark.slow  # two subprocess runs with compilation; run with -m slow
def test_launch_train_trains_and_resumes(tmp_path):
  data = tmp_path / "data"
  fake_shards.write_dataset(str(data), 32, image_size=16, latent_shape=None)
  work = tmp_path / "work"
  common = [
    sys.executable,
    "-m",
    "launch.train",
    "--config",
    os.path.join(ROOT, "configs", "diffsfsr.py") + ":tiny",
    f"--workdir={work}",
    f"--config.data.path={data}",
    "--config.data.image_size=16",
    "--config.train.checkpoint_every=2",
    "--config.train.sample_every=2",
    "--config.train.log_every=1",
    "--config.model.sample_steps=2",
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  first = subprocess.run(
    common + ["--config.train.num_steps=2"], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert first.returncode == 0, first.stderr[-3000:]
  summary = json.loads(first.stdout.strip().splitlines()[-1])
  assert summary["step"] == 2 and summary["mesh"] == {"data": 2, "fsdp": 1}
  saved = json.load(open(work / "config.json"))
  assert saved["data"]["path"] == str(data) and saved["train"]["num_steps"] == 2
  second = subprocess.run(
    common + ["--config.train.num_steps=4"], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert second.returncode == 0, second.stderr[-3000:]
  summary = json.loads(second.stdout.strip().splitlines()[-1])
  assert summary["start_step"] == 2 and summary["step"] == 4
  assert os.path.exists(work / "samples" / "samples_0000004.png")
  losses = [json.loads(x) for x in open(work / "metrics.jsonl") if '"l_dm"' in x]
  assert [x["step"] for x in losses] == [1, 2, 3, 4]
