"""TGDM (Xu et al., "Multimodal-driven Talking Face Generation via a Unified
Diffusion-based Generator"): AdaIN (Eq. 17) and TexAtt (Eq. 15-16) against the equations
written out step by step in numpy; the denoiser's logical axes and its source/mask
properties; the loss (Eq. 18-21) term by term and its gate (Sec. 5.1); the synthetic 3DMM
dataset, the loader's same-group pairs and the task's I_3d; (slow) training steps through
facediff.train with the gate surviving a checkpoint resume."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tgdm as tgdm_configs
from data_pipelines import loaders, records, synthetic_3dmm
from facediff import partitioning
from facediff.diffusion import make_schedule
from facediff.losses import tgdm as tgdm_losses
from facediff.models import layers, tgdm
from facediff.models import lpips as lpips_model
from facediff.models import vgg16 as vgg16_model
from facediff.train import loop, tgdm_task


def _np(tree):
  return jax.tree.map(np.asarray, nn.unbox(tree))


# ---- layers ----


def test_texatt_matches_equation_15_16_step_by_step():
  rng = np.random.default_rng(0)
  f_d = rng.normal(size=(2, 4, 5, 16)).astype(np.float32)
  f_s = rng.normal(size=(2, 3, 3, 8)).astype(np.float32)  # other size and width than F_d
  mod = layers.TexAtt()
  params = _np(mod.init(jax.random.key(0), f_d, f_s)["params"])
  assert params["query"]["kernel"].shape == (1, 1, 16, 4)  # C/4
  assert params["key"]["kernel"].shape == (1, 1, 8, 4)
  assert params["out"]["kernel"].shape == (1, 1, 4, 16)
  assert params["tau"].shape == () and params["tau"] == 0.0
  params["tau"] = np.float32(0.7)
  for name in ("query", "key", "value", "out"):
    params[name]["bias"] = rng.normal(size=params[name]["bias"].shape).astype(np.float32)
  out = np.asarray(mod.apply({"params": params}, f_d, f_s))

  def conv1x1(x, p):
    return np.einsum("bhwc,cd->bhwd", x.astype(np.float64), p["kernel"][0, 0]) + p["bias"]

  want = np.zeros(f_d.shape)
  for b in range(2):
    q = conv1x1(f_d, params["query"])[b].reshape(20, 4)  # Q_d: (H W, C/4)
    k = conv1x1(f_s, params["key"])[b].reshape(9, 4)
    v = conv1x1(f_s, params["value"])[b].reshape(9, 4)
    logits = q @ k.T  # Eq. 15: no temperature
    m = np.exp(logits - logits.max(1, keepdims=True))
    m /= m.sum(1, keepdims=True)
    f_sd = (m @ v).reshape(1, 4, 5, 4)
    want[b] = 0.7 * conv1x1(f_sd, params["out"])[0] + f_d[b]  # Eq. 16
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)


def test_texatt_with_zero_tau_is_the_identity():
  rng = np.random.default_rng(1)
  f_d = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  f_s = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  mod = layers.TexAtt()
  params = mod.init(jax.random.key(1), f_d, f_s)["params"]  # tau = 0 at init
  out = mod.apply({"params": params}, f_d, f_s)
  np.testing.assert_array_equal(np.asarray(out), f_d)


def test_adain_matches_equation_17():
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(3, 5, 4, 6)) * 2 + 1).astype(np.float32)
  cond = rng.normal(size=(3, 10)).astype(np.float32)
  mod = layers.AdaIN(eps=1e-5)
  params = _np(mod.init(jax.random.key(2), x, cond)["params"])
  np.testing.assert_array_equal(params["scale"]["bias"], np.ones(6))  # starts near plain IN
  params["scale"]["bias"] = rng.normal(size=6).astype(np.float32)
  params["shift"]["bias"] = rng.normal(size=6).astype(np.float32)
  out = np.asarray(mod.apply({"params": params}, x, cond))

  xd = x.astype(np.float64)
  mu = xd.mean(axis=(1, 2), keepdims=True)
  sigma = np.sqrt(xd.var(axis=(1, 2), keepdims=True) + 1e-5)
  sigma_c = cond @ params["scale"]["kernel"] + params["scale"]["bias"]  # sigma_c(C)
  mu_c = cond @ params["shift"]["kernel"] + params["shift"]["bias"]  # mu_c(C)
  want = sigma_c[:, None, None] * (xd - mu) / sigma + mu_c[:, None, None]
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
  # The normalised features are per example and channel: a per-(example, channel) affine
  # change of x leaves the output unchanged.
  shifted = x * np.float32(3.0) + rng.normal(size=(3, 1, 1, 6)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(mod.apply({"params": params}, shifted, cond)), out, atol=1e-4
  )


# ---- model ----


def _tiny_inputs(cfg, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  s = cfg.image_size
  x = rng.normal(size=(batch, s, s, 3)).astype(np.float32)
  t = np.array([3, 700][:batch], np.int32)
  cond = {
    "i3d": rng.uniform(-1, 1, size=(batch, s, s, 3)).astype(np.float32),
    "source": rng.uniform(-1, 1, size=(batch, s, s, 3)).astype(np.float32),
    "rho": rng.normal(size=(batch, cfg.rho_dim)).astype(np.float32),
  }
  if cfg.mode == "swap":
    cond["id"] = rng.normal(size=(batch, cfg.id_dim)).astype(np.float32)
    mask = np.zeros((batch, s, s, 1), np.float32)
    mask[:, s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1
    cond["source_mask"] = mask
  return x, t, cond


def _random_params(cfg, seed):
  """Params of ``abstract_params``' shapes filled with U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  kernels, small biases, AdaIN scale biases near 1 and tau = 0 (as a fresh model).
  Compiling the real ``init_params`` takes about a minute on 2 shared cores; the
  properties tested here hold for any weights."""
  rng = np.random.default_rng(seed)

  def fill(path, a):
    names = [p.key for p in path]
    if names[-1] == "tau":
      return np.zeros(a.shape, np.float32)
    if names[-1] == "kernel":
      bound = 1 / np.sqrt(np.prod(a.shape[:-1]))
      return rng.uniform(-bound, bound, a.shape).astype(np.float32)
    base = 1.0 if names[-1] == "scale" or names[-2:] == ["scale", "bias"] else 0.0
    return (base + 0.05 * rng.normal(size=a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(tgdm.abstract_params(cfg)))


def _with_tau(params, value):
  """Every TexAtt's tau set to ``value``."""
  return jax.tree_util.tree_map_with_path(
    lambda path, v: np.full(v.shape, value, np.float32) if path[-1].key == "tau" else v, params
  )


