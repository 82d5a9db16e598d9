"""The trainer across processes: two ``jax.distributed`` CPU processes train like one,
and a run killed with SIGKILL in the middle of an asynchronous checkpoint save resumes
from the previous complete step and ends where an uninterrupted run ends.

Both run ``tests/_train_worker.py`` (``loop.train_and_evaluate`` on the toy task) as
subprocesses; the references run in this process on as many of its 8 virtual devices
as the workers have, with the same mesh shape.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import _toy_task as toy
import jax
import numpy as np
import pytest

from facediff import partitioning
from facediff.train import checkpoint as ckpt_lib
from facediff.train import loop
from facediff.train import state as state_lib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_train_worker.py")
TMP = ".orbax-checkpoint-tmp"


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )


def _start(workdir, log_path, *args, devices=2):
  cmd = [sys.executable, WORKER, "--workdir", str(workdir), *map(str, args)]
  with open(log_path, "ab") as log:
    return subprocess.Popen(cmd, env=_env(devices), stdout=log, stderr=subprocess.STDOUT)


def _tail(path, n=3000):
  return open(path, errors="replace").read()[-n:]


def _restore(workdir, cfg, mesh, hidden=toy.HIDDEN):
  task = toy.make_task(hidden=hidden)
  with partitioning.activation_rules(mesh):
    abstract, _, _ = state_lib.abstract_state(task, cfg, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.train)
    restored = ck.restore_latest(abstract)
    ck.close()
  assert restored is not None, workdir
  state, step = restored
  return jax.tree.map(np.asarray, jax.device_get(state.as_dict())), step


def _losses(workdir):
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _config(mesh_shape, **train):
  cfg = toy.make_config(sample_every=0, **train)
  cfg.mesh = dict(mesh_shape)
  return cfg


@pytest.mark.multihost
def test_two_processes_train_like_one_process(tmp_path):
  """2 processes x 2 CPU devices, mesh (data=2, fsdp=2), 3 steps, a checkpoint every
  step; the reference is one process on 4 devices with the same mesh and global batch."""
  shape = {"data": 2, "fsdp": 2}
  work = tmp_path / "two"
  port = _free_port()
  logs = [tmp_path / f"worker{i}.log" for i in range(2)]
  procs = [
    _start(
      work,
      logs[i],
      *("--num_steps", 3, "--checkpoint_every", 1, "--mesh", "2,2"),
      *("--coordinator", f"localhost:{port}", "--num_processes", 2, "--process_id", i),
    )
    for i in range(2)
  ]
  try:
    for p in procs:
      p.wait(timeout=240)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, _tail(log)

  summaries = [json.load(open(work / f"summary_{i}.json")) for i in range(2)]
  for i, s in enumerate(summaries):
    assert (s["process_index"], s["process_count"], s["local_devices"]) == (i, 2, 2)
    assert s["devices"] == 4 and s["mesh"] == shape
    assert s["step"] == 3 and s["checkpoints"] == [1, 2, 3]
  # Each process checkpointed its own position in the (same) data sequence.
  data_dir = work / "checkpoints" / "3" / "data"
  states = sorted(n for n in os.listdir(data_dir) if n.startswith("process_"))
  assert states == ["process_0-of-2.json", "process_1-of-2.json"]

  cfg = _config(shape, num_steps=3, checkpoint_every=1)
  mesh = partitioning.make_mesh(shape, devices=jax.devices()[:4])
  ref_work = tmp_path / "one"
  loop.train_and_evaluate(cfg, str(ref_work), toy.make_task(), toy.make_iterator(cfg), mesh=mesh)

  # Same loss at every step (process 0 writes metrics.jsonl): same global batches.
  two, one = _losses(work), _losses(ref_work)
  assert sorted(two) == sorted(one) == [1, 2, 3]
  np.testing.assert_allclose([two[k] for k in (1, 2, 3)], [one[k] for k in (1, 2, 3)], rtol=1e-5)
  # The two-process checkpoint, read back here, holds the 1-process run's state.
  got, got_step = _restore(str(work), cfg, mesh)
  want, want_step = _restore(str(ref_work), cfg, mesh)
  assert got_step == want_step == 3
  errs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got["params"], want["params"])
  assert max(jax.tree.leaves(errs)) < 1e-5, errs
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- SIGKILL mid-save

STEPS = 8
HIDDEN = 256  # wider than the default toy MLP: a save takes a little longer


def _complete_steps(ckdir):
  return sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if os.path.isdir(ckdir) else []


def _in_progress(ckdir, min_step):
  """Steps >= min_step whose save has started but not finished (temporary dirs)."""
  if not os.path.isdir(ckdir):
    return []
  steps = [int(m.group(1)) for n in os.listdir(ckdir) if (m := re.match(r"(\d+)" + TMP, n))]
  return sorted(s for s in steps if s >= min_step)


def _kill_mid_save(proc, ckdir, min_step, timeout=180.0):
  """Freezes the worker (SIGSTOP) when a save of a step >= min_step is in progress,
  confirms the temporary directory is still there while nothing runs, then SIGKILLs.
  Returns the step whose save was cut off."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"worker exited ({proc.returncode}) before a save of >= {min_step}")
    if _in_progress(ckdir, min_step):
      os.kill(proc.pid, signal.SIGSTOP)
      os.waitpid(proc.pid, os.WUNTRACED)  # returns once every thread is stopped
      cut = _in_progress(ckdir, min_step)
      if cut:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return cut[-1]
      os.kill(proc.pid, signal.SIGCONT)  # the save finished in between: go on
    time.sleep(0.002)
  proc.kill()
  raise AssertionError(f"no save of a step >= {min_step} seen in {timeout} s")


