"""Fields shared by every facediff experiment config (plain data, no project code).

Each experiment file in ``configs/`` builds its ConfigDict from these pieces and
overrides what differs; any field can be overridden on the command line with
``--config.<path>=<value>`` (ml_collections ``config_flags``).
"""

from __future__ import annotations

import ml_collections


def mesh(**axes) -> ml_collections.ConfigDict:
  """Device mesh axis sizes in order (``data`` outer, ``fsdp`` inner); one -1 is
  filled with whatever the device count leaves (facediff.partitioning.make_mesh)."""
  shape = {"data": -1, "fsdp": 1}
  shape.update(axes)
  return ml_collections.ConfigDict(shape)


def data(**overrides) -> ml_collections.ConfigDict:
  """What the grain loaders read (see data_pipelines/loaders.py for every field)."""
  fields = dict(
    path="",  # dataset folder with manifest.json and the ArrayRecord shards
    # Held-out dataset (same fields) whose first batch the trainer evaluates every
    # train.eval_every steps; "" = the first batch of the training set.
    eval_path="",
    global_batch_size=8,
    image_size=128,
    id_fields=["id_dlib"],  # the identity compound, in order
    id_dims=[128],  # checked against the manifest at start
    exp_field="exp_fer",
    exp_dim=7,
    mask_field="mask",
    latent_field="",  # cached VAE latents ("" = none)
    crop_fields=[],  # encoder crop kinds whose crop_<kind> transforms batches carry
    seed=0,
    num_workers=0,  # grain worker processes (0 = decode in the main process)
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def logging(**overrides) -> ml_collections.ConfigDict:
  """Where and how often progress is reported (process 0 only)."""
  fields = dict(log_every=10, level="INFO")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def optim(**overrides) -> ml_collections.ConfigDict:
  """AdamW with global-norm clipping and a warm-up / constant / linear-decay learning
  rate (facediff.train.optim): ``constant_steps=None`` keeps the rate constant after
  the warm-up; with ``constant_steps`` and ``decay_steps`` it then decays to ``end_lr``."""
  fields = dict(
    lr=1e-4,
    end_lr=0.0,
    warmup_steps=0,
    constant_steps=None,
    decay_steps=0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=1e-2,
    max_grad_norm=1.0,
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def train(**overrides) -> ml_collections.ConfigDict:
  """The loop's schedule (facediff.train.loop): steps, micro-batches, how often to log,
  checkpoint (async, keep the last ``keep_checkpoints``, or with ``keep_best_metric``, an
  eval metric's name, the best ``keep_checkpoints`` by it, ``keep_best_mode`` "min" or
  "max", and the newest), sample previews and evaluate (``eval_every`` > 0: the task's
  eval metrics on a fixed batch of ``data.eval_path``); ``profile_steps=[a, b]`` traces
  steps a..b for TensorBoard/XProf."""
  fields = dict(
    num_steps=1000,
    seed=0,
    grad_accum_steps=1,
    log_every=10,
    checkpoint_every=500,
    keep_checkpoints=3,
    keep_best_metric="",
    keep_best_mode="min",
    sample_every=500,
    eval_every=0,
    profile_steps=[],
    async_checkpointing=True,
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)
