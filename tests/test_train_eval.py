"""The trainer's periodic evaluation (``task.eval_fn`` every ``train.eval_every`` steps):
the logged eval metrics are those of the checkpoint saved at the same step, recomputed
independently (scikit-image's PSNR / SSIM, numpy cosines), and ``keep_best_metric``
ranks the checkpoints by them."""

import json
import os

import _toy_task as toy
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from facediff import partitioning
from facediff.train import checkpoint as ckpt_lib
from facediff.train import evaluator, loop
from facediff.train import state as state_lib


def _eval_rows(workdir) -> dict[int, dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r for r in rows if any(k.startswith("eval/") for k in r)}


def _restore(task, config, workdir, step):
  """The train state of checkpoint ``step`` (any kept step, not only the newest)."""
  mesh = partitioning.make_mesh(dict(config.mesh))
  with partitioning.activation_rules(mesh):
    abstract, _, _ = state_lib.abstract_state(task, config, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.train)
    out = ck.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract.as_dict()))
    )
    ck.close()
  return state_lib.TrainState.from_dict(dict(out["state"]))


def _skimage_psnr(images, targets) -> float:
  """Mean PSNR over the images, scikit-image's on [-1, 1] (data range 2)."""
  return float(
    np.mean(
      [
        peak_signal_noise_ratio(np.asarray(t, np.float64), np.asarray(x, np.float64), data_range=2)
        for x, t in zip(images, targets, strict=True)
      ]
    )
  )


def test_toy_eval_metrics_at_eval_steps_equal_the_restored_checkpoints_and_rank_them(tmp_path):
  # keep_best_mode="min" keeps the *lowest*-PSNR checkpoint (and the newest, to resume
  # from): training raises PSNR, so "the best one" is not the newest and the test tells
  # them apart from "the newest two".
  cfg = toy.make_config(
    num_steps=6,
    eval_every=2,
    checkpoint_every=2,
    keep_checkpoints=1,
    keep_best_metric="psnr",
    keep_best_mode="min",
    sample_every=0,
    async_checkpointing=False,
  )
  task, batch = toy.make_task(), toy.fixed_batch()
  loop.train_and_evaluate(cfg, str(tmp_path), task, toy.make_iterator(cfg), eval_batch=batch)
  rows = _eval_rows(tmp_path)
  assert sorted(rows) == [2, 4, 6]
  assert set(rows[2]) == {"step", "eval/psnr", "eval/mse"}

  psnr = {s: rows[s]["eval/psnr"] for s in rows}
  ck = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), cfg.train)
  kept = ck.steps()
  ck.close()
  assert kept == sorted({min(psnr, key=psnr.get), 6}), (kept, psnr)
  assert psnr[6] > psnr[4] > psnr[2]  # it learns: the best by "min" is the oldest

  for step in kept:
    state = _restore(task, cfg, tmp_path, step)
    params = jax.device_get(evaluator.eval_params(state))  # the EMA params
    images, targets = toy.eval_images(toy.MLP(), params, batch, evaluator.eval_key(cfg))
    want = _skimage_psnr(np.asarray(images), np.asarray(targets))
    np.testing.assert_allclose(psnr[step], want, rtol=1e-5)
    mse = np.mean((np.asarray(images) / 2 - np.asarray(targets) / 2) ** 2)
    np.testing.assert_allclose(rows[step]["eval/mse"], mse, rtol=1e-5)


