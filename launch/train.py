"""Trains a facediff model: ``train_and_evaluate`` with data from ``data_pipelines``.

    python -m launch.train --config configs/diffsfsr.py:tiny --workdir DIR \\
        [--config.train.num_steps=500 --config.data.global_batch_size=16 ...]

A second start with the same ``--workdir`` resumes from its newest complete checkpoint.
The config is locked after parsing and written to ``DIR/config.json``. With an empty
``config.data.path`` the demo dataset is built into ``DIR/data`` first (real photos that
ship inside installed packages, exported with the real offline encoders; for configs with
a ``synthetic_3dmm`` field, TGDM's tiny ones, faces rendered from a synthetic 3DMM).

Multi-host: on Cloud TPU VMs ``jax.distributed.initialize()`` needs no arguments
(``--distributed``); on GPU clusters pass ``--coordinator_address``,
``--num_processes`` and ``--process_id`` or let them come from SLURM's environment
(``launch/slurm.sbatch``, ``launch/tpu_vm.sh``).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config (``configs/<model>.py:<variant>``).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples.", required=True)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() (automatic on Cloud TPU VMs)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def init_distributed() -> None:
  """jax.distributed from flags, SLURM's environment, or TPU VM auto-detection."""
  import jax  # noqa: PLC0415

  env = os.environ
  coordinator = _COORDINATOR.value
  num = _NUM_PROCESSES.value
  pid = _PROCESS_ID.value
  if coordinator is None and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
    coordinator = (
      f"{env['FACEDIFF_COORDINATOR_HOST']}:{env.get('FACEDIFF_COORDINATOR_PORT', 12355)}"
    )
    num, pid = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
  if coordinator is not None:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def build_task(config):
  name = config.model.name
  if name == "diffsfsr":
    from facediff.train import diffsfsr_task  # noqa: PLC0415

    return diffsfsr_task.make_task(config)
  if name == "tgdm":
    from facediff.train import tgdm_task  # noqa: PLC0415

    return tgdm_task.make_task(config)
  raise ValueError(f"config.model.name={name!r}: unknown model (known: diffsfsr, tgdm)")


def run(config, workdir: str) -> dict:
  import jax  # noqa: PLC0415

  from data_pipelines import loaders  # noqa: PLC0415
  from facediff import partitioning  # noqa: PLC0415
  from facediff.train import train_and_evaluate  # noqa: PLC0415

  os.makedirs(workdir, exist_ok=True)
  if not config.data.path:
    from data_pipelines import demo  # noqa: PLC0415

    data_dir = os.path.join(workdir, "data")
    if jax.process_index() == 0:
      if "synthetic_3dmm" in config:  # TGDM's tiny configs: faces rendered from a 3DMM
        from data_pipelines import synthetic_3dmm  # noqa: PLC0415

        synthetic_3dmm.build(data_dir, **dict(config.synthetic_3dmm))
      else:
        d = config.demo
        demo.build(
          data_dir, num=d.num, seed=d.seed, image_size=d.image_size, shard_size=d.shard_size
        )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      multihost_utils.sync_global_devices("demo dataset built")
    with config.unlocked():
      config.data.path = data_dir
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  task = build_task(config)  # config errors surface here, before any data or compile
  mesh = partitioning.make_mesh(dict(config.mesh))
  train_iter = loaders.make_train_iterator(config, mesh)
  return train_and_evaluate(config, workdir, task, train_iter, mesh=mesh)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/diffsfsr.py:tiny")
  init_distributed()
  summary = run(_CONFIG.value, _WORKDIR.value)
  logging.info("done: %s", json.dumps({k: summary[k] for k in ("step", "start_step")}))
  print(json.dumps({k: v for k, v in summary.items() if k != "params_per_module"}, default=str))


if __name__ == "__main__":
  app.run(main)
