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
import sys
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli, runner

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


def init_distributed() -> dict | None:
  """jax.distributed from flags, SLURM's environment, or TPU VM auto-detection
  (``launch/distributed.py``); returns the arguments it was called with."""
  from launch import distributed  # noqa: PLC0415

  return distributed.initialize(
    os.environ,
    coordinator_address=_COORDINATOR.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
    auto=_DISTRIBUTED.value,
  )


build_task = runner.build_task
run = runner.run


PROG = "launch.train"


def main(argv: Sequence[str]) -> None:
  cli.no_extra_arguments(PROG, argv)
  if _CONFIG.value is None:
    sys.exit(cli.fail(PROG, "--config is required, e.g. --config configs/diffsfsr.py:tiny"))
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:  # the inputs, read and checked before anything is written or compiled
    cli.check_output_dir(workdir, "--workdir")
    init_distributed()
    prepared = runner.prepare(config, workdir)
  except cli.INPUT_ERRORS as e:
    sys.exit(cli.fail(PROG, e))
  try:
    summary = runner.train(config, workdir, prepared)
  except cli.run_errors() as e:
    sys.exit(cli.fail(PROG, e))
  logging.info("done: %s", json.dumps({k: summary[k] for k in ("step", "start_step")}))
  print(json.dumps({k: v for k, v in summary.items() if k != "params_per_module"}, default=str))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROG))
