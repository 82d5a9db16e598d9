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
