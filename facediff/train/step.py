"""The jitted training step.

``make_train_step`` returns the step together with its in/out shardings and donated
arguments (the state is donated: its buffers are reused for the new state). One step:

1. the step's key is ``fold_in(state.rng, state.step)``;
2. loss and gradients of ``task.loss_fn``; with ``grad_accum_steps = k > 1`` the
   global batch is split into k micro-batches and ``lax.scan`` sums their gradients
   (memory of one micro-batch, the gradient of the whole batch);
3. global gradient norm; AdamW after clipping (``optim.make_optimizer``); EMA;
4. if the loss or the gradient norm is not finite, the returned state is the input
   state unchanged (``metrics["finite"] = False``), so nothing non-finite is ever
   written; the loop stops on it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from facediff import partitioning
from facediff.train import optim
from facediff.train.state import TrainState, replicated
from facediff.train.task import Task


def split_microbatches(batch: Any, num: int, mesh: Mesh | None) -> Any:
  """(B, ...) leaves -> (num, B / num, ...). Micro-batch j takes rows j, j + num, ...,
  so every device keeps its own rows (no data moves between devices)."""

  def split(x):
    if x.shape[0] % num:
      raise ValueError(
        f"config.train.grad_accum_steps={num} does not divide the batch of {x.shape[0]}"
      )
    y = x.reshape((x.shape[0] // num, num) + x.shape[1:])
    return jnp.swapaxes(y, 0, 1)

  return jax.tree.map(split, batch)


def _constrain_batch(batch: Any, mesh: Mesh | None) -> Any:
  if mesh is None:
    return batch
  sharding = partitioning.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), batch)


def make_step_fn(task: Task, tx: optax.GradientTransformation, config, mesh: Mesh | None):
  """The un-jitted step ``(state, frozen, batch) -> (state, metrics)``."""
  accum = int(config.train.get("grad_accum_steps", 1) or 1)
  ema_decay = float(config.ema.decay)
  schedule = optim.lr_schedule(config.optim)
  grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)

  def loss_and_grads(state: TrainState, frozen, batch, rng):
    if accum == 1:
      return grad_fn(state.params, frozen, batch, rng, state.model_state)
    micro = split_microbatches(batch, accum, mesh)

    def body(carry, inputs):
      grads_sum, loss_sum, metrics_sum = carry
      mb, index = inputs
      mb = _constrain_batch(mb, mesh)
      (loss, metrics), grads = grad_fn(
        state.params, frozen, mb, jax.random.fold_in(rng, index), state.model_state
      )
      return (
        jax.tree.map(jnp.add, grads_sum, grads),
        loss_sum + loss,
        jax.tree.map(jnp.add, metrics_sum, metrics),
      ), None

    first = jax.tree.map(lambda x: x[0], micro)
    abstract = jax.eval_shape(
      grad_fn, state.params, frozen, first, rng, state.model_state
    )  # shapes of (loss, metrics), grads
    (_, metrics_shape), grads_shape = abstract
    zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)  # noqa: E731
    init = (zeros(grads_shape), jnp.zeros((), jnp.float32), zeros(metrics_shape))
    (grads, loss, metrics), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum)))
    scale = 1.0 / accum
    return (loss * scale, jax.tree.map(lambda m: m * scale, metrics)), jax.tree.map(
      lambda g: g * scale, grads
    )

  def step(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, metrics), grads = loss_and_grads(state, frozen, batch, rng)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = (
      None if state.ema_params is None else optim.ema_update(state.ema_params, params, ema_decay)
    )
    model_state = state.model_state
    if task.update_model_state is not None:
      model_state = task.update_model_state(model_state, metrics)
    new = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      ema_params=ema,
      model_state=model_state,
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = dict(metrics)
    metrics.update(
      loss=loss.astype(jnp.float32),
      grad_norm=grad_norm.astype(jnp.float32),
      lr=jnp.asarray(schedule(state.step), jnp.float32),
      finite=finite,
    )
    return new, metrics

  return step


def make_train_step(
  task: Task,
  tx: optax.GradientTransformation,
  config,
  mesh: Mesh,
  state_shardings: TrainState,
  frozen_shardings: Any,
) -> tuple[Callable, tuple, tuple, tuple[int, ...]]:
  """(jitted step, in_shardings, out_shardings, donate_argnums)."""
  batch_sh = partitioning.batch_sharding(mesh)
  in_shardings = (state_shardings, frozen_shardings, batch_sh)
  out_shardings = (state_shardings, replicated(mesh))
  donate = (0,)
  fn = make_step_fn(task, tx, config, mesh)
  jitted = jax.jit(
    fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate
  )
  return jitted, in_shardings, out_shardings, donate
