"""Flag-free pieces shared by the inference command lines (``launch.sample``,
``launch.evaluate``): loading a trained DiffSFSR workdir and resolving user inputs."""

from __future__ import annotations

import json
import os

import numpy as np


class SampleError(ValueError):
  """A user input that cannot be used; the message names it."""


# ----------------------------------------------------------------------------- model


def load_trained(workdir: str):
  """(config, DiffSFSR, params, frozen, step) from a training workdir."""
  import ml_collections

  from facediff import partitioning
  from facediff.train import checkpoint as ckpt_lib
  from facediff.train import diffsfsr_task
  from facediff.train import state as state_lib

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise SampleError(f"{workdir}: not a training workdir (no config.json)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.model.name != "diffsfsr":
    raise SampleError(f"{path}: model {config.model.name!r}; launch.sample runs diffsfsr")
  model = diffsfsr_task.DiffSFSR(config)
  task = model.task()
  mesh = partitioning.make_mesh({"data": -1, "fsdp": 1})
  with partitioning.activation_rules(mesh):
    abstract, _, _ = state_lib.abstract_state(task, config, mesh)
    frozen, _ = state_lib.shard_frozen(task, mesh)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.train)
    restored = ck.restore_latest(abstract)
    ck.close()
  if restored is None:
    raise SampleError(f"{workdir}/checkpoints: no complete checkpoint")
  state, step = restored
  params = state.ema_params if state.ema_params is not None else state.params
  return config, model, params, frozen, step


def encoder_names(config) -> list[str]:
  """The exporter encoders that wrote the fields the model reads (from the training
  set's manifest)."""
  from data_pipelines import records

  manifest = records.Manifest.load(config.data.path)
  wanted = [*config.data.id_fields, config.data.exp_field, config.data.mask_field]
  names = []
  for f in wanted:
    spec = manifest.fields.get(f)
    if spec is None:
      raise SampleError(f"{config.data.path}: the training set has no field {f!r}")
    if spec.encoder not in names:
      names.append(spec.encoder)
  return names


# ----------------------------------------------------------------------------- jobs


def expression_embedding(config, word: str, index_dir: str | None, seed: int) -> np.ndarray:
  """The expression embedding of a reference record of ``word`` from the index."""
  from data_pipelines import expression_index, records
  from facediff import expressions

  vocab = expressions.vocabulary()
  if word not in vocab:
    close = ", ".join(vocab.closest(word, 3))
    raise SampleError(f"--expression {word!r}: not in the 135-word vocabulary (close: {close})")
  folder = index_dir or config.data.path
  manifest = records.Manifest.load(folder)
  if "expression" in manifest.fields:
    index = expression_index.index_from_dataset(folder)
  else:
    index = expression_index.index_from_fer(folder, field="exp_fer")
  if vocab.label(word) not in index.by_label:
    have = ", ".join(vocab.word(lab) for lab in index.labels())
    raise SampleError(f"--expression {word!r}: no reference in {folder} (it has: {have})")
  key = index.sample(word, np.random.default_rng(seed))
  for rec in records.iter_records(folder):
    k = rec["key"].decode() if isinstance(rec["key"], bytes) else rec["key"]
    if k == key:
      return np.asarray(rec[config.data.exp_field], np.float32)
  raise SampleError(f"{folder}: index names record {key!r}, which is missing")