def _resumed_from(log_path):
  found = re.findall(r"resumed from \S*/checkpoints/(\d+)", open(log_path, errors="replace").read())
  return int(found[-1]) if found else None


@pytest.mark.parametrize("kills", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_during_async_save_resumes_from_last_complete_step(tmp_path, caplog, kills):
  """``kills`` runs killed while an asynchronous save is in progress (the second one
  after resuming), then a run to the end: every restart resumes from the newest
  complete step, warns about the half-written directory without deleting it, and the
  final state equals an uninterrupted run's."""
  work = tmp_path / "killed"
  ckdir = work / "checkpoints"
  args = ("--num_steps", STEPS, "--checkpoint_every", 1, "--mesh", "2,1", "--hidden", HIDDEN)
  args += ("--keep_checkpoints", STEPS)
  shape = {"data": 2, "fsdp": 1}
  cfg = _config(shape, num_steps=STEPS, checkpoint_every=1, keep_checkpoints=STEPS)
  mesh = partitioning.make_mesh(shape, devices=jax.devices()[:2])

  resume_at = 0
  for attempt in range(kills):
    log = tmp_path / f"run{attempt}.log"
    proc = _start(work, log, *args)
    cut = _kill_mid_save(proc, str(ckdir), min_step=resume_at + 2)
    complete = _complete_steps(str(ckdir))
    assert proc.returncode == -signal.SIGKILL
    if attempt:
      assert _resumed_from(log) == resume_at, _tail(log)
    # Saves run one at a time, so the step before the cut one is complete and newest.
    assert complete[-1] == cut - 1, (complete, cut)
    tmp_dir = ckdir / f"{cut}{TMP}"
    assert tmp_dir.is_dir()
    # Restoring here skips the half-written step with a warning and leaves it on disk.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facediff.train.checkpoint"):
      _, step = _restore(str(work), cfg, mesh, hidden=HIDDEN)
    assert step == cut - 1
    assert any(str(tmp_dir) in r.getMessage() for r in caplog.records), caplog.text
    assert tmp_dir.is_dir()
    resume_at = cut - 1

  log = tmp_path / "final.log"
  proc = _start(work, log, *args)
  assert proc.wait(timeout=240) == 0, _tail(log)
  text = open(log, errors="replace").read()
  assert f"{TMP} is incomplete" in text and _resumed_from(log) == resume_at, text[-3000:]
  summary = json.load(open(work / "summary_0.json"))
  assert summary["start_step"] == resume_at and summary["step"] == STEPS
  assert _complete_steps(str(ckdir)) == list(range(1, STEPS + 1))

  ref = tmp_path / "uninterrupted"
  ref_cfg = _config(shape, num_steps=STEPS, checkpoint_every=0)  # saves the last step only
  task = toy.make_task(hidden=HIDDEN)
  loop.train_and_evaluate(ref_cfg, str(ref), task, toy.make_iterator(ref_cfg), mesh=mesh)
  got, got_step = _restore(str(work), cfg, mesh, hidden=HIDDEN)
  want, want_step = _restore(str(ref), cfg, mesh, hidden=HIDDEN)
  assert got_step == want_step == STEPS
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  # The same losses step by step, the replayed steps included.
  np.testing.assert_array_equal(
    [_losses(work)[k] for k in range(1, STEPS + 1)], [_losses(ref)[k] for k in range(1, STEPS + 1)]
  )


@pytest.mark.slow  # two processes training until the signal: about a minute on 2 cores
@pytest.mark.multihost
def test_sigterm_to_one_process_stops_every_process_at_the_same_saved_step(tmp_path):
  """A preemption notice (SIGTERM) reaching one process of two: jax.distributed's
  preemption service agrees on one step, both processes save it and exit cleanly."""
  work = tmp_path / "run"
  port = _free_port()
  logs = [tmp_path / f"worker{i}.log" for i in range(2)]
  procs = [
    _start(
      work,
      logs[i],
      *("--num_steps", 100000, "--checkpoint_every", 100000, "--mesh", "2,2"),
      *("--coordinator", f"localhost:{port}", "--num_processes", 2, "--process_id", i),
    )
    for i in range(2)
  ]
  try:
    deadline = time.monotonic() + 180
    while "compiled train step" not in open(logs[1], errors="replace").read():
      assert time.monotonic() < deadline and procs[1].poll() is None, _tail(logs[1])
      time.sleep(0.2)
    time.sleep(1.0)  # a few steps in
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=120)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, _tail(log)
  summaries = [json.load(open(work / f"summary_{i}.json")) for i in range(2)]
  step = summaries[0]["step"]
  assert 0 < step < 100000
  for s in summaries:
    assert s["preempted"] is True and s["step"] == step and s["checkpoints"] == [step]
