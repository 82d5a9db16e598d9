"""The trainer's periodic evaluation: ``task.eval_fn`` on one fixed batch, compiled once
with the step's shardings (params as the train state holds them, frozen weights as the
step takes them, the batch over the batch axes) and called with a fixed key."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from facediff import partitioning
from facediff.train.state import TrainState, replicated
from facediff.train.task import Task


def eval_key(config) -> jax.Array:
  """The key every evaluation of a run uses: ``key(config.train.seed + 2)`` (the step
  keys come from ``seed``, the preview samples from ``seed + 1``)."""
  return jax.random.key(int(config.train.seed) + 2)


def eval_params(state: TrainState) -> Any:
  """What is evaluated: the EMA params when the run keeps them, else the params."""
  return state.ema_params if state.ema_params is not None else state.params


class Evaluator:
  """``evaluate(state, frozen) -> {name: float}`` for ``train_and_evaluate``: the jitted
  ``task.eval_fn(eval_params(state), frozen, batch, eval_key(config))``. ``batch``
  must already be placed on ``mesh`` (``loop.place_batch``). Compiles on first use."""

  def __init__(self, task: Task, config, mesh: Mesh, param_shardings, frozen_shardings, batch):
    if task.eval_fn is None:
      raise ValueError(f"task {task.name!r} has no eval_fn")
    rep = replicated(mesh)
    self._fn = jax.jit(
      task.eval_fn,
      in_shardings=(param_shardings, frozen_shardings, partitioning.batch_sharding(mesh), rep),
      out_shardings=rep,
    )
    self._key = jax.device_put(eval_key(config), rep)
    self._batch = batch

  def __call__(self, state: TrainState, frozen) -> dict[str, float]:
    out = self._fn(eval_params(state), frozen, self._batch, self._key)
    return {k: float(v) for k, v in jax.device_get(out).items()}

  def metric_names(self, state: TrainState, frozen) -> list[str]:
    """The names ``__call__`` returns, from tracing alone (nothing is computed)."""
    return sorted(jax.eval_shape(self._fn, eval_params(state), frozen, self._batch, self._key))


def make_evaluator(
  task: Task, config, mesh: Mesh, param_shardings: Any, frozen_shardings: Any, batch: Any
) -> Evaluator:
  return Evaluator(task, config, mesh, param_shardings, frozen_shardings, batch)
