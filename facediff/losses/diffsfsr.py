"""DiffSFSR's training loss (Sec. 3.3, Eq. 3-7).

L = L_DM + lambda_1 L_id + lambda_2 L_exp (Eq. 7; the paper: lambda_1 = 0.003,
lambda_2 = 0.01). L_DM (Eq. 3) is the noise MSE at a uniformly drawn t; L_id (Eq. 5) is
1 - cosine between the identity embeddings of the generated image and the identity
source's, averaged over the compound's encoders; L_exp (Eq. 6) is the MSE of the
expression embeddings. The generated image is D(z0*), z0* from the configured
estimator (``facediff.diffusion.estimators``): the first denoiser call is shared with
L_DM, so a midpoint estimator makes exactly two denoiser calls per example.

The face encoders enter as functions ``identity_fn(image) -> [emb_i]`` and
``expression_fn(image) -> emb`` (frozen networks, aligned crops inside), and the
decoder as ``decode(z0) -> image``: this module holds the equations only.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from facediff.diffusion import estimators, schedules
from facediff.diffusion.schedules import NoiseSchedule

ESTIMATORS = ("improved_midpoint", "midpoint", "one_step", "none")


def identity_loss(generated: Sequence[jax.Array], target: Sequence[jax.Array]) -> jax.Array:
  """DiffSFSR Eq. 5: mean over the compound's encoders of 1 - cos(E(x), E(I_id)),
  averaged over the batch."""
  terms = []
  for g, s in zip(generated, target, strict=True):
    g = g.astype(jnp.float32)
    s = s.astype(jnp.float32)
    cos = jnp.sum(g * s, -1) / (jnp.linalg.norm(g, axis=-1) * jnp.linalg.norm(s, axis=-1) + 1e-8)
    terms.append(jnp.mean(1.0 - cos))
  return jnp.mean(jnp.stack(terms))


def expression_loss(generated: jax.Array, target: jax.Array) -> jax.Array:
  """DiffSFSR Eq. 6: mean squared error of the expression embeddings."""
  return jnp.mean((generated.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)


def diffsfsr_loss(
  eps_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
  schedule: NoiseSchedule,
  z0: jax.Array,
  cond: Any,
  rng: jax.Array,
  *,
  estimator: str = "improved_midpoint",
  lambda_id: float = 0.003,
  lambda_exp: float = 0.01,
  decode: Callable[[jax.Array], jax.Array] | None = None,
  identity_fn: Callable[[jax.Array], Sequence[jax.Array]] | None = None,
  expression_fn: Callable[[jax.Array], jax.Array] | None = None,
  target_id: Sequence[jax.Array] | None = None,
  target_exp: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(L, metrics) for one batch of clean latents ``z0`` (Eq. 7).

  ``t`` ~ U{0, ..., T-1} and the noise are drawn from ``rng``. With ``estimator`` =
  "none" (or both lambdas 0) only L_DM is computed (one denoiser call).
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator: unknown {estimator!r}; expected one of {ESTIMATORS}")
  key_t, key_noise = jax.random.split(rng)
  b = z0.shape[0]
  t = jax.random.randint(key_t, (b,), 0, schedule.num_train_timesteps, jnp.int32)
  noise = jax.random.normal(key_noise, z0.shape, jnp.float32)
  z_t = schedules.q_sample(schedule, z0.astype(jnp.float32), t, noise)
  metrics: dict[str, jax.Array] = {}
  use_aux = estimator != "none" and (lambda_id > 0 or lambda_exp > 0)
  if not use_aux:
    eps = eps_fn(z_t, t, cond)
    l_dm = jnp.mean((eps.astype(jnp.float32) - noise) ** 2)
    metrics["l_dm"] = l_dm
    return l_dm, metrics
  est = estimators.estimate_x0(estimator, eps_fn, schedule, z_t, t, cond)
  l_dm = jnp.mean((est.eps.astype(jnp.float32) - noise) ** 2)
  image = est.x0 if decode is None else decode(est.x0)
  total = l_dm
  metrics["l_dm"] = l_dm
  if lambda_id > 0:
    if identity_fn is None or target_id is None:
      raise ValueError("lambda_id > 0 needs identity_fn and target_id")
    l_id = identity_loss(identity_fn(image), target_id)
    metrics["l_id"] = l_id
    total = total + lambda_id * l_id
  if lambda_exp > 0:
    if expression_fn is None or target_exp is None:
      raise ValueError("lambda_exp > 0 needs expression_fn and target_exp")
    l_exp = expression_loss(expression_fn(image), target_exp)
    metrics["l_exp"] = l_exp
    total = total + lambda_exp * l_exp
  return total, metrics