def test_tgdm_tiny_forward_axes_and_zero_tau_ignores_the_source():
  cfg = tgdm.TGDMConfig.tiny()
  boxed = tgdm.abstract_params(cfg)
  # Every parameter carries logical axis names (one per dimension), as the SD UNet's.
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
  # ... and shards by them: FSDP over 8 devices splits the 64-wide kernels, tau replicated.
  specs = partitioning.param_specs(boxed, partitioning.make_mesh({"data": 1, "fsdp": 8}))
  assert specs["down_3_res_0"]["conv1"]["kernel"] == P(None, None, None, "fsdp")
  assert specs["down_3_texatt_0"]["tau"] == P()
  params = _random_params(cfg, 0)
  taus = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0] if p[-1].key == "tau"]
  # 1 TexAtt per ResNet block at 1/8 and 1/16: (1 down + 2 up) x 2 levels + mid.
  assert len(taus) == 7
  # TexAtt at 8x8 and 4x4 on the 64-px tiny model, queries reduced to C/4.
  assert params["down_3_texatt_0"]["query"]["kernel"].shape == (1, 1, 64, 16)
  assert params["texture_encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 16)
  assert params["conv_in"]["kernel"].shape == (3, 3, 6, 16)  # x_t ++ I_3d

  x, t, cond = _tiny_inputs(cfg)
  fwd = jax.jit(lambda p, c: tgdm.apply(cfg, p, x, t, c))
  eps = np.asarray(fwd(params, cond))
  assert eps.shape == x.shape and eps.dtype == np.float32 and np.isfinite(eps).all()
  other = dict(cond, source=np.random.default_rng(9).uniform(-1, 1, x.shape).astype(np.float32))
  # tau = 0 (init): the texture path adds nothing, the source image cannot matter.
  np.testing.assert_array_equal(np.asarray(fwd(params, other)), eps)
  # tau != 0: it does.
  live = _with_tau(params, 0.5)
  assert np.abs(np.asarray(fwd(live, other)) - np.asarray(fwd(live, cond))).max() > 1e-4
  # rho (through AdaIN) and I_3d (input) always matter.
  assert np.abs(np.asarray(fwd(params, dict(cond, rho=cond["rho"] + 1.0))) - eps).max() > 1e-4
  assert np.abs(np.asarray(fwd(params, dict(cond, i3d=-cond["i3d"]))) - eps).max() > 1e-4


def test_tgdm_swap_hides_the_masked_source_face():
  cfg = tgdm.TGDMConfig.tiny(mode="swap")
  params = _with_tau(_random_params(cfg, 1), 0.5)
  x, t, cond = _tiny_inputs(cfg, seed=3)
  fwd = jax.jit(lambda c: tgdm.apply(cfg, params, x, t, c))
  eps = np.asarray(fwd(cond))
  mask = cond["source_mask"]
  noise = np.random.default_rng(4).uniform(-1, 1, x.shape).astype(np.float32)
  # Pixels under the mask (the face) never reach the network ...
  inside = dict(cond, source=cond["source"] * (1 - mask) + noise * mask)
  np.testing.assert_array_equal(np.asarray(fwd(inside)), eps)
  # ... the rest of the source does, and so does the identity embedding.
  outside = dict(cond, source=cond["source"] * mask + noise * (1 - mask))
  assert np.abs(np.asarray(fwd(outside)) - eps).max() > 1e-4
  assert np.abs(np.asarray(fwd(dict(cond, id=cond["id"] + 1.0))) - eps).max() > 1e-4


# ---- loss ----


def test_tgdm_loss_term_by_term_and_gate():
  rng = np.random.default_rng(5)
  x0 = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([10, 900], np.int32)
  shift = rng.normal(size=x0.shape).astype(np.float32) * 0.1
  schedule = make_schedule("linear")
  lp_cfg = lpips_model.LPIPSConfig(
    vgg=vgg16_model.VGG16Config(stage_channels=(4, 8, 8, 8, 8), stage_depths=(1, 1, 1, 1, 1))
  )
  # Random weights of the right shapes (compiling ``init_params`` takes seconds);
  # non-negative, as the real heads are.
  lp_params = jax.tree.map(
    lambda a: rng.uniform(0, 0.5, a.shape).astype(np.float32),
    nn.unbox(lpips_model.abstract_params(lp_cfg)),
  )

  def eps_fn(x, tt, c):
    return 0.5 * x + c["shift"]

  def run(gate):
    return tgdm_losses.tgdm_loss(
      eps_fn,
      schedule,
      x0,
      {"shift": shift},
      None,
      gate=gate,
      lpips_params=lp_params,
      lpips_config=lp_cfg,
      t=t,
      noise=noise,
    )

  # Step by step in float64: linear betas 1e-4 .. 0.02 over T = 1000 (DDPM / TGDM).
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise  # Eq. 2
  eps = 0.5 * x_t + shift
  l_simple = np.mean((noise - eps) ** 2)  # Eq. 18 (MSE)
  x0_hat = (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)  # Eq. 5
  assert np.abs(x0_hat[1]).max() > 1  # t = 900: the clip below matters
  x0_hat = np.clip(x0_hat, -1.0, 1.0)  # facediff's clip (the paper is silent)
  l_rec = np.mean((x0_hat - x0) ** 2)  # Eq. 19 (MSE)
  lpips_jit = jax.jit(lambda a, b: lpips_model.apply_lpips(lp_cfg, lp_params, a, b))
  l_p = float(np.mean(lpips_jit(x0_hat.astype(np.float32), x0)))  # Eq. 20

  run = jax.jit(run)  # one program, the gate a traced value
  loss0, m0 = run(np.int32(0))
  loss1, m1 = run(np.int32(1))
  for m in (m0, m1):
    np.testing.assert_allclose(m["l_simple"], l_simple, rtol=1e-5)
    np.testing.assert_allclose(m["l_rec"], l_rec, rtol=1e-4)
  assert float(m0["gate"]) == 0.0 and float(m0["lpips"]) == 0.0  # LPIPS not run
  assert float(m1["gate"]) == 1.0 and l_p > 0
  np.testing.assert_allclose(m1["lpips"], l_p, rtol=1e-4)
  np.testing.assert_allclose(loss0, 10 * l_simple, rtol=1e-5)  # Eq. 21, gate off
  np.testing.assert_allclose(loss1, 10 * l_simple + l_rec + l_p, rtol=1e-4)  # gate on

  # The gate (Sec. 5.1): on once the noise MSE is below the threshold, never off again.
  gate, seen = np.int32(0), []
  for value in (0.3, 0.06, 0.05, 0.049, 0.2, 0.01):
    gate = tgdm_losses.update_gate(gate, value, 0.05)
    seen.append(int(gate))
  assert seen == [0, 0, 0, 1, 1, 1]


def test_tgdm_image_terms_are_bounded_at_the_last_timestep():
  """At t = T - 1 (abar = 4e-5) an untrained eps_hat makes the unclipped one-step x0
  estimate of Eq. 5 explode; with facediff's clip to [-1, 1] L_rec <= 4 (the largest
  squared distance inside [-1, 1]) and LPIPS stays finite and small."""
  rng = np.random.default_rng(6)
  x0 = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([999, 999], np.int32)
  schedule = make_schedule("linear")
  lp_cfg = lpips_model.LPIPSConfig(
    vgg=vgg16_model.VGG16Config(stage_channels=(4, 8, 8, 8, 8), stage_depths=(1, 1, 1, 1, 1))
  )
  lp_params = jax.tree.map(
    lambda a: rng.uniform(0, 0.5, a.shape).astype(np.float32),
    nn.unbox(lpips_model.abstract_params(lp_cfg)),
  )
  wrong = rng.normal(size=x0.shape).astype(np.float32)  # an untrained eps_hat

  def run(clip):
    return tgdm_losses.tgdm_loss(
      lambda x, tt, c: wrong,
      schedule,
      x0,
      {},
      None,
      gate=np.int32(1),
      lpips_params=lp_params,
      lpips_config=lp_cfg,
      t=t,
      noise=noise,
      clip_x0=clip,
    )

  _, raw = jax.jit(lambda: run(None))()
  _, clipped = jax.jit(lambda: run(1.0))()
  abar = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[999])
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  x0_hat = (x_t - np.sqrt(1 - abar) * wrong) / np.sqrt(abar)  # Eq. 5, unclipped
  np.testing.assert_allclose(raw["l_rec"], np.mean((x0_hat - x0) ** 2), rtol=1e-4)
  assert float(raw["l_rec"]) > 1e3  # the doubt of the review: it explodes
  want = np.mean((np.clip(x0_hat, -1, 1) - x0) ** 2)
  np.testing.assert_allclose(clipped["l_rec"], want, rtol=1e-5)
  assert 0 < float(clipped["l_rec"]) <= 4.0
  assert np.isfinite(float(clipped["lpips"])) and float(clipped["lpips"]) < float(raw["lpips"])


