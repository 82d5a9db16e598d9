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


def _cfg(variant="tiny", size=16):
  c = diffsfsr_config.get_config(variant)
  c.data.image_size = size
  return c


CROP_SIDES = {"dlib150": 150, "fer64": 64, "arcface112": 112, "facenet160": 160}


def _crops(kinds, b, s, rng):
  """A face-centred similarity per crop kind (image pixels -> crop pixels)."""
  out = {}
  for kind in kinds:
    side = CROP_SIDES[kind]
    scale = side / (0.6 * s) * rng.uniform(0.95, 1.05, b)
    m = np.zeros((b, 2, 3), np.float32)
    m[:, 0, 0] = m[:, 1, 1] = scale
    m[:, :, 2] = (side / 2 - scale * s / 2)[:, None]
    out[kind] = jnp.asarray(m)
  return out


def _batch(b=2, s=16, seed=0, config=None):
  config = config or _cfg(size=s)
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, s, s, 1), np.float32)
  mask[:, s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1
  d = config.data
  return {
    "bkg_image": jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32),
    "bkg_mask": jnp.asarray(mask),
    "id": {
      f: jnp.asarray(rng.normal(size=(b, n)), jnp.float32)
      for f, n in zip(d.id_fields, d.id_dims, strict=True)
    },
    "exp": jnp.asarray(rng.uniform(0, 1, (b, d.exp_dim)), jnp.float32),
    "crops": _crops(d.crop_fields, b, s, rng),
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


def _task_grads(config, batch, key=1):
  import flax.linen as nn

  task = diffsfsr_task.make_task(config)
  params = nn.unbox(task.init(jax.random.key(0)))

  def f(p, frozen):
    return task.loss_fn(p, frozen, batch, jax.random.key(key), {})

  (loss, metrics), (gp, gf) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
    params, task.frozen
  )
  return task, params, loss, metrics, gp, gf


def _norm(tree):
  return sum(float(jnp.sum(jnp.asarray(g, jnp.float32) ** 2)) for g in jax.tree.leaves(tree))


def test_zero_lambdas_give_the_ldm_gradient_written_out():
  config = _cfg()
  config.model.lambda_id = config.model.lambda_exp = 0.0
  batch = _batch()
  task, params, loss, metrics, grads, _ = _task_grads(config, batch)
  assert task.frozen is None  # no encoder is loaded when no term needs one
  assert set(metrics) == {"l_dm"}
  cfg = diffsfsr_task.model_config(config)
  sched = make_schedule("linear")

  def ldm(p):  # Eq. 3 with the task's draws: rng -> (dropout key, loss key -> (t, noise))
    _, key = jax.random.split(jax.random.key(1))
    key_t, key_noise = jax.random.split(key)
    z0 = batch["bkg_image"]
    t = jax.random.randint(key_t, (2,), 0, 1000, jnp.int32)
    noise = jax.random.normal(key_noise, z0.shape)
    ab = sched.alphas_cumprod[t][:, None, None, None]
    z_t = jnp.sqrt(ab) * z0 + jnp.sqrt(1 - ab) * noise
    face = batch["bkg_mask"]
    cond = {"bkg": z0 * (1 - face), "mask": face, "id": [batch["id"]["id_dlib"]]}
    cond["exp"] = batch["exp"]
    return jnp.mean((diffsfsr.apply(cfg, p, z_t, t, cond) - noise) ** 2)

  want_loss, want = jax.jit(jax.value_and_grad(ldm))(params)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    w = dict(jax.tree_util.tree_flatten_with_path(want)[0])[path]
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-7)


def test_identity_loss_reaches_the_mlps_and_unet_not_the_encoders():
  batch = _batch()
  on = _cfg()
  on.model.lambda_exp = 0.0
  off = _cfg()
  off.model.lambda_id = off.model.lambda_exp = 0.0
  _, _, _, metrics, g_on, g_frozen = _task_grads(on, batch)
  _, _, _, _, g_off, _ = _task_grads(off, batch)
  assert set(metrics) == {"l_dm", "l_id"} and 0 < float(metrics["l_id"]) <= 2
  diff = jax.tree.map(lambda a, b: a - b, g_on, g_off)
  for name in ("id_mlp_0", "unet"):
    assert _norm(diff[name]) > 0, name  # the identity term adds gradient here
  assert set(g_frozen) == {"enc"} and _norm(g_frozen) == 0.0  # frozen: stop_gradient


