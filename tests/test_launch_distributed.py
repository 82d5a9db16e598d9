"""How launch.train joins a jax.distributed job: launch/slurm.sbatch run with fake
``scontrol`` / ``srun`` (what it exports and hands to srun), launch/distributed.py's
rules for every source, and launch.train's flags wired to jax.distributed.initialize
(in a subprocess with jax.distributed.initialize replaced by a recorder)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from launch import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_LOG/scontrol.args"
[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf 'gpu07\\ngpu08\\n'
"""
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
{ echo "FACEDIFF_COORDINATOR_HOST=$FACEDIFF_COORDINATOR_HOST"
  echo "FACEDIFF_COORDINATOR_PORT=$FACEDIFF_COORDINATOR_PORT"
  echo "PWD=$PWD"; } > "$FAKE_LOG/srun.env"
"""


def _fake_bin(tmp_path):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
    (bindir / name).write_text(text)
    os.chmod(bindir / name, 0o755)
  return bindir


def test_slurm_sbatch_exports_the_coordinator_and_passes_arguments_through(tmp_path):
  bindir = _fake_bin(tmp_path)
  env = dict(
    os.environ,
    PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
    FAKE_LOG=str(tmp_path),
    SLURM_JOB_NODELIST="gpu[07-08]",
    SLURM_SUBMIT_DIR=REPO,
    SLURM_NTASKS="16",
    FACEDIFF_PYTHON="/opt/venv/bin/python",
  )
  env.pop("FACEDIFF_COORDINATOR_PORT", None)
  user_args = ["--config", "configs/diffsfsr.py:tiny", "--workdir", "/shared/run a", "--x=1"]
  cwd = tmp_path / "elsewhere"  # sbatch runs a copy of the script elsewhere
  cwd.mkdir()
  out = subprocess.run(
    ["bash", os.path.join(REPO, "launch", "slurm.sbatch"), *user_args],
    env=env,
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  assert (tmp_path / "scontrol.args").read_text().split() == ["show", "hostnames", "gpu[07-08]"]
  srun_args = (tmp_path / "srun.args").read_text().splitlines()
  assert srun_args == ["--kill-on-bad-exit=1", "/opt/venv/bin/python", "-m", "launch.train"] + (
    user_args
  )
  srun_env = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines())
  assert srun_env == {
    "FACEDIFF_COORDINATOR_HOST": "gpu07",
    "FACEDIFF_COORDINATOR_PORT": "12355",
    "PWD": REPO,
  }
  # What srun adds per task, and what each task then asks jax.distributed for.
  for rank in range(16):
    task_env = dict(srun_env, SLURM_NTASKS="16", SLURM_PROCID=str(rank))
    assert distributed.initialize_args(task_env) == {
      "coordinator_address": "gpu07:12355",
      "num_processes": 16,
      "process_id": rank,
    }


def test_sbatch_outside_an_allocation_fails_with_a_message(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  out = subprocess.run(
    ["bash", os.path.join(REPO, "launch", "slurm.sbatch")],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode != 0 and "not inside a SLURM allocation" in out.stderr


def test_initialize_args_sources_in_order():
  slurm = {
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "3",
    "FACEDIFF_COORDINATOR_HOST": "n1",
    "FACEDIFF_COORDINATOR_PORT": "2222",
  }
  # Flags win over SLURM's environment.
  flags = dict(coordinator_address="h:1", num_processes=2, process_id=1)
  assert distributed.initialize_args(slurm, **flags) == flags
  assert distributed.initialize_args(slurm) == {
    "coordinator_address": "n1:2222",
    "num_processes": 4,
    "process_id": 3,
  }
  # One task (e.g. `srun -n1` or an interactive allocation): a single process.
  assert distributed.initialize_args(dict(slurm, SLURM_NTASKS="1")) is None
  assert distributed.initialize_args({}) is None
  # --distributed: jax.distributed.initialize() with no arguments (TPU VM slices).
  assert distributed.initialize_args({}, auto=True) == {}
  with pytest.raises(ValueError, match="FACEDIFF_COORDINATOR_HOST is not set.*slurm.sbatch"):
    distributed.initialize_args({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
  with pytest.raises(ValueError, match="SLURM_PROCID"):
    distributed.initialize_args({"SLURM_NTASKS": "2", "FACEDIFF_COORDINATOR_HOST": "n1"})


CHILD = textwrap.dedent("""
    import json, os, sys
    import jax
    calls = []
    jax.distributed.initialize = lambda *a, **k: calls.append([list(a), k])
    from absl import flags
    from launch import train
    results = []
    for env, argv in json.loads(sys.argv[1]):
        for k in [k for k in os.environ if k.startswith(("SLURM_", "FACEDIFF_"))]:
            del os.environ[k]
        os.environ.update(env)
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["launch.train", "--workdir=/tmp/unused"] + argv)
        del calls[:]
        returned = train.init_distributed()
        results.append({"calls": list(calls), "returned": returned})
    print(json.dumps(results))
""")

SLURM_8 = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "FACEDIFF_COORDINATOR_HOST": "gpu07"}
CASES = [  # (environment, launch.train flags, expected jax.distributed.initialize kwargs)
  (SLURM_8, [], {"coordinator_address": "gpu07:12355", "num_processes": 8, "process_id": 5}),
  ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, [], None),
  ({}, ["--distributed"], {}),
  (
    SLURM_8,
    ["--coordinator_address=h:9", "--num_processes=2", "--process_id=0"],
    {"coordinator_address": "h:9", "num_processes": 2, "process_id": 0},
  ),
]


def test_launch_train_calls_jax_distributed_initialize():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FACEDIFF_"))}
  env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
  cases = json.dumps([[e, a] for e, a, _ in CASES])
  out = subprocess.run(
    [sys.executable, "-c", CHILD, cases],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  for (_, argv, want), got in zip(CASES, results, strict=True):
    assert got["returned"] == want, argv
    assert got["calls"] == ([] if want is None else [[[], want]]), argv