# ---- synthetic dataset, loader pairs, task ----


def _tiny_config(data_path, variant="tiny", **train):
  c = tgdm_configs.get_config(variant)
  c.data.path = str(data_path)
  c.data.global_batch_size = 4
  c.data.read_threads = 1
  c.mesh = dict(data=1, fsdp=1)
  c.train.update(dict(log_every=1, checkpoint_every=1, sample_every=0, async_checkpointing=False))
  c.train.update(train)
  return c


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  folder = tmp_path_factory.mktemp("synthetic_3dmm")
  synthetic_3dmm.build(
    str(folder), num_groups=3, per_group=3, image_size=64, num_vertices=800, shard_size=4
  )
  return folder


def test_synthetic_pairs_share_a_group_and_render_their_own_image(synthetic):
  manifest = records.Manifest.load(str(synthetic))
  assert manifest.num_records == 9 and len(manifest.shards) == 3
  recs = list(records.iter_records(str(synthetic)))
  groups = np.array([int(r["group"]) for r in recs])
  np.testing.assert_array_equal(groups, manifest.extra["groups"]["group"])
  # Within a group: same identity, texture, lighting; own expression and pose.
  c = np.stack([r["coeffs"] for r in recs])
  for g in range(3):
    m = c[groups == g]
    for part in (slice(0, 80), slice(144, 224), slice(227, 254)):
      assert np.ptp(m[:, part], axis=0).max() == 0
    for part in (slice(80, 144), slice(224, 227)):
      assert np.ptp(m[:, part], axis=0).min() > 0
  np.testing.assert_array_equal(c[:, :80], np.stack([r["id_3dmm"] for r in recs]))

  cfg = _tiny_config(synthetic)
  batch = next(iter(loaders.make_train_dataset(cfg)))
  batch = loaders.to_model_inputs(batch)
  src, tgt = batch["src"]["source"], batch["src"]["bkg"]
  assert np.all(src != tgt) and np.all(groups[src] == groups[tgt])
  np.testing.assert_array_equal(batch["coeffs"], c[tgt])
  np.testing.assert_array_equal(batch["source_coeffs"], c[src])
  # Without the manifest's table the loader reads the groups from the records.
  source, _ = loaders.open_source(cfg.data)
  manifest.extra.pop("groups")
  np.testing.assert_array_equal(loaders.group_table(cfg.data, source, manifest), groups)

  # The task's I_3d of rho_hat = reenact(source, target) is the target's face: the
  # appearance the source lends is the group's, and the motion is the target's.
  model = tgdm_task.load_morphable_model(cfg)
  target, cond = jax.jit(
    lambda b: tgdm_task.make_condition(cfg, tgdm_task.model_config(cfg), model, b)
  )(batch)
  face = batch["bkg_mask"][..., 0] > 0  # the dataset's mask (the mouth left out)
  err = np.abs(np.asarray(cond["i3d"]) - np.asarray(target))[face]
  assert err.max() <= 1.0 / 255 + 1e-6  # the PNG rounding of the stored image
  assert np.asarray(cond["rho"]).shape == (4, 261)
  np.testing.assert_array_equal(np.asarray(cond["rho"])[:, 257:], 0)  # D3DFR: no gaze
  np.testing.assert_array_equal(cond["source"], batch["source_image"])


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r for r in rows if "l_simple" in r}


