"""TGDM's training objective (TGDM Sec. 4.3 "Objectives", Eq. 18-21, and Sec. 5.1).

L = lambda_simple L_simple + g (lambda_rec L_rec + lambda_p L_p), lambda = (10, 1, 1),

with g the loss gate of Sec. 5.1: "only MSE loss of noise is used at the beginning of the
training. Only when it has been decreased below 0.05, MSE loss of image, and LPIPS loss
then start to work". The gate is state carried by the trainer (``update_gate``), not a
function of one batch.

Norms: Eq. 18 and 19 are written as ||.||_2, while Sec. 5.1 calls both terms "MSE loss"
and compares the noise one with 0.05; we take both as mean squared errors (the DDPM
L_simple), averaged over every pixel, channel and example. The face-swap model (Sec. 4.4)
is trained with the same Eq. 21.

Clipping: the one-step estimate Z0_hat of Eq. 5 divides by sqrt(abar_t), which is
0.006 at t = T - 1 of the linear schedule, so an untrained eps_hat makes Z0_hat
(and L_rec) explode (~1e3 at init). The paper is silent on this; facediff clips Z0_hat
to the image range [-1, 1] before L_rec and LPIPS (``clip_x0``, as DDPM/DDIM samplers
clip their x0 prediction), which bounds L_rec by 4 and keeps LPIPS in its input range.
The gradient of L_rec and LPIPS is then zero at pixels where Z0_hat is outside [-1, 1];
L_simple still trains eps there.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from facediff.diffusion import NoiseSchedule, predict_x0, q_sample
from facediff.losses import lpips as lpips_loss_lib
from facediff.models import lpips as lpips_model

LAMBDA_SIMPLE = 10.0
LAMBDA_REC = 1.0
LAMBDA_P = 1.0
GATE_THRESHOLD = 0.05
X0_CLIP = 1.0


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean squared error over every element, float32."""
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def total_loss(
  l_simple: jax.Array,
  l_rec: jax.Array,
  l_p: jax.Array,
  gate: jax.Array,
  lambda_simple: float = LAMBDA_SIMPLE,
  lambda_rec: float = LAMBDA_REC,
  lambda_p: float = LAMBDA_P,
) -> jax.Array:
  """TGDM Eq. 21 with the Sec. 5.1 gate g in {0, 1}:
  L = lambda_simple L_simple + g (lambda_rec L_rec + lambda_p L_p)."""
  g = jnp.asarray(gate, jnp.float32)
  return lambda_simple * l_simple + g * (lambda_rec * l_rec + lambda_p * l_p)


def update_gate(gate: jax.Array, l_simple: jax.Array, threshold: float = GATE_THRESHOLD):
  """TGDM Sec. 5.1: the image losses switch on once the noise MSE is below ``threshold``
  (0.05 in the paper) and stay on: g' = max(g, [L_simple < threshold]), int32."""
  below = (jnp.asarray(l_simple) < threshold).astype(jnp.int32)
  return jnp.maximum(jnp.asarray(gate, jnp.int32), below)


def sample_t_and_noise(rng: jax.Array, x0: jax.Array, num_train_timesteps: int):
  """t ~ U{0, ..., T-1} per example and eps ~ N(0, I) shaped like ``x0``."""
  k_t, k_n = jax.random.split(rng)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, num_train_timesteps)
  return t, jax.random.normal(k_n, x0.shape, jnp.float32)


def tgdm_loss(
  eps_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
  schedule: NoiseSchedule,
  x0: jax.Array,
  cond: Any,
  rng: jax.Array | None,
  *,
  gate: jax.Array,
  lpips_params: Any,
  lpips_config: lpips_model.LPIPSConfig | None = None,
  lambda_simple: float = LAMBDA_SIMPLE,
  lambda_rec: float = LAMBDA_REC,
  lambda_p: float = LAMBDA_P,
  t: jax.Array | None = None,
  noise: jax.Array | None = None,
  clip_x0: float | None = X0_CLIP,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TGDM Eq. 18-21 on a batch of targets ``x0`` = I_d (B, H, W, 3) in [-1, 1].

  Z_t = sqrt(abar_t) I_d + sqrt(1 - abar_t) eps (Eq. 2); eps_hat = eps_fn(Z_t, t, cond);
  L_simple = mse(eps, eps_hat) (Eq. 18); Z0_hat = (Z_t - sqrt(1 - abar_t) eps_hat) /
  sqrt(abar_t) (Eq. 5; the paper's alpha_t there is the cumulative abar_t of Eq. 2),
  clipped to [-clip_x0, clip_x0] (facediff's choice, see the module docstring; None
  disables); L_rec = mse(Z0_hat, I_d) (Eq. 19); L_p = LPIPS(Z0_hat, I_d) (Eq. 20, the
  LPIPS distance of the paper's ref. [95], batch mean, frozen ``lpips_params``); total by
  ``total_loss``.

  ``gate`` (0/1, from the trainer's state) selects the image terms; while it is 0 the
  LPIPS network is not run (``lax.cond``) and ``lpips`` is reported as 0; L_rec is cheap
  and always reported. ``t`` / ``noise`` override the draws from ``rng`` (tests).
  Returns (loss, metrics) with metrics ``l_simple``, ``l_rec``, ``lpips``, ``gate``.
  """
  if t is None or noise is None:
    t_draw, noise_draw = sample_t_and_noise(rng, x0, schedule.num_train_timesteps)
    t = t_draw if t is None else t
    noise = noise_draw if noise is None else noise
  x_t = q_sample(schedule, x0, t, noise)
  eps = eps_fn(x_t, t, cond)
  l_simple = mse(noise, eps)
  x0_hat = predict_x0(schedule, x_t, t, eps)
  if clip_x0 is not None:
    x0_hat = jnp.clip(x0_hat, -clip_x0, clip_x0)
  l_rec = mse(x0_hat, x0)
  on = jnp.asarray(gate) > 0
  l_p = jax.lax.cond(
    on,
    lambda a, b: lpips_loss_lib.lpips_loss(lpips_params, a, b, lpips_config),
    lambda a, b: jnp.zeros((), jnp.float32),
    x0_hat,
    x0.astype(jnp.float32),
  )
  loss = total_loss(l_simple, l_rec, l_p, on, lambda_simple, lambda_rec, lambda_p)
  metrics = {"l_simple": l_simple, "l_rec": l_rec, "lpips": l_p, "gate": on.astype(jnp.float32)}
  return loss, metrics
