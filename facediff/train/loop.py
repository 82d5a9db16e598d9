"""``train_and_evaluate``: the training loop shared by every model.

Config fields: ``config.train`` (``num_steps``, ``seed``, ``grad_accum_steps``,
``log_every``, ``checkpoint_every``, ``keep_checkpoints``, ``keep_best_metric``,
``sample_every``, ``eval_every``, ``profile_steps`` = [first, last] or []),
``config.optim`` and ``config.ema`` (see ``optim.py``), ``config.mesh`` (axis sizes,
-1 fills in) and ``config.data.global_batch_size``.

Evaluation runs only with ``eval_every > 0``: every ``eval_every`` steps and at the last
step, ``task.eval_fn`` on a fixed batch (``evaluator.py``) or an ``evaluate`` hook given
by the caller; its metrics are logged as ``eval/<name>`` and, with ``keep_best_metric``
(one of those names, without ``eval/``; ``keep_best_mode`` "min" or "max"), decide which
checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from facediff import partitioning
from facediff.train import state as state_lib
from facediff.train.checkpoint import Checkpointer
from facediff.train.evaluator import make_evaluator
from facediff.train.step import make_train_step
from facediff.train.task import Task
from facediff.train.writers import MetricWriter, Progress

log = logging.getLogger("facediff.train")


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; training stopped before applying it."""


def itstime(step: int, every: int, total: int, *, last: bool = True) -> bool:
  """True on multiples of ``every`` (> 0) and, with ``last``, at the final step."""
  return (every > 0 and step % every == 0) or (last and step == total)


def place_batch(batch: Any, mesh: Mesh, global_batch_size: int) -> Any:
  """Host (per-process) numpy batches -> global arrays sharded over the batch axes;
  batches that are already global jax.Arrays pass through."""
  sharding = partitioning.batch_sharding(mesh)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    if isinstance(x, jax.Array) and x.shape[0] == global_batch_size and jax.process_count() == 1:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (global_batch_size,) + x.shape[1:])

  return jax.tree.map(put, batch)