def _train(cfg, workdir):
  task = tgdm_task.make_task(cfg)
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  it = loaders.make_train_iterator(cfg, mesh)
  return loop.train_and_evaluate(cfg, str(workdir), task, it, mesh=mesh)


@pytest.mark.slow
def test_tiny_reenact_trains_and_the_gate_survives_resume(synthetic, tmp_path):
  """One TGDM step through facediff.train on the synthetic dataset; the gate turns on
  after the first step whose l_simple is below the threshold and a resumed run keeps it
  even where l_simple never is. (Several minutes on 2 CPU cores: compiles twice.)"""
  cfg = _tiny_config(synthetic, num_steps=2)
  cfg.model.gate_threshold = 1e9  # every l_simple is below: on after step 1
  first = _train(cfg, tmp_path)
  assert first["start_step"] == 0 and first["step"] == 2
  m = _metrics(tmp_path)
  assert m[1]["gate"] == 0.0 and m[1]["lpips"] == 0.0
  np.testing.assert_allclose(m[1]["loss"], 10 * m[1]["l_simple"], rtol=1e-5)
  assert m[2]["gate"] == 1.0 and m[2]["lpips"] > 0  # the image terms are live
  np.testing.assert_allclose(
    m[2]["loss"], 10 * m[2]["l_simple"] + m[2]["l_rec"] + m[2]["lpips"], rtol=1e-4
  )
  # Resume with a threshold no loss can reach: the gate comes back from the checkpoint
  # (model_state) and stays on.
  cfg = _tiny_config(synthetic, num_steps=3)
  cfg.model.gate_threshold = -1.0
  second = _train(cfg, tmp_path)
  assert second["start_step"] == 2 and second["step"] == 3
  m = _metrics(tmp_path)
  assert m[3]["gate"] == 1.0 and m[3]["l_simple"] > -1.0 and np.isfinite(m[3]["loss"])


