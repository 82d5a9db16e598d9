"""Noise schedules and the closed-form quantities of the DDPM forward process.

Timesteps are 0-based, ``t in [0, T)``, as in diffusers and the SD checkpoints:
``alphas_cumprod[t]`` is the paper's ``alpha_bar_{t+1}``. The step "before" ``t = 0``
is the clean sample, with ``alpha_bar = 1``.

A :class:`NoiseSchedule` is a pytree of float32 tables (computed in float64 on the
host, then cast), so it can be passed into jitted functions as an argument or
closed over as a constant.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear")


@flax.struct.dataclass
class NoiseSchedule:
  """Per-timestep tables of a discrete diffusion process (all shape ``(T,)``).

  Attributes:
    betas: beta_t.
    alphas: 1 - beta_t.
    alphas_cumprod: alpha_bar_t = prod_{s<=t} alpha_s.
    alphas_cumprod_prev: alpha_bar_{t-1}, with 1 for t = 0.
    posterior_variance: beta_tilde_t of DiffSFSR Eq. 2.
    posterior_mean_coef_x0, posterior_mean_coef_xt: the two coefficients of
      mu_tilde_t(x_t, x_0) in DiffSFSR Eq. 2.
    log_chain: cumulative sum of log(posterior_mean_coef_xt), with 0 for t = 0;
      used for the closed form of repeated posterior-mean steps.
  """

  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  posterior_variance: jax.Array
  posterior_mean_coef_x0: jax.Array
  posterior_mean_coef_xt: jax.Array
  log_chain: jax.Array

  @property
  def num_train_timesteps(self) -> int:
    return int(self.betas.shape[0])


def make_betas(
  name: str, num_train_timesteps: int, beta_start: float, beta_end: float
) -> np.ndarray:
  """Beta tables in float64.

  ``linear``: evenly spaced betas (DDPM; TGDM uses 1e-4 .. 0.02, T = 1000).
  ``scaled_linear``: evenly spaced sqrt(beta), squared (Stable Diffusion:
  0.00085 .. 0.012, T = 1000).
  """
  if name not in SCHEDULES:
    raise ValueError(f"schedule: unknown schedule {name!r}; expected one of {SCHEDULES}")
  if int(num_train_timesteps) < 1:
    raise ValueError(f"num_train_timesteps: must be >= 1, got {num_train_timesteps}")
  if not (0.0 < beta_start <= beta_end < 1.0):
    raise ValueError(
      f"beta_start/beta_end: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
    )
  if name == "linear":
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
  return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2


def schedule_from_betas(betas: Any) -> NoiseSchedule:
  """Derives every table from a beta sequence (float64 host math, float32 result)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size < 1:
    raise ValueError(f"betas: expected a non-empty 1-D array, got shape {betas.shape}")
  alphas = 1.0 - betas
  acp = np.cumprod(alphas)
  acp_prev = np.concatenate([[1.0], acp[:-1]])
  one_minus = 1.0 - acp
  # DiffSFSR Eq. 2 coefficients.
  coef_x0 = np.sqrt(acp_prev) * betas / one_minus
  coef_xt = np.sqrt(alphas) * (1.0 - acp_prev) / one_minus
  var = (1.0 - acp_prev) / one_minus * betas
  # coef_xt[0] = 0 (the chain ends at x0); log of it is only ever needed for t >= 1.
  log_c = np.log(np.where(coef_xt > 0, coef_xt, 1.0))
  log_chain = np.concatenate([[0.0], np.cumsum(log_c[1:])])
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
  return NoiseSchedule(
    betas=f32(betas),
    alphas=f32(alphas),
    alphas_cumprod=f32(acp),
    alphas_cumprod_prev=f32(acp_prev),
    posterior_variance=f32(var),
    posterior_mean_coef_x0=f32(coef_x0),
    posterior_mean_coef_xt=f32(coef_xt),
    log_chain=f32(log_chain),
  )


def make_schedule(
  name: str = "scaled_linear",
  num_train_timesteps: int = 1000,
  beta_start: float | None = None,
  beta_end: float | None = None,
) -> NoiseSchedule:
  """Builds a named schedule. Defaults: SD's (0.00085, 0.012) for ``scaled_linear``,
  DDPM/TGDM's (1e-4, 0.02) for ``linear``."""
  defaults = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
  if name not in defaults:
    raise ValueError(f"schedule: unknown schedule {name!r}; expected one of {SCHEDULES}")
  bs, be = defaults[name]
  return schedule_from_betas(
    make_betas(
      name,
      num_train_timesteps,
      bs if beta_start is None else beta_start,
      be if beta_end is None else beta_end,
    )
  )


