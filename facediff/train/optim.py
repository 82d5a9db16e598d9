"""Optimisation: learning-rate schedule, AdamW with global-norm clipping, EMA.

Config fields (``config.optim``): ``lr`` (peak), ``warmup_steps``, ``constant_steps``
(after warm-up; None = constant forever), ``decay_steps`` (linear decay to
``end_lr`` after the constant phase), ``b1``, ``b2``, ``eps``, ``weight_decay``,
``max_grad_norm`` (0 = no clipping). ``config.ema.decay`` (0 = no EMA params).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def lr_schedule(optim_cfg) -> optax.Schedule:
  """Linear warm-up 0 -> lr, constant lr, then linear decay to ``end_lr``.

  DiffSFSR Sec. 4: lr 1e-5 for 100k steps, then linearly decayed over 100k steps
  (``warmup_steps=0, constant_steps=100_000, decay_steps=100_000``).
  """
  lr = float(optim_cfg.lr)
  end_lr = float(optim_cfg.get("end_lr", 0.0))
  warmup = int(optim_cfg.get("warmup_steps", 0) or 0)
  constant = optim_cfg.get("constant_steps")
  decay = int(optim_cfg.get("decay_steps", 0) or 0)
  pieces, boundaries = [], []
  if warmup:
    pieces.append(optax.linear_schedule(0.0, lr, warmup))
    boundaries.append(warmup)
  pieces.append(optax.constant_schedule(lr))
  if constant is not None and decay:
    boundaries.append(warmup + int(constant))
    pieces.append(optax.linear_schedule(lr, end_lr, decay))
  if len(pieces) == 1:
    return pieces[0]
  return optax.join_schedules(pieces, boundaries)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay) after clipping by global norm."""
  for field in ("lr", "b1", "b2", "eps", "weight_decay"):
    if optim_cfg.get(field) is None:
      raise ValueError(f"config.optim.{field} is required")
  if float(optim_cfg.lr) <= 0:
    raise ValueError(f"config.optim.lr must be > 0, got {optim_cfg.lr}")
  parts = []
  max_norm = float(optim_cfg.get("max_grad_norm", 0.0) or 0.0)
  if max_norm > 0:
    parts.append(optax.clip_by_global_norm(max_norm))
  parts.append(
    optax.adamw(
      lr_schedule(optim_cfg),
      b1=float(optim_cfg.b1),
      b2=float(optim_cfg.b2),
      eps=float(optim_cfg.eps),
      weight_decay=float(optim_cfg.weight_decay),
    )
  )
  return optax.chain(*parts)


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params, in float32."""
  return jax.tree.map(
    lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(
      e.dtype
    ),
    ema_params,
    params,
  )
