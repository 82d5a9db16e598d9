"""DiffSFSR as a trainer ``Task``: the conditioned denoiser (models.diffsfsr), the loss
of Eq. 3-7 (losses.diffsfsr) and a PNDM/DDIM preview sampler.

Config fields (``config.model``): ``latent_space`` ("pixels": the diffusion runs on
the image in [-1, 1], for CPU demos), ``unet`` (UNetConfig fields; ``in_channels`` /
``out_channels`` are derived), ``schedule`` ("linear" / "scaled_linear"),
``estimator`` (improved_midpoint / midpoint / one_step / none), ``lambda_id``,
``lambda_exp``, ``id_dropout``, ``exp_dropout``, ``sample_method``, ``sample_steps``;
``config.data.id_fields`` / ``id_dims`` / ``exp_field`` / ``exp_dim`` give the
compound.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from facediff.diffusion import make_schedule, sample
from facediff.losses import diffsfsr as diffsfsr_loss
from facediff.models import diffsfsr
from facediff.models.unet import UNetConfig
from facediff.train.task import Task

LATENT_SPACES = ("pixels",)


def model_config(config) -> diffsfsr.DiffSFSRConfig:
  mc = config.model
  if mc.latent_space not in LATENT_SPACES:
    raise ValueError(
      f"config.model.latent_space={mc.latent_space!r}: this trainer supports {LATENT_SPACES}"
    )
  channels = 3
  unet_fields = dict(mc.unet)
  unet_fields.update(in_channels=2 * channels + 1, out_channels=channels)
  unet_fields["sample_size"] = int(config.data.image_size)
  id_dims = tuple(int(d) for d in config.data.id_dims)
  if len(id_dims) != len(config.data.id_fields):
    raise ValueError(
      f"config.data.id_dims {list(id_dims)} and config.data.id_fields "
      f"{list(config.data.id_fields)} have different lengths"
    )
  return diffsfsr.DiffSFSRConfig(
    unet=UNetConfig(**unet_fields),
    latent_channels=channels,
    id_dims=id_dims,
    exp_dim=int(config.data.exp_dim),
    mlp_hidden=mc.get("mlp_hidden"),
  )


def batch_condition(batch: dict[str, Any], id_fields) -> dict[str, Any]:
  """The denoiser's condition from a loader batch: M * I_bkg with M = 1 off the face
  (the face region is what the model generates), the face mask, the identity compound
  and the expression embedding."""
  face = batch["bkg_mask"]
  return {
    "bkg": batch["bkg_image"] * (1.0 - face),
    "mask": face,
    "id": [batch["id"][f] for f in id_fields],
    "exp": batch["exp"],
  }


def make_task(config) -> Task:
  mc = config.model
  cfg = model_config(config)
  schedule = make_schedule(str(mc.schedule))
  id_fields = list(config.data.id_fields)
  id_dropout = float(mc.get("id_dropout", 0.0))
  exp_dropout = float(mc.get("exp_dropout", 0.0))
  if float(mc.lambda_id) > 0 or float(mc.lambda_exp) > 0:
    raise ValueError(
      "config.model.lambda_id / lambda_exp > 0 need the in-graph face encoders, which this "
      "task does not wire yet: set both to 0 (L_DM only)"
    )

  def init(key):
    return diffsfsr.init_params(cfg, key)

  def loss_fn(params, frozen, batch, rng, model_state):
    del frozen, model_state
    cond = batch_condition(batch, id_fields)
    key_drop, key_loss = jax.random.split(rng)
    b = batch["bkg_image"].shape[0]
    if id_dropout > 0 or exp_dropout > 0:
      k1, k2 = jax.random.split(key_drop)
      cond["drop_id"] = jax.random.bernoulli(k1, id_dropout, (b,))
      cond["drop_exp"] = jax.random.bernoulli(k2, exp_dropout, (b,))

    def eps_fn(z, t, c):
      return diffsfsr.apply(cfg, params, z, t, c)

    return diffsfsr_loss.diffsfsr_loss(
      eps_fn,
      schedule,
      batch["bkg_image"],
      cond,
      key_loss,
      estimator=str(mc.estimator),
      lambda_id=float(mc.lambda_id),
      lambda_exp=float(mc.lambda_exp),
    )

  def sample_fn(params, frozen, batch, rng):
    del frozen
    cond = batch_condition(batch, id_fields)
    noise = jax.random.normal(rng, batch["bkg_image"].shape, jnp.float32)
    out = sample(
      lambda z, t, c: diffsfsr.apply(cfg, params, z, t, c),
      schedule,
      noise,
      method=str(mc.sample_method),
      num_steps=int(mc.sample_steps),
      cond=cond,
    )
    return jnp.clip(out, -1.0, 1.0)

  return Task(name="diffsfsr", init=init, loss_fn=loss_fn, sample_fn=sample_fn)
