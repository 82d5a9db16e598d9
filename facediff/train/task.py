"""What a model supplies to the trainer."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

Params = Any
Batch = Any
Metrics = dict[str, jax.Array]


def _no_model_state() -> dict[str, Any]:
  return {}


@dataclasses.dataclass(frozen=True)
class Task:
  """A trainable model as the trainer sees it.

  Attributes:
    name: used in logs.
    init: ``key -> params`` of the trainable parameters; may return Flax
      ``LogicallyPartitioned`` boxes (their logical axis names decide the sharding).
      Must be traceable: the trainer runs it under ``jax.eval_shape`` and ``jax.jit``.
    loss_fn: ``(params, frozen, batch, rng, model_state) -> (loss, metrics)``, a pure
      function of a (micro-)batch; ``metrics`` is a flat dict of scalars (every loss
      term), averaged over micro-batches and logged.
    sample_fn: optional ``(params, frozen, batch, rng) -> images`` (B, H, W, 3) in
      [-1, 1] for preview grids; called with the EMA params when there are any.
    eval_fn: optional ``(params, frozen, batch, rng) -> metrics``: a flat dict of
      scalars measured on one fixed evaluation batch every ``config.train.eval_every``
      steps (``facediff.train.evaluator``), logged as ``eval/<name>`` and usable as
      ``config.train.keep_best_metric``. Called with the EMA params when there are any
      and the same ``rng`` every time, so the numbers move only with the params.
    frozen: weights the loss uses but never trains (face encoders, a VAE): concrete
      arrays, passed to every step as an argument (not baked into the program), not
      checkpointed.
    frozen_abstract: optional ``jax.eval_shape`` tree of ``frozen`` with logical axis
      boxes, to shard it like the models' params; None replicates it.
    init_model_state: ``() -> dict`` of extra state carried in the train state and
      checkpointed (e.g. TGDM's loss gate).
    update_model_state: optional ``(model_state, metrics) -> model_state``, applied
      inside the step after the update.
    pretrained: optional ``() -> params subtree`` of host (numpy) arrays that replace
      the matching freshly initialised params when a run starts without a checkpoint
      (e.g. SD-1.4's UNet); called on every host, placed with the params' shardings.
  """

  name: str
  init: Callable[[jax.Array], Params]
  loss_fn: Callable[..., tuple[jax.Array, Metrics]]
  sample_fn: Callable[..., jax.Array] | None = None
  eval_fn: Callable[..., Metrics] | None = None
  frozen: Any = None
  frozen_abstract: Any = None
  init_model_state: Callable[[], dict[str, Any]] = _no_model_state
  update_model_state: Callable[[dict[str, Any], Metrics], dict[str, Any]] | None = None
  pretrained: Callable[[], Any] | None = None
