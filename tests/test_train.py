"""The trainer (facediff.train) on a tiny MLP task: end to end, sharding equivalence,
exact resumption, checkpoint robustness, non-finite stop, mesh-change restore."""

import glob
import json
import os

import _toy_task as toy
import jax
import numpy as np
import pytest

from facediff import partitioning
from facediff.train import checkpoint as ckpt_lib
from facediff.train import loop
from facediff.train import state as state_lib
from facediff.train import step as step_lib


def _params_np(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def _restore_params(workdir, config, mesh, task=None):
  task = task or toy.make_task()
  with partitioning.activation_rules(mesh):
    abstract, _, _ = state_lib.abstract_state(task, config, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.train)
    restored = ck.restore_latest(abstract)
    ck.close()
  return restored


def test_one_step_end_to_end_writes_everything(tmp_path):
  cfg = toy.make_config(num_steps=2, checkpoint_every=1, sample_every=1)
  summary = loop.train_and_evaluate(cfg, str(tmp_path), toy.make_task(), toy.make_iterator(cfg))
  assert summary["step"] == 2 and summary["checkpoints"] == [1, 2]
  assert summary["num_params"] == toy.DIM * toy.HIDDEN * 2 + toy.HIDDEN + toy.DIM
  assert summary["flops_per_step"] > 0
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  scalars = [x for x in lines if "loss" in x]
  assert [x["step"] for x in scalars] == [1, 2]
  for key in ("loss", "mse", "reg", "grad_norm", "lr", "steps_per_sec", "eta_sec"):
    assert np.isfinite(scalars[-1][key]), key
  assert scalars[0]["lr"] == 0.0  # warm-up starts at 0
  assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert os.path.exists(tmp_path / "samples" / "samples_0000002.png")


def _run_steps(config, mesh, n=3):
  task = toy.make_task()
  with partitioning.activation_rules(mesh):
    state, shardings, tx = state_lib.create_train_state(task, config, mesh)
    step, *_ = step_lib.make_train_step(task, tx, config, mesh, shardings, None)
    it = toy.make_iterator(config)
    losses = []
    for _ in range(n):
      batch = loop.place_batch(next(it), mesh, config.data.global_batch_size)
      state, metrics = step(state, None, batch)
      losses.append(float(metrics["loss"]))
  return state, losses


def _bytes_on(device, tree):
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def test_sharded_equals_single_device_and_fsdp_splits_memory():
  cfg = toy.make_config()
  one = partitioning.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  ref_state, ref_losses = _run_steps(cfg, one)
  for shape in ({"data": 1, "fsdp": 8}, {"data": 4, "fsdp": 2}):
    mesh = partitioning.make_mesh(shape)
    state, losses = _run_steps(cfg, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      _params_np(state),
      _params_np(ref_state),
    )
    if shape["fsdp"] == 8:
      d0 = jax.devices()[0]
      full = sum(x.nbytes for x in jax.tree.leaves(jax.device_get(state.params)))
      # Biases of 16 and 64 are split too (both divide by 8): exactly 1/8 per device.
      assert _bytes_on(d0, state.params) == full // 8
      opt_full = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.opt_state))
      opt_d0 = _bytes_on(d0, state.opt_state)
      assert opt_d0 < opt_full / 8 + 64  # moments split; only step counters replicated


def test_gradient_accumulation_equals_one_big_batch():
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 4})
  s1, l1 = _run_steps(toy.make_config(grad_accum_steps=1), mesh, n=2)
  s2, l2 = _run_steps(toy.make_config(grad_accum_steps=2), mesh, n=2)
  # The noise differs per micro-batch key, so compare loosely in value, exactly in shape.
  np.testing.assert_allclose(l1, l2, rtol=0.05)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0.05, atol=2e-3),
    _params_np(s1),
    _params_np(s2),
  )