def test_toy_no_eval_without_eval_every_and_unknown_best_metric_is_named(tmp_path):
  cfg = toy.make_config(num_steps=2, checkpoint_every=0, sample_every=0)
  loop.train_and_evaluate(cfg, str(tmp_path / "a"), toy.make_task(), toy.make_iterator(cfg))
  assert _eval_rows(tmp_path / "a") == {}  # eval_every = 0: no evaluation, not even last

  cfg = toy.make_config(num_steps=2, sample_every=0, keep_best_metric="psnr")
  with pytest.raises(ValueError, match="keep_best_metric='psnr' needs config.train.eval_every"):
    loop.train_and_evaluate(cfg, str(tmp_path / "b"), toy.make_task(), toy.make_iterator(cfg))
  cfg = toy.make_config(num_steps=2, sample_every=0, eval_every=1, keep_best_metric="fid")
  with pytest.raises(ValueError, match="keep_best_metric='fid' is not an eval metric.*mse, psnr"):
    loop.train_and_evaluate(cfg, str(tmp_path / "c"), toy.make_task(), toy.make_iterator(cfg))


# ---- DiffSFSR: the task's eval_fn against its metrics written out ----


def _ssim_skimage(images, targets) -> float:
  """Mean SSIM, scikit-image's with Wang et al.'s Gaussian window on [0, 1] images."""
  return float(
    np.mean(
      [
        structural_similarity(
          (np.asarray(t, np.float64) + 1) / 2,
          (np.asarray(x, np.float64) + 1) / 2,
          gaussian_weights=True,
          sigma=1.5,
          use_sample_covariance=False,
          data_range=1.0,
          channel_axis=-1,
        )
        for x, t in zip(images, targets, strict=True)
      ]
    )
  )


def _cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _diffsfsr_config(size=16):
  from configs import diffsfsr as diffsfsr_config

  c = diffsfsr_config.get_config("tiny")
  c.data.image_size = size
  c.model.eval_sample_steps = 2
  c.model.eval_timesteps = [100, 900]
  return c


def _diffsfsr_batch(config, b=2, seed=0):
  """Random images, a centred face mask, random stored embeddings and face-centred
  encoder crops (image pixels -> crop pixels)."""
  import jax.numpy as jnp

  rng = np.random.default_rng(seed)
  s = int(config.data.image_size)
  mask = np.zeros((b, s, s, 1), np.float32)
  mask[:, s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1
  crops = {}
  for kind, side in (("dlib150", 150), ("fer64", 64)):
    m = np.zeros((b, 2, 3), np.float32)
    m[:, 0, 0] = m[:, 1, 1] = side / (0.6 * s)
    m[:, :, 2] = side / 2 - side / (0.6 * s) * s / 2
    crops[kind] = jnp.asarray(m)
  d = config.data
  return {
    "bkg_image": jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32),
    "bkg_mask": jnp.asarray(mask),
    "id": {
      f: jnp.asarray(rng.normal(size=(b, n)), jnp.float32)
      for f, n in zip(d.id_fields, d.id_dims, strict=True)
    },
    "exp": jnp.asarray(rng.uniform(0, 1, (b, d.exp_dim)), jnp.float32),
    "crops": crops,
  }