def _one_step(config):
  from facediff import partitioning
  from facediff.train import state as state_lib
  from facediff.train import step as step_lib

  config.data.global_batch_size = 2
  task = diffsfsr_task.make_task(config)
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  with partitioning.activation_rules(mesh):
    state, shardings, tx = state_lib.create_train_state(task, config, mesh)
    frozen, frozen_sh = state_lib.shard_frozen(task, mesh)
    step, *_ = step_lib.make_train_step(task, tx, config, mesh, shardings, frozen_sh)
    new, metrics = step(state, frozen, _batch(config=config))
  assert int(new.step) == 1
  want = {"l_dm", "l_id", "l_exp"}
  assert want <= set(metrics), metrics.keys()
  for k in want | {"loss", "grad_norm"}:
    assert np.isfinite(float(metrics[k])), k


def test_one_train_step_of_tiny():
  _one_step(_cfg("tiny"))


ABLATIONS = ["tiny+midpoint", "tiny+one_step", "tiny+single_id", "tiny+no_bkg"]


@pytest.mark.parametrize("variant", ABLATIONS)
def test_each_ablation_traces_its_loss_and_gradient(variant):
  """Tracing only (no compile): each ablation's loss builds with every term and the
  gradient reaches the trainable params; the compiled steps are the slow tests below."""
  import flax.linen as nn

  config = _cfg(variant)
  task = diffsfsr_task.make_task(config)
  params = jax.eval_shape(lambda: nn.unbox(task.init(jax.random.key(0))))
  fn = jax.value_and_grad(
    lambda p: task.loss_fn(p, task.frozen, _batch(config=config), jax.random.key(1), {}),
    has_aux=True,
  )
  (loss, metrics), grads = jax.eval_shape(fn, params)
  assert loss.shape == () and set(metrics) == {"l_dm", "l_id", "l_exp"}
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  if variant.endswith("no_bkg"):
    c = diffsfsr_task.batch_condition(_batch(config=config), ["id_dlib"], use_background=False)
    assert float(jnp.abs(c["bkg"]).max()) == 0 and float(c["mask"].max()) == 0


@pytest.mark.slow  # one compiled step each (the dlib and fer gradients compile for ~1 min)
@pytest.mark.parametrize("variant", ABLATIONS)
def test_one_train_step_of_each_ablation(variant):
  _one_step(_cfg(variant))


def test_variants_set_what_the_paper_ablates():
  base = diffsfsr_config.get_config("sd14_512")
  assert base.model.estimator == "improved_midpoint" and base.model.sample_method == "pndm"
  assert base.data.id_fields == ["id_arcface", "id_facenet", "id_dlib"]
  assert (base.model.lambda_id, base.model.lambda_exp) == (0.003, 0.01)
  assert (base.optim.lr, base.optim.constant_steps, base.optim.decay_steps) == (
    1e-5,
    100_000,
    100_000,
  )
  assert diffsfsr_config.get_config("midpoint").model.estimator == "midpoint"
  assert diffsfsr_config.get_config("one_step").model.estimator == "one_step"
  single = diffsfsr_config.get_config("single_id")
  assert single.data.id_fields == ["id_arcface"] and single.data.id_dims == [512]
  assert diffsfsr_config.get_config("no_bkg").model.use_background is False
  with pytest.raises(ValueError, match="two_step"):
    diffsfsr_config.get_config("tiny+two_step")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  import _tiny_sd

  folder = tmp_path_factory.mktemp("sd") / "sd"
  _tiny_sd.make_tiny_sd_folder(str(folder))
  return str(folder)


@pytest.mark.slow  # random ArcFace/FaceNet/DLN inits per variant: ~3 min on 2 cores
def test_sd14_512_and_its_ablations_trace_from_sd_weights(tiny_sd):
  """Tracing only (the compiled step is the slow test below): the paper's variant and
  each ablation on a tiny SD-1.x folder build every loss term, in SD's latent space."""
  import flax.linen as nn

  for variant in ("sd14_512", "midpoint", "one_step", "single_id", "no_bkg"):
    config = _cfg(variant, size=16)
    config.model.init_from = tiny_sd
    config.model.encoder_weights = dict(
      id_arcface="random", id_facenet="random", id_dlib="", exp_dln="random"
    )
    task = diffsfsr_task.make_task(config)
    params = jax.eval_shape(lambda task=task: nn.unbox(task.init(jax.random.key(0))))
    batch = _batch(b=1, config=config)
    fn = jax.value_and_grad(
      lambda p, task=task, batch=batch: task.loss_fn(p, task.frozen, batch, jax.random.key(1), {}),
      has_aux=True,
    )
    (loss, metrics), grads = jax.eval_shape(fn, params)
    assert set(metrics) == {"l_dm", "l_id", "l_exp"}, variant
    assert params["unet"]["conv_in"]["kernel"].shape[2] == 9  # 4 latent + 4 background + mask
    assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.slow  # ArcFace r50, FaceNet and DLN gradients: minutes of compilation on 2 cores
