"""Flag-free pieces shared by the inference command lines (``launch.sample``,
``launch.evaluate``): loading trained DiffSFSR, TGDM and EmoA2E workdirs and resolving
user inputs."""

from __future__ import annotations

import json
import os

import numpy as np


class SampleError(ValueError):
  """A user input that cannot be used; the message names it."""


# ----------------------------------------------------------------------------- model


def read_config(workdir: str, expect: str | tuple[str, ...] | None = None):
  """The ``config.json`` a training run wrote into ``workdir``; ``expect``: the model
  name(s) the caller can run."""
  import ml_collections

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise SampleError(f"{workdir}: not a training workdir (no config.json)")
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise SampleError(f"{path}: unreadable ({e})") from None
  name = config.get("model", {}).get("name") if "model" in config else None
  if expect is not None:
    names = (expect,) if isinstance(expect, str) else tuple(expect)
    if name not in names:
      raise SampleError(f"{path}: model {name!r}; expected {' or '.join(names)}")
  return config


def restore(workdir: str, config, task, *, use_ema: bool = True):
  """(params, frozen, step) of the latest complete checkpoint of ``workdir``: the EMA
  params when the run kept them and ``use_ema``, else the trained ones."""
  from facediff import partitioning
  from facediff.train import checkpoint as ckpt_lib
  from facediff.train import state as state_lib

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
  params = state.ema_params if use_ema and state.ema_params is not None else state.params
  return params, frozen, int(step)


def load_trained(workdir: str, *, use_ema: bool = True):
  """(config, DiffSFSR, params, frozen, step) from a DiffSFSR training workdir."""
  from facediff.train import diffsfsr_task

  config = read_config(workdir, "diffsfsr")
  model = diffsfsr_task.DiffSFSR(config)
  params, frozen, step = restore(workdir, config, model.task(), use_ema=use_ema)
  return config, model, params, frozen, step


def tgdm_pipeline(config, emoa2e_config=None):
  """The TGDMPipeline of a TGDM training config: its denoiser config, its morphable
  model (``model.bfm_path``, or the synthetic set's) and its sampler settings."""
  from facediff.pipelines import tgdm as pipe_lib
  from facediff.train import tgdm_task

  mc = config.model
  settings = pipe_lib.Settings(
    schedule=str(mc.schedule),
    num_train_timesteps=int(mc.num_train_timesteps),
    method=str(mc.sample_method),
    num_steps=None if mc.sample_steps is None else int(mc.sample_steps),
    render_window=int(mc.render_window),
    coeff_layout=str(config.data.get("coeff_layout", "d3dfr")),
  )
  try:
    morph = tgdm_task.load_morphable_model(config)
  except FileNotFoundError as e:
    raise SampleError(str(e)) from None
  return pipe_lib.TGDMPipeline(
    tgdm_task.model_config(config), morph, settings, emoa2e_config=emoa2e_config
  )


def load_tgdm(workdir: str, *, use_ema: bool = True, emoa2e_config=None):
  """(config, TGDMPipeline, params, step) from a TGDM training workdir (reenact or
  swap mode, ``config.model.mode``)."""
  from facediff.train import tgdm_task

  config = read_config(workdir, "tgdm")
  task = tgdm_task.make_task(config)
  params, _, step = restore(workdir, config, task, use_ema=use_ema)
  return config, tgdm_pipeline(config, emoa2e_config), params, step


def load_emoa2e(workdir: str, *, use_ema: bool = True):
  """(config, EmoA2EConfig, params, step) from an EmoA2E training workdir."""
  from facediff.train import emoa2e_task

  config = read_config(workdir, "emoa2e")
  task = emoa2e_task.make_task(config)
  params, _, step = restore(workdir, config, task, use_ema=use_ema)
  return config, emoa2e_task.model_config(config), params, step


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
