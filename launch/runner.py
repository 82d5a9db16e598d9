"""Flag-free training entry: the task registry, the training batches and ``run`` (used
by ``launch.train``, ``launch.main`` and tests)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

TASKS = ("diffsfsr", "tgdm", "emoa2e")


def build_task(config):
  """The trainer ``Task`` that ``config.model.name`` names."""
  name = config.model.name
  if name == "diffsfsr":
    from facediff.train import diffsfsr_task  # noqa: PLC0415

    return diffsfsr_task.make_task(config)
  if name == "tgdm":
    from facediff.train import tgdm_task  # noqa: PLC0415

    return tgdm_task.make_task(config)
  if name == "emoa2e":
    from facediff.train import emoa2e_task  # noqa: PLC0415

    return emoa2e_task.make_task(config)
  raise ValueError(f"config.model.name={name!r}: unknown model (known: {', '.join(TASKS)})")


def check_task_config(config) -> None:
  """The task's config checks that need no data or weights, for tasks built after the
  demo dataset (TGDM reads its morphable model from it): a bad field fails before the
  dataset is built."""
  if config.model.name == "tgdm":
    from facediff.train import tgdm_task  # noqa: PLC0415

    tgdm_task.check_config(config)


def build_train_iterator(config, mesh):
  """The training batches ``config.data.source`` names: "synthetic_audio" (EmoA2E's
  in-memory set, data_pipelines/synthetic_audio.py) or the ArrayRecord shards of
  ``config.data.path`` (the default)."""
  import jax  # noqa: PLC0415

  source = config.data.get("source", "shards")
  if source == "synthetic_audio":
    from data_pipelines import synthetic_audio  # noqa: PLC0415

    return synthetic_audio.make_train_iterator(config, jax.process_index(), jax.process_count())
  if source != "shards":
    raise ValueError(f"config.data.source={source!r}: expected shards or synthetic_audio")
  from data_pipelines import loaders  # noqa: PLC0415

  return loaders.make_train_iterator(config, mesh)


def build_eval_batch(config, mesh):
  """The fixed batch of the trainer's periodic evaluation (``task.eval_fn``): the first
  batch of the training pipeline (same fields, crops and source pairs, shuffled with
  ``data.seed``) over ``config.data.eval_path``, a held-out dataset, or, when that is
  empty, over the training set ``config.data.path`` (then it is the first batch a run
  from step 0 trains on). The same batch at every evaluation and after every resume."""
  from data_pipelines import loaders  # noqa: PLC0415

  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.data.path = str(config.data.get("eval_path", "") or "") or str(config.data.path)
    c.data.num_workers = 0
    c.data.num_epochs = None
  return next(loaders.make_train_iterator(c, mesh))


def build_demo_data(config, workdir: str) -> None:
  """With an empty ``config.data.path`` (shards): builds the demo dataset into
  ``workdir/data`` (TGDM's tiny configs: the synthetic 3DMM set) and points the config
  at it."""
  import jax  # noqa: PLC0415

  if config.data.get("path") or config.data.get("source", "shards") != "shards":
    return
  from data_pipelines import demo  # noqa: PLC0415

  data_dir = os.path.join(workdir, "data")
  if jax.process_index() == 0:
    if "synthetic_3dmm" in config:  # TGDM's tiny configs: faces rendered from a 3DMM
      from data_pipelines import synthetic_3dmm  # noqa: PLC0415

      synthetic_3dmm.build(data_dir, **dict(config.synthetic_3dmm))
    else:
      d = config.demo
      demo.build(data_dir, num=d.num, seed=d.seed, image_size=d.image_size, shard_size=d.shard_size)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices("demo dataset built")
  with config.unlocked():
    config.data.path = data_dir


@dataclasses.dataclass
class Prepared:
  """What ``prepare`` checked and opened: the task, the mesh and the batches."""

  task: Any
  mesh: Any
  train_iter: Any
  eval_batch: Any = None


def prepare(config, workdir: str, task=None) -> Prepared:
  """Everything before training, ordered so that a mistake stops the run before
  anything is written: the workdir's place, a given dataset's manifest, the task
  (config and weight errors; after the demo dataset when the task reads it: TGDM's tiny
  configs take the morphable model from their synthetic set), the demo dataset (only
  with an empty ``config.data.path``), the mesh, the training batches and the
  evaluation batch; then ``workdir/config.json``. If it fails, a workdir this call
  created is removed."""
  import jax  # noqa: PLC0415

  from facediff import cli, partitioning  # noqa: PLC0415

  cli.check_output_dir(workdir, "--workdir")
  if config.data.get("path") and config.data.get("source", "shards") == "shards":
    from data_pipelines import loaders  # noqa: PLC0415

    loaders.open_source(config.data)  # a dataset mistake, before any weights load
  created = not os.path.exists(workdir)
  try:
    if task is None and "synthetic_3dmm" not in config:
      task = build_task(config)
    elif task is None:
      check_task_config(config)
    build_demo_data(config, workdir)
    if task is None:
      task = build_task(config)
    mesh = partitioning.make_mesh(dict(config.mesh))
    train_iter = build_train_iterator(config, mesh)
    eval_batch = None
    if task.eval_fn is not None and int(config.train.get("eval_every", 0) or 0) > 0:
      eval_batch = build_eval_batch(config, mesh)
  except Exception:
    if created and jax.process_index() == 0 and os.path.isdir(workdir):
      shutil.rmtree(workdir)
    raise
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  return Prepared(task, mesh, train_iter, eval_batch)


def train(config, workdir: str, prepared: Prepared) -> dict:
  """``train_and_evaluate`` on what ``prepare`` opened."""
  from facediff.train import train_and_evaluate  # noqa: PLC0415

  p = prepared
  return train_and_evaluate(
    config, workdir, p.task, p.train_iter, mesh=p.mesh, eval_batch=p.eval_batch
  )


def run(config, workdir: str, task=None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming); ``task`` defaults to ``build_task``.
  With an empty ``config.data.path`` (shards) the demo dataset is built into
  ``workdir/data`` first (TGDM's tiny configs: the synthetic 3DMM set)."""
  return train(config, workdir, prepare(config, workdir, task))


def train_and_restore(config, workdir: str, task=None):
  """Trains ``config`` in ``workdir`` with :func:`run` (resuming) and returns (a short
  train summary, the trained params restored from the newest checkpoint)."""
  from facediff import partitioning  # noqa: PLC0415
  from facediff.train import checkpoint as ckpt_lib  # noqa: PLC0415
  from facediff.train import state as state_lib  # noqa: PLC0415

  task = task or build_task(config)
  summary = run(config, workdir, task=task)
  mesh = partitioning.make_mesh(dict(config.mesh))
  with partitioning.activation_rules(mesh):
    abstract, _, _ = state_lib.abstract_state(task, config, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.train)
    restored = ck.restore_latest(abstract)
    ck.close()
  if restored is None:
    raise RuntimeError(f"{workdir}/checkpoints: training wrote no checkpoint")
  state, step = restored
  summary = {k: summary.get(k) for k in ("step", "start_step", "num_params", "seconds")}
  summary["restored_step"] = int(step)
  return summary, state.params
