"""Trains the toy task (``_toy_task``) with ``loop.train_and_evaluate`` in its own process.

Run by tests/test_train_multihost.py as one or several ``jax.distributed`` processes
(``--coordinator`` / ``--num_processes`` / ``--process_id``) and as a run that the
test kills and restarts. The device count comes from the caller's ``XLA_FLAGS``. Each
process writes ``summary_<process index>.json`` (train_and_evaluate's summary) into
``--workdir``; a second start with the same workdir resumes.

    python tests/_train_worker.py --workdir DIR [--num_steps 3] [--checkpoint_every 1]
        [--mesh 2,2] [--hidden 64] [--coordinator localhost:PORT --num_processes 2
        --process_id 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main(argv=None) -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--num_steps", type=int, default=3)
  ap.add_argument("--checkpoint_every", type=int, default=1)
  ap.add_argument("--keep_checkpoints", type=int, default=5)
  ap.add_argument("--mesh", default="-1,1", help="data,fsdp axis sizes")
  ap.add_argument("--hidden", type=int, default=64, help="toy MLP width (bigger: slower saves)")
  ap.add_argument("--coordinator", default=None)
  ap.add_argument("--num_processes", type=int, default=1)
  ap.add_argument("--process_id", type=int, default=0)
  args = ap.parse_args(argv)

  import jax  # noqa: PLC0415

  if args.coordinator:
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
    )
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  logging.basicConfig(
    level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
  )
  from absl import flags  # noqa: PLC0415

  flags.FLAGS(["worker"])  # grain reads absl flags; this is not an absl app

  import _toy_task as toy  # noqa: PLC0415  (tests/ is this script's directory)

  from facediff.train import loop  # noqa: PLC0415

  data, fsdp = (int(v) for v in args.mesh.split(","))
  cfg = toy.make_config(
    num_steps=args.num_steps,
    checkpoint_every=args.checkpoint_every,
    keep_checkpoints=args.keep_checkpoints,
    sample_every=0,
  )
  cfg.mesh = dict(data=data, fsdp=fsdp)
  it = toy.make_iterator(cfg, jax.process_index(), jax.process_count())
  summary = loop.train_and_evaluate(cfg, args.workdir, toy.make_task(hidden=args.hidden), it)
  summary["process_index"] = jax.process_index()
  summary["process_count"] = jax.process_count()
  summary["local_devices"] = jax.local_device_count()
  path = os.path.join(args.workdir, f"summary_{jax.process_index()}.json")
  with open(path, "w") as f:
    json.dump({k: v for k, v in summary.items() if k != "params_per_module"}, f, default=str)


if __name__ == "__main__":
  main()
