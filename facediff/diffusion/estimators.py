"""Estimates of the clean sample from a noisy one, as DiffSFSR training needs them.

DiffSFSR computes its identity and expression losses on an image decoded from an
estimate z0* of the clean latent (section 3.3). Three estimators, all batched with a
per-example timestep ``t`` (int32, shape (B,)) and jit/grad-friendly:

* ``one_step``: Eq. 1 inverted after one denoiser call at t.
* ``midpoint``: DiffSwap's midpoint sampling: Eq. 8 jumps to t1 = floor(t/2), a second
  call there, then Eq. 9.
* ``improved_midpoint``: DiffSFSR's: one call at t gives x0_hat; the DDPM posterior mean
  (Eq. 2) is applied with x0_hat held fixed for s = t, ..., t1+1, which is linear in
  (z_t, x0_hat) and taken in closed form (no loop with a data-dependent trip count);
  a second call at t1 and Eq. 9.

Each returns an :class:`X0Estimate` whose ``eps`` is the denoiser output at t, so a
training step reuses it for L_DM (Eq. 3) instead of calling the denoiser again: the
midpoint variants make exactly two denoiser calls in all.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from facediff.diffusion import schedules
from facediff.diffusion.schedules import NoiseSchedule

EpsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


class X0Estimate(NamedTuple):
  x0: jax.Array  # z0*, the estimate of the clean sample
  eps: jax.Array  # the denoiser's output at (z_t, t), for the L_DM term
  t1: jax.Array  # the intermediate timestep (equal to t for one_step)


def _as_t(t: Any, z_t: jax.Array, schedule: NoiseSchedule) -> jax.Array:
  schedules.check_timesteps(t, schedule.num_train_timesteps)
  t = jnp.asarray(t, jnp.int32)
  return jnp.broadcast_to(t, (z_t.shape[0],)) if t.ndim == 0 else t


def one_step_x0(
  eps_fn: EpsFn, schedule: NoiseSchedule, z_t: jax.Array, t: Any, cond: Any = None
) -> X0Estimate:
  """DiffSFSR Eq. 1 inverted: z0* = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
  t = _as_t(t, z_t, schedule)
  eps = eps_fn(z_t, t, cond)
  return X0Estimate(schedules.predict_x0(schedule, z_t, t, eps), eps, t)


def midpoint_jump(
  schedule: NoiseSchedule, z_t: jax.Array, t: jax.Array, t1: jax.Array, eps: jax.Array
) -> jax.Array:
  """DiffSFSR Eq. 8 (DiffSwap's midpoint step):
  z_{t1} = (z_t - sqrt(1 - abar_t / abar_t1) eps) / sqrt(abar_t / abar_t1)."""
  abar = schedule.alphas_cumprod
  ratio = schedules.gather(abar, t, z_t) / schedules.gather(abar, t1, z_t)
  return (z_t - jnp.sqrt(jnp.maximum(1.0 - ratio, 0.0)) * eps) / jnp.sqrt(ratio)


def second_call_x0(
  eps_fn: EpsFn, schedule: NoiseSchedule, z_t1: jax.Array, t1: jax.Array, cond: Any
) -> jax.Array:
  """DiffSFSR Eq. 9: z0* = (z_t1 - sqrt(1 - abar_t1) eps(z_t1, t1)) / sqrt(abar_t1)."""
  return schedules.predict_x0(schedule, z_t1, t1, eps_fn(z_t1, t1, cond))


def midpoint_x0(
  eps_fn: EpsFn, schedule: NoiseSchedule, z_t: jax.Array, t: Any, cond: Any = None
) -> X0Estimate:
  """DiffSwap's midpoint sampling: Eq. 8 to t1 = floor(t/2), then Eq. 9."""
  t = _as_t(t, z_t, schedule)
  t1 = t // 2
  eps = eps_fn(z_t, t, cond)
  z_t1 = midpoint_jump(schedule, z_t, t, t1, eps)
  return X0Estimate(second_call_x0(eps_fn, schedule, z_t1, t1, cond), eps, t1)


def improved_midpoint_x0(
  eps_fn: EpsFn, schedule: NoiseSchedule, z_t: jax.Array, t: Any, cond: Any = None
) -> X0Estimate:
  """DiffSFSR section 3.3, improved midpoint sampling.

  eps = eps(z_t, t); x0_hat = Eq. 1 inverted; z_{t1} = A z_t + B x0_hat, the closed
  form of Eq. 2's posterior mean applied for s = t, ..., t1+1 with x0_hat fixed
  (``schedules.posterior_chain``); then Eq. 9 with a second call at t1 = floor(t/2).
  """
  t = _as_t(t, z_t, schedule)
  t1 = t // 2
  eps = eps_fn(z_t, t, cond)
  x0_hat = schedules.predict_x0(schedule, z_t, t, eps)
  a, b = schedules.posterior_chain(schedule, t, t1)
  z_t1 = schedules.expand_to(a, z_t) * z_t + schedules.expand_to(b, z_t) * x0_hat
  return X0Estimate(second_call_x0(eps_fn, schedule, z_t1, t1, cond), eps, t1)


ESTIMATORS: dict[str, Callable[..., X0Estimate]] = {
  "one_step": one_step_x0,
  "midpoint": midpoint_x0,
  "improved_midpoint": improved_midpoint_x0,
}


def estimate_x0(
  name: str, eps_fn: EpsFn, schedule: NoiseSchedule, z_t: jax.Array, t: Any, cond: Any = None
) -> X0Estimate:
  """Dispatches to an estimator by name (a config string)."""
  if name not in ESTIMATORS:
    raise ValueError(
      f"x0_estimator: unknown estimator {name!r}; expected one of {sorted(ESTIMATORS)}"
    )
  return ESTIMATORS[name](eps_fn, schedule, z_t, t, cond)