def test_sd14_512_structure_one_step_from_sd_weights(tiny_sd):
  """sd14_512 on a tiny SD-1.x folder: SD's VAE latents, the widened pretrained UNet
  (step 0 predicts what SD's UNet predicts), the three-encoder compound and DLN."""
  from facediff import partitioning
  from facediff.convert import pipeline
  from facediff.models import unet as unet_lib
  from facediff.train import state as state_lib
  from facediff.train import step as step_lib

  config = _cfg("sd14_512", size=16)
  config.model.init_from = tiny_sd
  config.model.encoder_weights = dict(
    id_arcface="random", id_facenet="random", id_dlib="", exp_dln="random"
  )
  config.data.global_batch_size = 1
  task = diffsfsr_task.make_task(config)
  sd = pipeline.load_models(tiny_sd)
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  batch = _batch(b=1, config=config)
  with partitioning.activation_rules(mesh):
    state, shardings, tx = state_lib.create_train_state(task, config, mesh)
    frozen, frozen_sh = state_lib.shard_frozen(task, mesh)
    # The widened SD UNet: with zero new channels, its eps is SD's eps.
    cfg = diffsfsr_task.model_config(config, sd)
    z = jax.random.normal(jax.random.key(3), (1, 8, 8, 4))
    t = jnp.array([321])
    cond = diffsfsr_task.batch_condition(batch, config.data.id_fields)
    cond["bkg"] = diffsfsr_task.LatentSpace("sd_vae", sd.vae_config).encode(frozen, cond["bkg"])
    cond["mask"] = diffsfsr_task.downsample_mask(cond["mask"], 2)
    import flax.linen as nn

    ctx = diffsfsr.DiffSFSRDenoiser(cfg).apply({"params": state.params}, cond, method="context")
    got = diffsfsr.apply(cfg, state.params, z, t, cond)
    sd_cfg = sd.unet_config.replace(dtype=cfg.unet.dtype)
    want = unet_lib.UNet2DConditionModel(sd_cfg).apply(
      {"params": nn.unbox(sd.params["unet"])}, z, t, ctx
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2)  # bf16 compute
    step, *_ = step_lib.make_train_step(task, tx, config, mesh, shardings, frozen_sh)
    new, metrics = step(state, frozen, batch)
  assert set(frozen) == {"vae", "enc"} and set(frozen["enc"]) == {
    "id_arcface",
    "id_facenet",
    "id_dlib",
    "exp_dln",
  }
  for k in ("l_dm", "l_id", "l_exp", "loss"):
    assert np.isfinite(float(metrics[k])), k
  assert int(new.step) == 1


def test_config_errors_are_named():
  config = _cfg()
  config.data.id_dims = [128, 512]
  with pytest.raises(ValueError, match="id_dims"):
    diffsfsr_task.make_task(config)
  config = _cfg()
  config.data.id_dims = [64]
  with pytest.raises(ValueError, match="'id_dlib' has size 64.*gives 128"):
    diffsfsr_task.make_task(config)
  config = _cfg()
  config.data.crop_fields = ["dlib150"]
  with pytest.raises(ValueError, match="crop_fields.*'fer64'"):
    diffsfsr_task.make_task(config)
  config = _cfg("sd14_512")
  with pytest.raises(ValueError, match="init_from"):
    diffsfsr_task.make_task(config)


def test_manifest_mismatch_fails_before_compiling(tmp_path):
  from data_pipelines.records import RecordError
  from launch import runner

  data = tmp_path / "data"
  fake_shards.write_dataset(
    str(data),
    8,
    image_size=16,
    latent_shape=None,
    embeddings={"id_dlib": 64, "exp_fer": 7},
    crop_kinds=("dlib150", "fer64"),
  )
  config = _cfg()
  config.data.path = str(data)
  config.model.lambda_id = config.model.lambda_exp = 0.0
  work = tmp_path / "work"
  with pytest.raises(RecordError, match="id_dlib.*64.*128|id_dlib.*128.*64"):
    runner.run(config, str(work))
  assert not (work / "checkpoints").exists() and not (work / "metrics.jsonl").exists()


@pytest.mark.slow  # two subprocess runs with compilation; run with -m slow
def test_launch_train_trains_and_resumes(tmp_path):
  data = tmp_path / "data"
  fake_shards.write_dataset(
    str(data), 32, image_size=16, latent_shape=None, crop_kinds=("dlib150", "fer64")
  )
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