@pytest.mark.slow
def test_tiny_swap_trains_and_previews(synthetic, tmp_path):
  cfg = _tiny_config(synthetic, "tiny_swap", num_steps=1, sample_every=1)
  cfg.model.sample_steps = 2
  summary = _train(cfg, tmp_path)
  m = _metrics(tmp_path)
  assert summary["step"] == 1 and m[1]["gate"] == 0.0 and np.isfinite(m[1]["loss"])
  assert summary["last_samples"] and os.path.exists(summary["last_samples"])
  assert summary["params_per_module"]["id_proj"] == 80 * 64 + 64  # Linear(z_id)


def test_config_variants_build_their_models():
  for variant in tgdm_configs.VARIANTS:
    c = tgdm_configs.get_config(variant)
    mc = tgdm_task.model_config(c)
    assert mc.mode == ("swap" if "swap" in variant else "reenact")
    assert mc.image_size // mc.downsample == (4 if variant.startswith("tiny") else 16)
    assert [mc.image_size >> level for level in mc.texatt_levels] == (
      [8, 4] if variant.startswith("tiny") else [32, 16]  # TexAtt at 1/8 and 1/16
    )
    assert c.model.schedule == "linear" and c.model.num_train_timesteps == 1000
    assert (c.model.lambda_simple, c.model.lambda_rec, c.model.lambda_p) == (10.0, 1.0, 1.0)
    assert c.model.gate_threshold == 0.05
    assert bool(c.data.pair_field) == (mc.mode == "reenact")
  with pytest.raises(ValueError, match="unknown variant"):
    tgdm_configs.get_config("vox512")