@pytest.mark.slow  # compiles the sampler, the UNet and the dlib / fer encoders: ~1-2 min
def test_diffsfsr_eval_fn_equals_its_metrics_written_out():
  import flax.linen as nn
  import jax.numpy as jnp

  from facediff.losses import face_encoders
  from facediff.models import diffsfsr
  from facediff.train import diffsfsr_task

  config = _diffsfsr_config()
  model = diffsfsr_task.DiffSFSR(config)
  params = jax.jit(lambda k: nn.unbox(diffsfsr.init_params(model.cfg, k)))(jax.random.key(3))
  frozen, batch, key = model.frozen, _diffsfsr_batch(config), jax.random.key(7)
  got = jax.device_get(jax.jit(model.evaluate)(params, frozen, batch, key))
  assert set(got) == {
    "ldm_t100",
    "ldm_t900",
    "ldm",
    "mse",
    "psnr",
    "ssim",
    "id_cos_id_dlib",
    "id_cos",
    "exp_err",
  }

  # L_DM at fixed (t, noise), the forward process written out with the linear betas.
  k_noise, k_sample = jax.random.split(key)
  noise = np.asarray(jax.random.normal(k_noise, (2, 16, 16, 3), jnp.float32))
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
  cond = model.condition(frozen, batch)
  x0 = np.asarray(batch["bkg_image"], np.float64)
  for t in (100, 900):
    z_t = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * noise
    eps = model.eps(params, jnp.asarray(z_t, jnp.float32), jnp.full((2,), t), cond)
    np.testing.assert_allclose(got[f"ldm_t{t}"], np.mean((np.asarray(eps) - noise) ** 2), rtol=1e-4)
  np.testing.assert_allclose(got["ldm"], (got["ldm_t100"] + got["ldm_t900"]) / 2, rtol=1e-6)

  # The sampled self-reconstructions: scikit-image's PSNR / SSIM, numpy's cosine and
  # distance of the in-graph encoders' embeddings to the stored ones.
  images = jax.jit(lambda p, k: model.sample(p, frozen, batch, k, method="ddim", num_steps=2))(
    params, k_sample
  )
  target = np.asarray(batch["bkg_image"])
  np.testing.assert_allclose(got["psnr"], _skimage_psnr(np.asarray(images), target), rtol=1e-4)
  np.testing.assert_allclose(got["ssim"], _ssim_skimage(np.asarray(images), target), atol=1e-4)
  np.testing.assert_allclose(
    got["mse"], np.mean(((np.asarray(images) - target) / 2) ** 2), rtol=1e-4
  )
  crops = batch["crops"]
  e_id = face_encoders.embed(model.encoders["id_dlib"], frozen["enc"]["id_dlib"], images, crops)
  e_exp = face_encoders.embed(model.encoders["exp_fer"], frozen["enc"]["exp_fer"], images, crops)
  want_cos = np.mean(_cos(e_id, batch["id"]["id_dlib"]))
  np.testing.assert_allclose(got["id_cos_id_dlib"], want_cos, rtol=1e-4)
  assert got["id_cos"] == got["id_cos_id_dlib"]
  want_exp = np.mean(np.linalg.norm(np.asarray(e_exp) - np.asarray(batch["exp"]), axis=-1))
  np.testing.assert_allclose(got["exp_err"], want_exp, rtol=1e-4)


# ---- end to end through launch.runner: the fixed batch, logged and recomputed ----


def _recompute_image_metrics(images, target) -> dict[str, float]:
  images, target = np.asarray(images), np.asarray(target)
  return {"psnr": _skimage_psnr(images, target), "ssim": _ssim_skimage(images, target)}


@pytest.mark.slow  # trains 2 compiled DiffSFSR steps on 8 CPU devices: minutes
def test_diffsfsr_runner_evaluates_the_heldout_batch_and_keeps_the_best(tmp_path):
  from data_pipelines import fake_shards, loaders
  from facediff.train import diffsfsr_task
  from launch import runner

  train, heldout = tmp_path / "train", tmp_path / "heldout"
  kinds = ("dlib150", "fer64")
  fake_shards.write_dataset(str(train), 16, image_size=16, latent_shape=None, crop_kinds=kinds)
  fake_shards.write_dataset(
    str(heldout), 8, image_size=16, latent_shape=None, crop_kinds=kinds, image="photo"
  )
  config = _diffsfsr_config()
  config.data.update(path=str(train), eval_path=str(heldout), global_batch_size=8)
  config.model.lambda_id = config.model.lambda_exp = 0.0  # L_DM only: a cheap step
  config.train.update(
    num_steps=2,
    eval_every=1,
    checkpoint_every=1,
    keep_checkpoints=1,
    keep_best_metric="psnr",
    keep_best_mode="max",
    sample_every=0,
    log_every=1,
    async_checkpointing=False,
  )
  work = tmp_path / "work"
  runner.run(config, str(work))
  rows = _eval_rows(work)
  assert sorted(rows) == [1, 2]
  assert {"eval/ldm", "eval/ldm_t100", "eval/psnr", "eval/ssim", "eval/mse"} <= set(rows[1])

  model = diffsfsr_task.DiffSFSR(config)
  task = model.task()
  eval_batch = runner.build_eval_batch(config, partitioning.make_mesh(dict(config.mesh)))
  # The first batch of the held-out set (the real photos, not the flat training colours).
  held = next(loaders.make_train_iterator(_with_path(config, str(heldout))))  # on the host
  np.testing.assert_allclose(np.asarray(eval_batch["bkg_image"]), held["bkg_image"], atol=1e-6)
  held = jax.device_get(eval_batch)
  best = max(rows, key=lambda s: rows[s]["eval/psnr"])
  ck = ckpt_lib.Checkpointer(os.path.join(work, "checkpoints"), config.train)
  assert ck.steps() == sorted({best, 2})
  ck.close()
  _, k_sample = jax.random.split(evaluator.eval_key(config))
  for step in sorted({best, 2}):
    params = evaluator.eval_params(_restore(task, config, work, step))
    images = jax.jit(lambda p: model.sample(p, None, held, k_sample, method="ddim", num_steps=2))(
      params
    )
    want = _recompute_image_metrics(images, held["bkg_image"])
    np.testing.assert_allclose(rows[step]["eval/psnr"], want["psnr"], rtol=1e-4)
    np.testing.assert_allclose(rows[step]["eval/ssim"], want["ssim"], atol=1e-4)


