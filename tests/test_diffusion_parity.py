"""Samplers and schedules against diffusers' PyTorch schedulers.

Both sides get the same betas, the same initial noise, the same per-step noise and
the same deterministic fake denoiser; whole trajectories must agree to 1e-5 (float32).

facediff derives alpha_bar in float64 and rounds once; diffusers accumulates the
cumulative product in float32. The tables agree to 2e-6 (test_schedule_tables...), but
DDPM's per-step beta = 1 - abar_t / abar_{t-1} cancels catastrophically and would
amplify that rounding difference ~100x over a 1000-step trajectory. So the reference
scheduler is handed the same float32 alpha_bar table (``_same_tables``), and the
trajectory tests compare the sampling logic itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from diffusers.schedulers import scheduling_ddpm

from facediff.diffusion import make_schedule, make_timesteps, num_denoiser_calls, sample

SHAPE = (2, 3, 4, 4)
BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def fake_eps_np(x, t):
  """A deterministic, nonlinear stand-in denoiser (float32 in, float32 out)."""
  return (0.6 * np.tanh(0.8 * x) + 0.05 * x + 1e-4 * np.float32(t)).astype(np.float32)


def fake_eps_torch(x, t):
  return 0.6 * torch.tanh(0.8 * x) + 0.05 * x + 1e-4 * float(t)


def fake_eps_jax(x, t, cond=None):
  return 0.6 * jnp.tanh(0.8 * x) + 0.05 * x + 1e-4 * t[:, None, None, None].astype(x.dtype)


def _x_T(seed=0):
  return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _same_tables(ref, name):
  ref.alphas_cumprod = torch.from_numpy(np.array(make_schedule(name).alphas_cumprod))
  if hasattr(ref, "final_alpha_cumprod") and not float(ref.final_alpha_cumprod) == 1.0:
    ref.final_alpha_cumprod = ref.alphas_cumprod[0]
  return ref


def _run_torch(sched, x_T, noise=None, ddim_eta=None):
  x = torch.from_numpy(x_T.copy())
  traj = []
  for i, t in enumerate(sched.timesteps):
    eps = fake_eps_torch(x, t)
    if ddim_eta is not None:
      kw = {"eta": ddim_eta}
      if ddim_eta > 0:
        kw["variance_noise"] = torch.from_numpy(noise[i])
      x = sched.step(eps, t, x, **kw).prev_sample
    else:
      x = sched.step(eps, t, x).prev_sample
    traj.append(x.numpy().copy())
  return np.stack(traj)


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_schedule_tables_match_diffusers(name):
  ref = DDPMScheduler(
    num_train_timesteps=1000, beta_schedule=name, beta_start=BETAS[name][0], beta_end=BETAS[name][1]
  )
  s = make_schedule(name)
  np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-6)


@pytest.mark.parametrize(
  "n,offset,spacing",
  [(50, 1, "leading"), (37, 0, "leading"), (10, 0, "trailing"), (25, 0, "linspace")],
)
def test_timesteps_match_diffusers(n, offset, spacing):
  ref = DDIMScheduler(num_train_timesteps=1000, steps_offset=offset, timestep_spacing=spacing)
  ref.set_timesteps(n)
  np.testing.assert_array_equal(
    make_timesteps(1000, n, spacing=spacing, steps_offset=offset), ref.timesteps.numpy()
  )


@pytest.mark.parametrize(
  "name,n,offset,clip",
  [
    ("linear", None, 0, True),  # full T = 1000 ancestral steps
    ("linear", 50, 0, False),  # strided
    ("scaled_linear", 37, 1, False),
    ("scaled_linear", 20, 0, True),
  ],
)
def test_ddpm_trajectory_matches_diffusers(name, n, offset, clip, monkeypatch):
  T = 1000
  steps = T if n is None else n
  ref = DDPMScheduler(
    num_train_timesteps=T,
    beta_schedule=name,
    beta_start=BETAS[name][0],
    beta_end=BETAS[name][1],
    clip_sample=clip,
    steps_offset=offset,
    variance_type="fixed_small",
  )
  _same_tables(ref, name)
  ref.set_timesteps(steps)
  noise = np.random.default_rng(1).standard_normal((steps,) + SHAPE).astype(np.float32)
  it = iter(range(steps))
  idx = {}

  def fake_randn(shape, generator=None, device=None, dtype=None):
    return torch.from_numpy(noise[idx["i"]])

  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake_randn)
  x = torch.from_numpy(_x_T())
  want = []
  for i, t in zip(it, ref.timesteps, strict=True):
    idx["i"] = i
    x = ref.step(fake_eps_torch(x, t), t, x).prev_sample
    want.append(x.numpy().copy())
  want = np.stack(want)

  _, got = jax.jit(
    lambda x: sample(
      fake_eps_jax,
      make_schedule(name),
      x,
      method="ddpm",
      num_steps=n,
      noise=noise,
      steps_offset=offset,
      clip_sample=1.0 if clip else None,
      return_trajectory=True,
    )
  )(_x_T())
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "name,n,offset,eta,alpha_one,spacing",
  [
    ("scaled_linear", 50, 1, 0.0, False, "leading"),  # Stable Diffusion's DDIM
    ("linear", 10, 0, 0.0, True, "leading"),
    ("linear", 25, 0, 0.5, True, "trailing"),
    ("scaled_linear", 20, 1, 1.0, False, "leading"),
  ],
)
def test_ddim_trajectory_matches_diffusers(name, n, offset, eta, alpha_one, spacing):
  ref = DDIMScheduler(
    num_train_timesteps=1000,
    beta_schedule=name,
    beta_start=BETAS[name][0],
    beta_end=BETAS[name][1],
    clip_sample=False,
    set_alpha_to_one=alpha_one,
    steps_offset=offset,
    timestep_spacing=spacing,
  )
  _same_tables(ref, name)
  ref.set_timesteps(n)
  noise = np.random.default_rng(2).standard_normal((n,) + SHAPE).astype(np.float32)
  want = _run_torch(ref, _x_T(), noise=noise, ddim_eta=eta)
  _, got = sample(
    fake_eps_jax,
    make_schedule(name),
    _x_T(),
    method="ddim",
    num_steps=n,
    eta=eta,
    noise=noise if eta > 0 else None,
    steps_offset=offset,
    set_alpha_to_one=alpha_one,
    timestep_spacing=spacing,
    return_trajectory=True,
  )
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "name,n,offset,skip_prk,spacing",
  [
    ("scaled_linear", 50, 1, True, "leading"),  # Stable Diffusion's PLMS, 51 calls
    ("scaled_linear", 20, 0, True, "trailing"),
    ("linear", 10, 0, False, "leading"),  # original PNDM with Runge-Kutta warm-up
    ("linear", 30, 1, False, "linspace"),
  ],
)
def test_pndm_trajectory_matches_diffusers(name, n, offset, skip_prk, spacing):
  ref = PNDMScheduler(
    num_train_timesteps=1000,
    beta_schedule=name,
    beta_start=BETAS[name][0],
    beta_end=BETAS[name][1],
    skip_prk_steps=skip_prk,
    set_alpha_to_one=False,
    steps_offset=offset,
    timestep_spacing=spacing,
  )
  _same_tables(ref, name)
  ref.set_timesteps(n)
  want = _run_torch(ref, _x_T())
  assert len(want) == num_denoiser_calls("pndm", n, skip_prk_steps=skip_prk)
  _, got = sample(
    fake_eps_jax,
    make_schedule(name),
    _x_T(),
    method="pndm",
    num_steps=n,
    steps_offset=offset,
    skip_prk_steps=skip_prk,
    timestep_spacing=spacing,
    return_trajectory=True,
  )
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_guidance_matches_diffusers_pipeline_formula():
  """CFG as SD's pipeline does it: [uncond; cond] in one batch, e_u + s (e_c - e_u)."""
  n, scale = 20, 7.5
  cond_np = np.linspace(-1, 1, SHAPE[0]).astype(np.float32)
  uncond_np = np.zeros((1,), np.float32)

  def eps_torch(x, t, c):
    return fake_eps_torch(x, t) + 0.3 * c[:, None, None, None] * torch.cos(x)

  ref = PNDMScheduler(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    skip_prk_steps=True,
    steps_offset=1,
  )
  _same_tables(ref, "scaled_linear")
  ref.set_timesteps(n)
  x = torch.from_numpy(_x_T())
  c = torch.from_numpy(np.concatenate([np.repeat(uncond_np, SHAPE[0]), cond_np]))
  for t in ref.timesteps:
    e_u, e_c = eps_torch(torch.cat([x, x]), t, c).chunk(2)
    x = ref.step(e_u + scale * (e_c - e_u), t, x).prev_sample

  calls = []

  def eps_jax(x, t, c):
    calls.append(x.shape[0])
    return fake_eps_jax(x, t) + 0.3 * c[:, None, None, None] * jnp.cos(x)

  got = jax.jit(
    lambda x, c, u: sample(
      eps_jax,
      make_schedule("scaled_linear"),
      x,
      method="pndm",
      num_steps=n,
      steps_offset=1,
      cond=c,
      uncond=u,
      guidance_scale=scale,
    )
  )(_x_T(), cond_np, uncond_np)
  np.testing.assert_allclose(np.asarray(got), x.numpy(), atol=1e-5, rtol=1e-5)
  assert calls == [2 * SHAPE[0]], "guidance must batch both branches into one traced call"