def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
  full = toy.make_config(num_steps=6, checkpoint_every=3)
  loop.train_and_evaluate(full, str(tmp_path / "a"), toy.make_task(), toy.make_iterator(full))
  half = toy.make_config(num_steps=3, checkpoint_every=3)
  loop.train_and_evaluate(half, str(tmp_path / "b"), toy.make_task(), toy.make_iterator(half))
  summary = loop.train_and_evaluate(
    full, str(tmp_path / "b"), toy.make_task(), toy.make_iterator(full)
  )
  assert summary["start_step"] == 3
  mesh = partitioning.make_mesh(dict(full.mesh))
  a, step_a = _restore_params(str(tmp_path / "a"), full, mesh)
  b, step_b = _restore_params(str(tmp_path / "b"), full, mesh)
  assert step_a == step_b == 6
  for x, y in zip(
    jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_incomplete_and_corrupt_steps_are_skipped_not_deleted(tmp_path, caplog):
  cfg = toy.make_config(num_steps=6, checkpoint_every=3)
  loop.train_and_evaluate(cfg, str(tmp_path), toy.make_task(), toy.make_iterator(cfg))
  ckdir = tmp_path / "checkpoints"
  # A save killed midway leaves a temporary directory: never listed, never restored.
  os.makedirs(ckdir / "9.orbax-checkpoint-tmp-1234" / "state")
  # Corrupt the newest complete step's array data.
  for f in glob.glob(str(ckdir / "6" / "state" / "**" / "*"), recursive=True):
    if os.path.isfile(f) and "d/" in f.replace(os.sep, "/"):
      open(f, "wb").close()
  mesh = partitioning.make_mesh(dict(cfg.mesh))
  restored = _restore_params(str(tmp_path), cfg, mesh)
  assert restored is not None and restored[1] == 3
  assert os.path.isdir(ckdir / "6") and os.path.isdir(ckdir / "9.orbax-checkpoint-tmp-1234")
  assert any("checkpoint" in r.message and "6" in r.message for r in caplog.records)
  tmp_dir = str(ckdir / "9.orbax-checkpoint-tmp-1234")
  assert any(tmp_dir in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records)


def test_non_finite_loss_stops_with_terms_and_keeps_last_good_checkpoint(tmp_path):
  cfg = toy.make_config(num_steps=8, checkpoint_every=2)
  it = toy.make_iterator(cfg, shuffle=False)  # batch k holds records 8k..8k+7
  with pytest.raises(loop.NonFiniteLossError, match=r"step 3: .*'mse'.*'reg'"):
    loop.train_and_evaluate(cfg, str(tmp_path), toy.make_task(nan_after=24), it)
  mesh = partitioning.make_mesh(dict(cfg.mesh))
  state, step = _restore_params(str(tmp_path), cfg, mesh)
  assert step == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(state)))


def test_restore_onto_a_different_mesh(tmp_path):
  cfg = toy.make_config(num_steps=3, checkpoint_every=3)
  cfg.mesh = {"data": 1, "fsdp": 8}
  loop.train_and_evaluate(cfg, str(tmp_path), toy.make_task(), toy.make_iterator(cfg))
  eight, _ = _restore_params(str(tmp_path), cfg, partitioning.make_mesh(dict(cfg.mesh)))
  two = partitioning.make_mesh({"data": 1, "fsdp": 2}, devices=jax.devices()[:2])
  small, step = _restore_params(str(tmp_path), cfg, two)
  assert step == 3
  leaf = jax.tree.leaves(small.params)[0]
  assert len(leaf.sharding.device_set) == 2
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
    jax.device_get(eight.params),
    jax.device_get(small.params),
  )


def test_checkpoint_of_other_shapes_fails_before_compiling_naming_the_parameter(tmp_path):
  cfg = toy.make_config(num_steps=3, checkpoint_every=3)
  loop.train_and_evaluate(cfg, str(tmp_path), toy.make_task(), toy.make_iterator(cfg))
  cfg6 = toy.make_config(num_steps=6)
  want = r"params/fc1/bias has shape \(64,\) in the checkpoint, the config builds \(32,\)"
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=want):
    loop.train_and_evaluate(cfg6, str(tmp_path), toy.make_task(hidden=32), toy.make_iterator(cfg6))


def test_config_errors_are_named():
  mesh = partitioning.make_mesh({"data": 8, "fsdp": 1})
  bad = toy.make_config(grad_accum_steps=3)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    _run_steps(bad, mesh, n=1)
  no_lr = toy.make_config()
  no_lr.optim.lr = None
  with pytest.raises(ValueError, match="config.optim.lr"):
    _run_steps(no_lr, mesh, n=1)