# ---------------------------------------------------------------------------
# Per-example gathers and the forward process.


def check_timesteps(t: Any, num_train_timesteps: int, name: str = "t") -> None:
  """Raises ValueError if concrete timesteps fall outside [0, T).

  Traced values (inside jit) cannot be checked and are clipped by the gathers.
  """
  if isinstance(t, jax.core.Tracer):
    return
  arr = np.asarray(t)
  if arr.size and (arr.min() < 0 or arr.max() >= num_train_timesteps):
    raise ValueError(
      f"{name}: timesteps must lie in [0, {num_train_timesteps}), got range "
      f"[{arr.min()}, {arr.max()}]"
    )


def expand_to(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-example vector (B,) or scalar to broadcast against x (B, ...)."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)).astype(x.dtype)


def gather(table: jax.Array, t: Any, x: jax.Array) -> jax.Array:
  """table[t] shaped to broadcast against x; t is a scalar or (B,) int array."""
  return expand_to(jnp.take(table, jnp.asarray(t, jnp.int32), mode="clip"), x)


def alpha_bar(schedule: NoiseSchedule, t: Any) -> jax.Array:
  """alpha_bar_t with the convention alpha_bar_{-1} = 1 (t = -1 is the clean sample)."""
  t = jnp.asarray(t, jnp.int32)
  return jnp.where(t >= 0, jnp.take(schedule.alphas_cumprod, jnp.maximum(t, 0)), 1.0)


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: Any, noise: jax.Array) -> jax.Array:
  """DiffSFSR Eq. 1: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
  check_timesteps(t, schedule.num_train_timesteps)
  ab = gather(schedule.alphas_cumprod, t, x0)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def predict_x0(schedule: NoiseSchedule, x_t: jax.Array, t: Any, eps: jax.Array) -> jax.Array:
  """Eq. 1 inverted: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
  check_timesteps(t, schedule.num_train_timesteps)
  ab = gather(schedule.alphas_cumprod, t, x_t)
  return (x_t - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)


def predict_eps(schedule: NoiseSchedule, x_t: jax.Array, t: Any, x0: jax.Array) -> jax.Array:
  """Eq. 1 solved for the noise: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
  check_timesteps(t, schedule.num_train_timesteps)
  ab = gather(schedule.alphas_cumprod, t, x_t)
  return (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)


def posterior_mean(schedule: NoiseSchedule, x_t: jax.Array, t: Any, x0: jax.Array) -> jax.Array:
  """DiffSFSR Eq. 2: mu_tilde_t(x_t, x_0) = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
  + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t."""
  check_timesteps(t, schedule.num_train_timesteps)
  return (
    gather(schedule.posterior_mean_coef_x0, t, x_t) * x0
    + gather(schedule.posterior_mean_coef_xt, t, x_t) * x_t
  )


def posterior_variance(schedule: NoiseSchedule, t: Any) -> jax.Array:
  """DiffSFSR Eq. 2: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t."""
  check_timesteps(t, schedule.num_train_timesteps)
  return jnp.take(schedule.posterior_variance, jnp.asarray(t, jnp.int32), mode="clip")


def posterior_chain(schedule: NoiseSchedule, t: Any, t_end: Any) -> tuple[jax.Array, jax.Array]:
  """Closed form of repeated posterior-mean steps with x_0 held fixed.

  Applying Eq. 2's mean ``z_{s-1} = c0_s x_0 + c1_s z_s`` for s = t, t-1, ..., t_end+1
  is linear: ``z_{t_end} = A z_t + B x_0`` with

    A = prod_{s=t_end+1}^{t} c1_s = exp(log_chain[t] - log_chain[t_end]),
    B = sqrt(abar_{t_end}) - A sqrt(abar_t),

  the second because every step maps ``sqrt(abar_s) x_0`` to ``sqrt(abar_{s-1}) x_0``
  (c0_s + c1_s sqrt(abar_s) = sqrt(abar_{s-1})). ``t_end = -1`` continues to x_0
  itself (A = 0, B = 1). Requires t_end <= t. Returns per-example (A, B).
  """
  t = jnp.asarray(t, jnp.int32)
  t_end = jnp.asarray(t_end, jnp.int32)
  lc = schedule.log_chain
  a = jnp.exp(jnp.take(lc, t, mode="clip") - jnp.take(lc, jnp.maximum(t_end, 0), mode="clip"))
  a = jnp.where(t_end < 0, 0.0, a)
  a = jnp.where(t_end == t, 1.0, a)
  b = jnp.sqrt(alpha_bar(schedule, t_end)) - a * jnp.sqrt(alpha_bar(schedule, t))
  return a, b
