"""Flag-free training entry: the task registry and ``run`` (used by ``launch.train``,
``launch.main`` and tests)."""

from __future__ import annotations

import os


def build_task(config):
  name = config.model.name
  if name == "diffsfsr":
    from facediff.train import diffsfsr_task  # noqa: PLC0415

    return diffsfsr_task.make_task(config)
  raise ValueError(f"config.model.name={name!r}: unknown model (known: diffsfsr)")


def run(config, workdir: str, task=None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming); ``task`` defaults to ``build_task``."""
  import jax  # noqa: PLC0415

  from data_pipelines import loaders  # noqa: PLC0415
  from facediff import partitioning  # noqa: PLC0415
  from facediff.train import train_and_evaluate  # noqa: PLC0415

  os.makedirs(workdir, exist_ok=True)
  if not config.data.path:
    from data_pipelines import demo  # noqa: PLC0415

    data_dir = os.path.join(workdir, "data")
    if jax.process_index() == 0:
      d = config.demo
      demo.build(data_dir, num=d.num, seed=d.seed, image_size=d.image_size, shard_size=d.shard_size)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      multihost_utils.sync_global_devices("demo dataset built")
    with config.unlocked():
      config.data.path = data_dir
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  if task is None:
    task = build_task(config)  # config errors surface here, before any data or compile
  mesh = partitioning.make_mesh(dict(config.mesh))
  train_iter = loaders.make_train_iterator(config, mesh)
  return train_and_evaluate(config, workdir, task, train_iter, mesh=mesh)
