"""Samplers: whole reverse trajectories as one compiled program.

Every sampler takes a denoiser ``eps_fn(x, t, cond) -> eps`` (``x`` of shape (B, ...),
``t`` int32 of shape (B,), ``cond`` a pytree batched on axis 0 or None) and runs the
whole trajectory as a single ``lax.scan``: the per-step bookkeeping of each method
(which timestep feeds the denoiser, which timesteps the update goes between, the
linear-multistep weights of PNDM) is computed once on the host into small tables,
so the device program has no Python loop and no data-dependent control flow.

Methods:
  * ``ddpm``: ancestral sampling with the posterior of DiffSFSR Eq. 2 (``fixed_small``
    variance), over all T steps or a strided subset.
  * ``ddim``: DDIM with ``eta`` (0 is deterministic).
  * ``pndm``: pseudo linear multistep as Stable Diffusion runs it (``skip_prk_steps``:
    PLMS only, one Heun-like warm-up step), or the original PNDM with four Runge-Kutta
    warm-up steps (``skip_prk_steps=False``).

Timestep conventions (spacing, ``steps_offset``, the final alpha) follow the
reference PyTorch schedulers so that trajectories agree with them numerically.

Classifier-free guidance is an option of every sampler: with ``guidance_scale`` and
``uncond`` given, the conditional and unconditional calls are batched into one
denoiser call per step, ``eps = eps_u + s (eps_c - eps_u)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from facediff.diffusion.schedules import NoiseSchedule, check_timesteps

EpsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

METHODS = ("ddpm", "ddim", "pndm")
SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------
# Host-side timestep tables.


def make_timesteps(
  num_train_timesteps: int, num_steps: int, *, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
  """Descending inference timesteps (int64) for ``num_steps`` of ``T`` train steps.

  ``leading``: 0, r, 2r, ... (r = T // n) plus ``steps_offset``, reversed.
  ``trailing``: T - 1 downwards in steps of T / n.  ``linspace``: n points on [0, T-1].
  """
  T = int(num_train_timesteps)
  if spacing not in SPACINGS:
    raise ValueError(f"timestep_spacing: unknown spacing {spacing!r}; expected one of {SPACINGS}")
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
  if num_steps > T:
    raise ValueError(f"num_steps: {num_steps} is more than the {T} training timesteps")
  if spacing == "leading":
    ts = (np.arange(num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + steps_offset
  elif spacing == "trailing":
    ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
  else:
    ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
  if ts.max() >= T or ts.min() < 0:
    raise ValueError(
      f"steps_offset: {steps_offset} puts timesteps outside [0, {T}) for num_steps={num_steps}"
    )
  return ts.copy()


@dataclasses.dataclass(frozen=True)
class _Program:
  """Per-step tables of one trajectory (host numpy, one row per denoiser call)."""

  t_model: np.ndarray  # timestep fed to the denoiser
  t_from: np.ndarray  # the transfer goes from t_from ...
  t_to: np.ndarray  # ... to t_to (negative: the final alpha)
  # PNDM bookkeeping (unused by ddpm/ddim), in the PNDM paper's terms: e_t are the noise
  # estimates, PRK the pseudo Runge-Kutta warm-up, PLMS the pseudo linear multistep
  # steps, phi the transfer x_t -> x_{t-delta} given a combined noise estimate e'.
  store_eps: np.ndarray | None = None  # 1: push this call's e_t onto the e_t history
  w_eps: np.ndarray | None = None  # weight of this call's e_t in e'
  w_rk_sum: np.ndarray | None = None  # weight of the running PRK sum in e'
  w_eps_history: np.ndarray | None = None  # (n, 4) PLMS weights of the history, newest first
  rk_sum_keep: np.ndarray | None = None  # PRK sum' = rk_sum_keep * sum + rk_sum_add * e_t
  rk_sum_add: np.ndarray | None = None
  save_x: np.ndarray | None = None  # 1: remember this x_t as the start of a PRK step
  from_saved_x: np.ndarray | None = None  # 1: phi starts from the remembered x_t


def _ddpm_program(T: int, timesteps: np.ndarray) -> _Program:
  # The step from timesteps[i] goes to timesteps[i+1]; the last one to the clean sample.
  t_to = np.concatenate([timesteps[1:], [-1]])
  return _Program(t_model=timesteps, t_from=timesteps, t_to=t_to)


def _ddim_program(T: int, timesteps: np.ndarray, num_steps: int) -> _Program:
  return _Program(t_model=timesteps, t_from=timesteps, t_to=timesteps - T // num_steps)


def _pndm_program(
  T: int, num_steps: int, spacing: str, steps_offset: int, skip_prk_steps: bool
) -> _Program:
  """Replays the PNDM scheduler's bookkeeping symbolically into per-step weights."""
  if spacing == "leading":
    base_ts = (np.arange(num_steps) * (T // num_steps)).round().astype(np.int64) + steps_offset
  elif spacing == "trailing":
    base_ts = np.round(np.arange(T, 0, -T / num_steps))[::-1].astype(np.int64) - 1
  else:
    base_ts = np.linspace(0, T - 1, num_steps).round().astype(np.int64)
  if base_ts.max() >= T or base_ts.min() < 0:
    raise ValueError(
      f"steps_offset: {steps_offset} puts timesteps outside [0, {T}) for num_steps={num_steps}"
    )
  ratio = T // num_steps
  if skip_prk_steps:
    if num_steps < 2:
      raise ValueError("num_steps: PNDM/PLMS needs at least 2 steps")
    prk = np.array([], np.int64)
    plms = np.concatenate([base_ts[:-1], base_ts[-2:-1], base_ts[-1:]])[::-1]
  else:
    if num_steps < 4:
      raise ValueError("num_steps: PNDM with Runge-Kutta warm-up needs at least 4 steps")
    prk = np.array(base_ts[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    plms = base_ts[:-3][::-1]
  n = len(prk) + len(plms)
  cols = {
    k: np.zeros(n)
    for k in (
      "store_eps",
      "w_eps",
      "w_rk_sum",
      "rk_sum_add",
      "rk_sum_keep",
      "save_x",
      "from_saved_x",
    )
  }
  eps_history_weights = np.zeros((n, 4))
  t_model = np.concatenate([prk, plms]).astype(np.int64)
  t_from = np.zeros(n, np.int64)
  t_to = np.zeros(n, np.int64)
  counter, n_ets = 0, 0
  for i in range(n):
    ts = int(t_model[i])
    if i < len(prk):  # Runge-Kutta warm-up (the scheduler's step_prk)
      t_to[i] = ts - (0 if counter % 2 else ratio // 2)
      t_from[i] = prk[counter // 4 * 4]
      phase = counter % 4
      cols["from_saved_x"][i] = 1.0  # every RK stage restarts from the stage's base sample
      cols["rk_sum_keep"][i] = 1.0
      if phase == 0:
        cols["rk_sum_add"][i] = 1 / 6
        cols["store_eps"][i] = 1.0
        n_ets = min(n_ets + 1, 4)
        cols["save_x"][i] = 1.0
        cols["w_eps"][i] = 1.0
      elif phase in (1, 2):
        cols["rk_sum_add"][i] = 1 / 3
        cols["w_eps"][i] = 1.0
      else:
        cols["w_rk_sum"][i] = 1.0
        cols["w_eps"][i] = 1 / 6
        cols["rk_sum_keep"][i] = 0.0
    else:  # linear multistep (the scheduler's step_plms)
      t_from[i], t_to[i] = ts, ts - ratio
      if counter != 1:
        cols["store_eps"][i] = 1.0
        n_ets = min(n_ets + 1, 4)
      else:
        t_from[i], t_to[i] = ts + ratio, ts
      if n_ets == 1 and counter == 0:
        cols["w_eps"][i] = 1.0
        cols["save_x"][i] = 1.0
      elif n_ets == 1 and counter == 1:
        cols["w_eps"][i] = 0.5
        eps_history_weights[i, 0] = 0.5
        cols["from_saved_x"][i] = 1.0
      elif n_ets == 2:
        eps_history_weights[i, :2] = [3 / 2, -1 / 2]
      elif n_ets == 3:
        eps_history_weights[i, :3] = [23 / 12, -16 / 12, 5 / 12]
      else:
        eps_history_weights[i, :4] = [55 / 24, -59 / 24, 37 / 24, -9 / 24]
    counter += 1
  return _Program(
    t_model=t_model, t_from=t_from, t_to=t_to, w_eps_history=eps_history_weights, **cols
  )


# ---------------------------------------------------------------------------
# Guidance.


def _concat_tree(a: Any, b: Any) -> Any:
  def cat(u, v):
    u, v = jnp.asarray(u), jnp.asarray(v)
    if u.shape[0] != v.shape[0] and u.shape[0] == 1:
      u = jnp.broadcast_to(u, (v.shape[0],) + u.shape[1:])
    return jnp.concatenate([u, v], axis=0)

  return jax.tree.map(cat, a, b)


def guided_eps_fn(
  eps_fn: EpsFn, cond: Any, uncond: Any = None, guidance_scale: float | None = None
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Binds the condition; with guidance, batches [uncond; cond] into one call.

  ``uncond`` may have batch 1 (broadcast to the batch of ``cond``). Returns
  ``f(x, t) -> eps_u + s (eps_c - eps_u)``.
  """
  if guidance_scale is None:
    return lambda x, t: eps_fn(x, t, cond)
  if uncond is None:
    raise ValueError("uncond: classifier-free guidance needs an unconditional condition")
  both = _concat_tree(uncond, cond)

  def f(x, t):
    e = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    e_u, e_c = jnp.split(e, 2)
    return e_u + guidance_scale * (e_c - e_u)

  return f


# ---------------------------------------------------------------------------
# The samplers.


def _alpha(schedule: NoiseSchedule, t: jax.Array, final_alpha: float | jax.Array) -> jax.Array:
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], final_alpha)


def _maybe_clip(x0: jax.Array, clip_sample: float | None) -> jax.Array:
  return x0 if clip_sample is None else jnp.clip(x0, -clip_sample, clip_sample)


def _ddpm_update(*, x, eps, x0, t, a_t, a_prev, z):
  """Ancestral step: DiffSFSR Eq. 2's posterior with the (strided) step's effective
  beta = 1 - abar_t / abar_prev, plus sqrt(beta_tilde) noise except at t = 0 (``eps``
  unused: the step is written in x0)."""
  alpha_t = a_t / a_prev
  beta_t = 1.0 - alpha_t
  mean = (jnp.sqrt(a_prev) * beta_t / (1.0 - a_t)) * x0 + (
    jnp.sqrt(alpha_t) * (1.0 - a_prev) / (1.0 - a_t)
  ) * x
  var = jnp.maximum((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
  return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * z


def _ddim_update(*, x, eps, x0, t, a_t, a_prev, z, eta):
  """DDIM step with stochasticity eta (noise added only when eta > 0; ``x`` and ``t``
  unused: the step is written in x0 and eps)."""
  var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
  std = eta * jnp.sqrt(var)
  x_new = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std**2) * eps
  return x_new + std * z if eta > 0 else x_new


def _noise_seq(
  key: jax.Array | None, noise: jax.Array | None, n: int, x: jax.Array, needed: bool, method: str
) -> jax.Array:
  if noise is not None:
    noise = jnp.asarray(noise, x.dtype)
    if noise.shape != (n,) + x.shape:
      raise ValueError(f"noise: expected shape {(n,) + x.shape} for {method}, got {noise.shape}")
    return noise
  if not needed:
    return jnp.zeros((n,) + (1,) * x.ndim, x.dtype)
  if key is None:
    raise ValueError(f"key: {method} with stochastic steps needs a PRNG key (or noise=...)")
  return jax.random.normal(key, (n,) + x.shape, x.dtype)


def _timesteps_int32(values: np.ndarray) -> jax.Array:
  return jnp.asarray(values, jnp.int32)


def _weights_float32(values: np.ndarray) -> jax.Array:
  return jnp.asarray(values, jnp.float32)


def _ancestral_scan(f, schedule, x_T, prog: _Program, noises, update, last_alpha, clip_sample):
  """DDPM / DDIM: each step predicts x0 from one denoiser call, then ``update`` moves
  x_t to x_{t_prev} (``_ddpm_update`` or ``_ddim_update``)."""
  batch = x_T.shape[0]

  def step(x, inputs):
    t, t_prev, z = inputs
    eps = f(x, jnp.full((batch,), t, jnp.int32))
    a_t = _alpha(schedule, t, 1.0)
    a_prev = _alpha(schedule, t_prev, last_alpha)
    x0 = _maybe_clip((x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t), clip_sample)
    x_new = update(x=x, eps=eps, x0=x0, t=t, a_t=a_t, a_prev=a_prev, z=z)
    return x_new, x_new

  xs = (_timesteps_int32(prog.t_model), _timesteps_int32(prog.t_to), noises)
  return jax.lax.scan(step, x_T, xs)


def _pndm_scan(f, schedule, x_T, prog: _Program, final_alpha):
  """PNDM: each call's noise estimate e_t is combined with the PRK running sum and
  the PLMS history into e' by the host-computed weights, then the transfer phi moves
  the sample (PNDM paper, Eq. 11's transfer; SD's PLMS when PRK is skipped)."""
  batch = x_T.shape[0]

  def step(carry, inputs):
    x, saved_x, rk_sum, eps_history = carry
    (
      t,
      t_from,
      t_to,
      store_eps,
      w_eps,
      w_rk_sum,
      w_eps_history,
      rk_sum_keep,
      rk_sum_add,
      save_x,
      from_saved_x,
    ) = inputs
    eps = f(x, jnp.full((batch,), t, jnp.int32))
    pushed = jnp.concatenate([eps[None], eps_history[:3]])
    eps_history = jnp.where(store_eps > 0, pushed, eps_history)
    eps_combined = (
      w_eps * eps + w_rk_sum * rk_sum + jnp.tensordot(w_eps_history, eps_history, axes=1)
    )
    rk_sum = rk_sum_keep * rk_sum + rk_sum_add * eps
    saved_x = jnp.where(save_x > 0, x, saved_x)
    start = jnp.where(from_saved_x > 0, saved_x, x)
    a_t = _alpha(schedule, t_from, final_alpha)
    a_prev = _alpha(schedule, t_to, final_alpha)
    # The transfer phi from t_from to t_to with the combined noise estimate.
    denom = a_t * jnp.sqrt(1.0 - a_prev) + jnp.sqrt(a_t * (1.0 - a_t) * a_prev)
    x_new = jnp.sqrt(a_prev / a_t) * start - (a_prev - a_t) * eps_combined / denom
    return (x_new, saved_x, rk_sum, eps_history), x_new

  xs = (
    _timesteps_int32(prog.t_model),
    _timesteps_int32(prog.t_from),
    _timesteps_int32(prog.t_to),
    _weights_float32(prog.store_eps),
    _weights_float32(prog.w_eps),
    _weights_float32(prog.w_rk_sum),
    _weights_float32(prog.w_eps_history),
    _weights_float32(prog.rk_sum_keep),
    _weights_float32(prog.rk_sum_add),
    _weights_float32(prog.save_x),
    _weights_float32(prog.from_saved_x),
  )
  zeros = jnp.zeros_like(x_T)
  carry0 = (x_T, zeros, zeros, jnp.zeros((4,) + x_T.shape, x_T.dtype))
  (x_final, *_), trajectory = jax.lax.scan(step, carry0, xs)
  return x_final, trajectory


def sample(
  eps_fn: EpsFn,
  schedule: NoiseSchedule,
  x_T: jax.Array,
  *,
  method: str = "pndm",
  num_steps: int | None = 50,
  key: jax.Array | None = None,
  noise: jax.Array | None = None,
  eta: float = 0.0,
  steps_offset: int = 0,
  timestep_spacing: str = "leading",
  set_alpha_to_one: bool | None = None,
  clip_sample: float | None = None,
  skip_prk_steps: bool = True,
  cond: Any = None,
  uncond: Any = None,
  guidance_scale: float | None = None,
  return_trajectory: bool = False,
):
  """Runs a reverse trajectory from ``x_T`` as one ``lax.scan``.

  Args:
    eps_fn: denoiser ``(x, t, cond) -> eps``.
    schedule: the training noise schedule.
    x_T: initial noise (B, ...).
    method: "ddpm", "ddim" or "pndm".
    num_steps: inference steps (None: all T steps; only for ddpm/ddim).
    key: PRNG key for stochastic steps (ddpm; ddim with eta > 0).
    noise: instead of ``key``, the per-step noise, shape (num_calls, *x_T.shape).
    eta: DDIM's stochasticity.
    steps_offset, timestep_spacing: timestep placement (see make_timesteps).
    set_alpha_to_one: alpha_bar after the last step; default as the reference
      schedulers: True for ddim, False (alpha_bar_0) for pndm; ddpm always ends at 1.
    clip_sample: clip predicted x0 to [-c, c] (ddpm, ddim); None disables.
    skip_prk_steps: PNDM only; True is Stable Diffusion's PLMS.
    cond, uncond, guidance_scale: condition and classifier-free guidance.
    return_trajectory: also return the sample after every denoiser call, (n, B, ...).

  Returns:
    The final sample, or (final, trajectory).
  """
  if method not in METHODS:
    raise ValueError(f"method: unknown sampler {method!r}; expected one of {METHODS}")
  T = schedule.num_train_timesteps
  if num_steps is None:
    if method == "pndm":
      raise ValueError("num_steps: pndm needs an explicit number of steps")
    num_steps = T
  if method == "pndm":
    prog = _pndm_program(
      T, _check_steps(num_steps, T), timestep_spacing, steps_offset, skip_prk_steps
    )
    final_alpha = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
  else:
    ts = make_timesteps(T, num_steps, spacing=timestep_spacing, steps_offset=steps_offset)
    if method == "ddpm":
      prog = _ddpm_program(T, ts)
      final_alpha = 1.0
    else:
      prog = _ddim_program(T, ts, num_steps)
      final_alpha = (
        1.0 if (set_alpha_to_one is None or set_alpha_to_one) else schedule.alphas_cumprod[0]
      )
  check_timesteps(prog.t_model, T, "timesteps")
  if eta < 0:
    raise ValueError(f"eta: must be >= 0, got {eta}")

  f = guided_eps_fn(eps_fn, cond, uncond, guidance_scale)
  x_T = jnp.asarray(x_T)
  n = len(prog.t_model)
  stochastic = method == "ddpm" or (method == "ddim" and eta > 0)
  noises = _noise_seq(key, noise, n, x_T, stochastic, method)
  if method == "pndm":
    x_final, traj = _pndm_scan(f, schedule, x_T, prog, final_alpha)
  else:
    last_alpha = 1.0 if method == "ddpm" else final_alpha
    update = _ddpm_update if method == "ddpm" else functools.partial(_ddim_update, eta=eta)
    x_final, traj = _ancestral_scan(f, schedule, x_T, prog, noises, update, last_alpha, clip_sample)
  return (x_final, traj) if return_trajectory else x_final


def _check_steps(num_steps: Any, T: int) -> int:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
  if num_steps > T:
    raise ValueError(f"num_steps: {num_steps} is more than the {T} training timesteps")
  return int(num_steps)


def num_denoiser_calls(method: str, num_steps: int, *, skip_prk_steps: bool = True) -> int:
  """How many denoiser calls a trajectory makes (PLMS adds one warm-up call)."""
  if method not in METHODS:
    raise ValueError(f"method: unknown sampler {method!r}; expected one of {METHODS}")
  if method != "pndm":
    return num_steps
  return num_steps + 1 if skip_prk_steps else num_steps + 9


def compile_sampler(apply_fn: Callable[..., jax.Array], schedule: NoiseSchedule, **options):
  """A jitted sampler over a parametrised denoiser.

  ``apply_fn(params, x, t, cond) -> eps``. Returns ``run(params, x_T, key=None,
  cond=None, uncond=None)``; params stay arguments (not constants baked into the
  program), so one compilation serves every checkpoint of the same shapes.
  """
  if "guidance_scale" not in options:
    options["guidance_scale"] = None

  @jax.jit
  def run(params, x_T, key=None, cond=None, uncond=None):
    return sample(
      lambda x, t, c: apply_fn(params, x, t, c),
      schedule,
      x_T,
      key=key,
      cond=cond,
      uncond=uncond,
      **options,
    )

  return run