class _StopSignal:
  """SIGTERM sets a flag the loop checks once per step (main thread, one process only).

  With several processes SIGTERM is left to jax.distributed's preemption service: it
  agrees on one step for every process (``Checkpointer.reached_preemption``), where a
  flag of our own could stop each process at a different step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _compiled_stats(compiled) -> dict[str, Any]:
  out: dict[str, Any] = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["flops_per_step"] = float(cost.get("flops", float("nan")))
  except Exception as e:  # cost analysis is best-effort on some backends
    out["flops_per_step"] = f"unavailable ({type(e).__name__})"
  try:
    mem = compiled.memory_analysis()
    out["memory_per_device_bytes"] = {
      "arguments": int(mem.argument_size_in_bytes),
      "outputs": int(mem.output_size_in_bytes),
      "temporaries": int(mem.temp_size_in_bytes),
      "aliased": int(mem.alias_size_in_bytes),
    }
  except Exception as e:
    out["memory_per_device_bytes"] = f"unavailable ({type(e).__name__})"
  return out


def _check_best_metric(train_cfg, eval_metrics: dict[str, float]) -> None:
  best = str(train_cfg.get("keep_best_metric", "") or "")
  names = sorted(k.removeprefix("eval/") for k in eval_metrics)
  if best and best not in names:
    raise ValueError(
      f"config.train.keep_best_metric={best!r} is not an eval metric of this task "
      f"(it has {', '.join(names)})"
    )


def train_and_evaluate(
  config,
  workdir: str,
  task: Task,
  train_iter: Iterator[Any],
  *,
  mesh: Mesh | None = None,
  preview_batch: Any = None,
  eval_batch: Any = None,
  evaluate: Callable[[state_lib.TrainState, Any], dict[str, float]] | None = None,
  checkpoint_data: bool = True,
) -> dict[str, Any]:
  """Trains ``task`` on ``train_iter`` for ``config.train.num_steps`` steps.

  Resumes from the newest complete checkpoint in ``workdir/checkpoints`` (the train
  state and, when ``checkpoint_data`` and the iterator is a grain iterator, its
  position). ``preview_batch`` feeds ``task.sample_fn`` every ``sample_every`` steps
  (default: the first batch this run sees). Every ``eval_every`` steps (when > 0)
  ``evaluate(state, frozen) -> {name: value}`` runs; by default it is ``task.eval_fn``
  on ``eval_batch`` (default: the first batch this run sees, which after a resume is
  another one: pass a fixed batch to compare runs). Returns a summary dict (also the
  last line of metrics.jsonl).
  """
  tc = config.train
  total = int(tc.num_steps)
  if tc.get("keep_best_metric", "") and int(tc.get("eval_every", 0) or 0) <= 0:
    raise ValueError(
      f"config.train.keep_best_metric={tc.keep_best_metric!r} needs config.train.eval_every "
      "> 0 (the checkpoints are ranked by that eval metric)"
    )
  mesh = mesh or partitioning.make_mesh(dict(config.mesh))
  gbs = int(config.data.global_batch_size)
  writer = MetricWriter(workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), tc)
  data_for_ckpt = train_iter if checkpoint_data and hasattr(train_iter, "get_state") else None

  with partitioning.activation_rules(mesh), _StopSignal() as stop:
    abstract, shardings, tx = state_lib.abstract_state(task, config, mesh)
    frozen, frozen_sh = state_lib.shard_frozen(task, mesh)
    restored = ckpt.restore_latest(abstract, data_for_ckpt)
    if restored is None:
      state, _, _ = state_lib.create_train_state(task, config, mesh)
      start = 0
    else:
      state, start = restored
      log.info("resumed from %s", os.path.join(ckpt.directory, str(start)))
    if int(np.asarray(jax.device_get(state.step))) != start:
      raise RuntimeError(f"checkpoint step {start} holds state.step {state.step}")

    step_fn, _, _, _ = make_train_step(task, tx, config, mesh, shardings, frozen_sh)
    summary: dict[str, Any] = {"start_step": start, "mesh": dict(mesh.shape)}
    if start >= total:
      ckpt.close()
      writer.close()
      summary.update(step=start, message="already trained")
      return summary

    batch = place_batch(next(train_iter), mesh, gbs)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, frozen, batch).compile()
    stats = _compiled_stats(compiled)
    stats.update(
      compile_seconds=round(time.perf_counter() - t0, 2),
      params_per_module=state_lib.param_counts(state.params),
      num_params=int(sum(state_lib.param_counts(state.params).values())),
      mesh=dict(mesh.shape),
      devices=jax.device_count(),
      processes=jax.process_count(),
    )
    log.info("compiled train step: %s", json.dumps(stats))
    writer.text(start, "train/compiled", json.dumps(stats))
    summary.update(stats)

    preview = batch if preview_batch is None else place_batch(preview_batch, mesh, gbs)
    eval_every = int(tc.get("eval_every", 0) or 0)
    if evaluate is None and task.eval_fn is not None and eval_every > 0:
      fixed = batch if eval_batch is None else place_batch(eval_batch, mesh, gbs)
      evaluate = make_evaluator(task, config, mesh, shardings.params, frozen_sh, fixed)
      if tc.get("keep_best_metric", ""):  # a wrong name fails now, not at the first eval
        _check_best_metric(tc, dict.fromkeys(evaluate.metric_names(state, frozen), 0.0))
    sample_jit = jax.jit(task.sample_fn) if task.sample_fn is not None else None
    progress = Progress(total, gbs, start)
    profile = list(tc.get("profile_steps", []) or [])
    metrics_host: dict[str, float] = {}

    step = start
    while step < total:
      if profile and step == int(profile[0]):
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      if step > start:
        batch = place_batch(next(train_iter), mesh, gbs)
      state, metrics = compiled(state, frozen, batch)
      step += 1
      if profile and step == int(profile[1]) + 1:
        jax.profiler.stop_trace()

      if not bool(jax.device_get(metrics["finite"])):
        terms = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
        ckpt.close()
        writer.close()
        last = ckpt.steps()
        raise NonFiniteLossError(
          f"non-finite loss or gradient at step {step - 1}: {terms}; the update was not "
          f"applied and training stopped; last good checkpoint: "
          f"{os.path.join(ckpt.directory, str(last[-1])) if last else 'none'}"
        )

      if itstime(step, int(tc.get("log_every", 10)), total):
        metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics_host.update(progress.rates(step))
        writer.scalars(step, metrics_host)
        if jax.process_index() == 0:
          log.info(Progress.line(step, total, metrics_host))

      eval_metrics = None
      if evaluate is not None and eval_every > 0 and itstime(step, eval_every, total):
        eval_metrics = {f"eval/{k}": float(v) for k, v in evaluate(state, frozen).items()}
        _check_best_metric(tc, eval_metrics)
        writer.scalars(step, eval_metrics)

      if sample_jit is not None and itstime(step, int(tc.get("sample_every", 0)), total):
        params = state.ema_params if state.ema_params is not None else state.params
        key = jax.random.fold_in(jax.random.key(int(tc.seed) + 1), step)
        images = sample_jit(params, frozen, preview, key)
        images = jax.device_get(multihost_utils.process_allgather(images, tiled=True))
        summary["last_samples"] = writer.images(step, "samples", np.asarray(images))

      preempted = stop.requested or (jax.process_count() > 1 and ckpt.reached_preemption(step))
      if itstime(step, int(tc.get("checkpoint_every", 0)), total) or preempted:
        best_key = str(tc.get("keep_best_metric", "") or "")
        ckpt_metrics = eval_metrics if best_key and eval_metrics else None
        if ckpt_metrics is not None:
          ckpt_metrics = {k.removeprefix("eval/"): v for k, v in ckpt_metrics.items()}
        ckpt.save(step, state, data_for_ckpt, metrics=ckpt_metrics, force=True)
      if preempted:
        log.warning("stop requested (SIGTERM / preemption): saved step %d and stopping", step)
        summary["preempted"] = True
        break

    ckpt.close()
    writer.flush()
    writer.close()
  summary.update(step=step, metrics=metrics_host, checkpoints=ckpt.steps())
  return summary