def _with_path(config, path):
  c = config.copy_and_resolve_references()
  c.data.path = path
  return c


@pytest.mark.slow  # trains 2 compiled TGDM steps on 8 CPU devices: minutes
def test_tgdm_runner_evaluates_reenactments_against_the_targets(tmp_path):
  import jax.numpy as jnp

  from configs import tgdm as tgdm_configs
  from data_pipelines import loaders
  from facediff import metrics
  from facediff.diffusion import make_schedule, sample
  from facediff.models import tgdm
  from facediff.train import tgdm_task
  from launch import runner

  config = tgdm_configs.get_config("tiny")
  config.synthetic_3dmm.update(num_groups=4, per_group=2)  # built into work/data
  config.data.update(global_batch_size=8, read_threads=1)
  config.model.update(eval_sample_steps=2)
  config.train.update(
    num_steps=2,
    eval_every=2,
    checkpoint_every=2,
    keep_best_metric="lpips",
    sample_every=0,
    log_every=1,
    async_checkpointing=False,
  )
  work = tmp_path / "work"
  runner.run(config, str(work))
  rows = _eval_rows(work)
  assert sorted(rows) == [2]
  assert set(rows[2]) == {"step", "eval/mse", "eval/psnr", "eval/ssim", "eval/lpips"}

  task = tgdm_task.make_task(config)
  batch = next(loaders.make_train_iterator(config))  # eval_path "": the training set's first
  params = evaluator.eval_params(_restore(task, config, work, 2))
  cfg = tgdm_task.model_config(config)

  def reenact(p, key):
    target, cond = tgdm_task.make_condition(config, cfg, task.frozen["bfm"], batch)
    k_noise, k_steps = jax.random.split(key)
    x = sample(
      lambda x, t, c: tgdm.apply(cfg, p, x, t, c),
      make_schedule("linear", 1000),
      jax.random.normal(k_noise, target.shape),
      method="ddim",
      num_steps=2,
      key=k_steps,
      cond=cond,
    )
    return jnp.clip(x, -1, 1)

  images = np.asarray(jax.jit(reenact)(params, evaluator.eval_key(config)))
  want = _recompute_image_metrics(images, batch["bkg_image"])
  np.testing.assert_allclose(rows[2]["eval/psnr"], want["psnr"], rtol=1e-4)
  np.testing.assert_allclose(rows[2]["eval/ssim"], want["ssim"], atol=1e-4)
  lp = metrics.lpips(task.frozen["lpips"], images, np.asarray(batch["bkg_image"]))
  np.testing.assert_allclose(rows[2]["eval/lpips"], float(np.mean(lp)), rtol=1e-4)
