"""x0 estimators against the paper's equations written out step by step; properties of
the samplers (determinism, single compiled program); argument validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facediff.diffusion import (
  estimate_x0,
  improved_midpoint_x0,
  make_schedule,
  midpoint_x0,
  one_step_x0,
  posterior_chain,
  posterior_mean,
  q_sample,
  sample,
  schedules,
)

T = 1000


def np_tables(name):
  """The schedule recomputed here in float64 from the paper's definitions."""
  lo, hi = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}[name]
  if name == "linear":
    betas = np.linspace(lo, hi, T)
  else:
    betas = np.linspace(lo**0.5, hi**0.5, T) ** 2
  abar = np.cumprod(1 - betas)
  return betas, abar


def np_eps(x, t):
  return 0.6 * np.tanh(0.8 * x) + 0.05 * x + 1e-4 * t


def jax_eps(x, t, cond=None):
  return 0.6 * jnp.tanh(0.8 * x) + 0.05 * x + 1e-4 * schedules.expand_to(t, x)


def abar_of(abar, s):
  return 1.0 if s < 0 else abar[s]


def improved_midpoint_reference(z_t, t, betas, abar):
  """DiffSFSR section 3.3 written out: call at t, Eq. 1 inverted, Eq. 2's mean with x0
  fixed for s = t, ..., t1+1 one step at a time, call at t1, Eq. 9."""
  t1 = t // 2
  eps = np_eps(z_t, t)
  x0 = (z_t - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
  z = z_t
  for s in range(t, t1, -1):
    ab_s, ab_prev = abar[s], abar_of(abar, s - 1)
    alpha_s = 1 - betas[s]
    z = (np.sqrt(ab_prev) * betas[s] / (1 - ab_s)) * x0 + (
      np.sqrt(alpha_s) * (1 - ab_prev) / (1 - ab_s)
    ) * z
  eps2 = np_eps(z, t1)
  return z, (z - np.sqrt(1 - abar[t1]) * eps2) / np.sqrt(abar[t1])


def midpoint_reference(z_t, t, abar):
  """DiffSwap's midpoint sampling, Eq. 8 then Eq. 9, written out."""
  t1 = t // 2
  r = abar[t] / abar[t1]
  z = (z_t - np.sqrt(1 - r) * np_eps(z_t, t)) / np.sqrt(r)
  return (z - np.sqrt(1 - abar[t1]) * np_eps(z, t1)) / np.sqrt(abar[t1])


TS = np.array([0, 1, 2, 3, 7, 50, 333, 500, 998, 999])


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_improved_midpoint_closed_form_equals_step_by_step_chain(name):
  betas, abar = np_tables(name)
  sched = make_schedule(name)
  rng = np.random.default_rng(0)
  z_t = rng.standard_normal((len(TS), 4, 3, 3))
  refs = [improved_midpoint_reference(z_t[i], int(t), betas, abar) for i, t in enumerate(TS)]
  want_z1, want = zip(*refs, strict=True)
  got = jax.jit(lambda z, t: improved_midpoint_x0(jax_eps, sched, z, t))(
    jnp.asarray(z_t, jnp.float32), jnp.asarray(TS)
  )
  np.testing.assert_allclose(np.asarray(got.x0), np.stack(want), rtol=2e-4, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(got.t1), TS // 2)
  # The chain alone: z_{t1} = A z_t + B x0 equals repeated Eq. 2 for every t in [0, T).
  all_t = np.arange(T)
  a, b = posterior_chain(sched, all_t, all_t // 2)
  x0, z_start = 0.7, 1.3
  ab_prev_all = np.concatenate([[1.0], abar[:-1]])
  c0 = np.sqrt(ab_prev_all) * betas / (1 - abar)
  c1 = np.sqrt(1 - betas) * (1 - ab_prev_all) / (1 - abar)
  want = np.empty(T)
  for t in range(T):  # every t in [0, T), one Eq. 2 step at a time
    z = z_start
    for s in range(t, t // 2, -1):
      z = c0[s] * x0 + c1[s] * z
    want[t] = z
  got = np.asarray(a, np.float64) * z_start + np.asarray(b, np.float64) * x0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_posterior_mean_is_eq2():
  betas, abar = np_tables("linear")
  sched = make_schedule("linear")
  t = np.array([0, 1, 500, 999])
  x_t, x0 = np.full((4, 2), 0.3), np.full((4, 2), -0.8)
  ab_prev = np.array([abar_of(abar, s - 1) for s in t])
  want = (np.sqrt(ab_prev) * betas[t] / (1 - abar[t]))[:, None] * x0 + (
    np.sqrt(1 - betas[t]) * (1 - ab_prev) / (1 - abar[t])
  )[:, None] * x_t
  got = posterior_mean(sched, jnp.asarray(x_t, jnp.float32), t, jnp.asarray(x0, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_midpoint_is_eq8_then_eq9():
  _, abar = np_tables("scaled_linear")
  sched = make_schedule("scaled_linear")
  z_t = np.random.default_rng(1).standard_normal((len(TS), 5))
  want = np.stack([midpoint_reference(z_t[i], int(t), abar) for i, t in enumerate(TS)])
  got = midpoint_x0(jax_eps, sched, jnp.asarray(z_t, jnp.float32), TS)
  np.testing.assert_allclose(np.asarray(got.x0), want, rtol=2e-4, atol=2e-5)


def test_one_step_inverts_forward_process_exactly_for_true_noise():
  sched = make_schedule("linear")
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
  t = np.array([0, 10, 400, 900])
  z_t = q_sample(sched, x0, t, noise)
  est = one_step_x0(lambda z, tt, c: noise, sched, z_t, t)
  np.testing.assert_allclose(np.asarray(est.x0), np.asarray(x0), atol=2e-4)


@pytest.mark.parametrize("name", ["one_step", "midpoint", "improved_midpoint"])
def test_estimators_call_counts_and_finite_gradients(name):
  sched = make_schedule("scaled_linear")
  calls = []

  def eps_fn(params, z, t, cond):
    calls.append(t)
    h = jnp.tanh(z @ params["w"] + params["b"]) + 0.01 * schedules.expand_to(t, z)
    return h @ params["w"].T

  params = {"w": jnp.eye(6) * 0.5 + 0.01, "b": jnp.zeros(6)}
  z_t = jnp.asarray(np.random.default_rng(3).standard_normal((4, 6)), jnp.float32)
  t = jnp.array([0, 1, 500, T - 1])

  def loss(p):
    est = estimate_x0(name, lambda z, tt, c: eps_fn(p, z, tt, c), sched, z_t, t)
    return jnp.sum(est.x0**2) + jnp.sum(est.eps**2)

  g = jax.grad(loss)(params)
  assert len(calls) == (1 if name == "one_step" else 2)
  for leaf in jax.tree.leaves(g):
    assert np.all(np.isfinite(np.asarray(leaf)))
  assert float(jnp.abs(g["w"]).sum()) > 0


@pytest.mark.parametrize(
  "method,kw",
  [
    ("ddpm", {"num_steps": 25}),
    ("ddim", {"num_steps": 10, "eta": 1.0}),
    ("pndm", {"num_steps": 10}),
  ],
)
def test_sampler_same_key_same_output_and_single_program(method, kw):
  sched = make_schedule("scaled_linear")
  traced = []

  def eps_fn(x, t, c):
    traced.append(1)
    return jax_eps(x, t)

  run = jax.jit(lambda x, k: sample(eps_fn, sched, x, method=method, key=k, **kw))
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  a = run(x, jax.random.key(1))
  b = run(x, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(traced) == 1, "the denoiser must be traced once (one scan body, no Python loop)"
  jaxpr = jax.make_jaxpr(lambda x, k: sample(eps_fn, sched, x, method=method, key=k, **kw))(
    x, jax.random.key(1)
  )
  assert "scan" in str(jaxpr)
  if method != "pndm":
    c = run(x, jax.random.key(2))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_bad_arguments_raise_naming_the_argument():
  sched = make_schedule("linear", num_train_timesteps=100)
  x = jnp.zeros((1, 2))
  eps = lambda x, t, c: x  # noqa: E731
  with pytest.raises(ValueError, match="num_steps"):
    sample(eps, sched, x, method="ddim", num_steps=101)
  with pytest.raises(ValueError, match="num_steps"):
    sample(eps, sched, x, method="pndm", num_steps=0)
  with pytest.raises(ValueError, match="schedule"):
    make_schedule("cosine_warp")
  with pytest.raises(ValueError, match="method"):
    sample(eps, sched, x, method="euler", num_steps=10)
  with pytest.raises(ValueError, match="timestep_spacing"):
    sample(eps, sched, x, method="ddim", num_steps=10, timestep_spacing="even")
  with pytest.raises(ValueError, match="steps_offset"):
    sample(eps, sched, x, method="ddim", num_steps=100, steps_offset=1)
  with pytest.raises(ValueError, match="key"):
    sample(eps, sched, x, method="ddpm", num_steps=10)
  with pytest.raises(ValueError, match="noise"):
    sample(eps, sched, x, method="ddpm", num_steps=10, noise=jnp.zeros((3, 1, 2)))
  with pytest.raises(ValueError, match="uncond"):
    sample(eps, sched, x, method="ddim", num_steps=10, guidance_scale=3.0)
  with pytest.raises(ValueError, match=r"\bt\b.*\[0, 100\)"):
    q_sample(sched, x, np.array([100]), x)
  with pytest.raises(ValueError, match=r"\bt\b"):
    improved_midpoint_x0(eps, sched, x, np.array([-1]))
  with pytest.raises(ValueError, match="x0_estimator"):
    estimate_x0("two_step", eps, sched, x, np.array([3]))
