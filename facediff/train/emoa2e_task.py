"""EmoA2E as a trainer ``Task``: the transformer of models.emoa2e (TGDM Eq. 9-11) and the
loss of losses.emoa2e (Eq. 12-14).

Config fields (``config.model``): ``hidden``, ``num_layers``, ``num_heads``,
``mlp_dim``, ``token_mlp_dim``, ``emotion`` (False: the emotion-free variant),
``text_dim``, ``dropout``, ``norm_first``, ``dtype`` (EmoA2EConfig), ``lambda_rec``,
``lambda_lm``, ``landmark_image_size`` (the landmark camera), ``bfm_path`` ("" = the
synthetic morphable model of ``bfm_vertices`` / ``bfm_seed``); ``config.audio``
(facediff.audio.MFCCConfig: ``clip_frames``, ``n_mfcc`` shape the input).

Batches (B sequences of F frames): ``mfcc`` (B, F, clip_frames, n_mfcc), ``identity``
(B, 80), ``expression`` (B, F, 64), ``angle`` (B, F, 3), ``translation`` (B, F, 3),
and for the emotional variant ``emotion`` (B, text_dim) and ``intensity`` (B,).

The frozen input is the morphable model cut to its 68 keypoints (the loss needs only
the landmarks).
"""

from __future__ import annotations

import jax

from facediff.losses import emoa2e as emoa2e_loss
from facediff.models import emoa2e
from facediff.render import bfm, mesh
from facediff.train.task import Task


def model_config(config) -> emoa2e.EmoA2EConfig:
  mc = config.model
  return emoa2e.EmoA2EConfig(
    clip_frames=int(config.audio.clip_frames),
    n_mfcc=int(config.audio.n_mfcc),
    text_dim=int(mc.text_dim),
    hidden=int(mc.hidden),
    num_layers=int(mc.num_layers),
    num_heads=int(mc.num_heads),
    mlp_dim=int(mc.mlp_dim),
    token_mlp_dim=mc.get("token_mlp_dim"),
    emotion=bool(mc.emotion),
    dropout=float(mc.get("dropout", 0.0)),
    norm_first=bool(mc.get("norm_first", False)),
    dtype=str(mc.get("dtype", "float32")),
  )


def morphable_model(config) -> bfm.MorphableModel:
  """The BFM file of ``config.model.bfm_path``, or the synthetic model if it is empty."""
  mc = config.model
  if mc.get("bfm_path"):
    return bfm.load_bfm(mc.bfm_path)
  return bfm.synthetic_bfm(int(mc.get("bfm_vertices", 400)), seed=int(mc.get("bfm_seed", 0)))


def predict(cfg: emoa2e.EmoA2EConfig, params, batch, rng=None) -> jax.Array:
  """beta_hat (B, F, 64) for a batch; dropout is on when ``rng`` is given."""
  extra = {"emotion": batch["emotion"], "intensity": batch["intensity"]} if cfg.emotion else {}
  train = rng is not None and cfg.dropout > 0
  return emoa2e.apply(
    cfg,
    params,
    batch["mfcc"],
    batch["identity"],
    **extra,
    deterministic=not train,
    rngs={"dropout": rng} if train else None,
  )


def make_task(config) -> Task:
  mc = config.model
  cfg = model_config(config)
  camera = mesh.camera_for_size(int(mc.get("landmark_image_size", mesh.D3DFR_IMAGE_SIZE)))
  lambda_rec = float(mc.get("lambda_rec", emoa2e_loss.LAMBDA_REC))
  lambda_lm = float(mc.get("lambda_lm", emoa2e_loss.LAMBDA_LM))

  def init(key):
    return emoa2e.init_params(cfg, key)

  def loss_fn(params, frozen, batch, rng, model_state):
    del model_state
    beta_hat = predict(cfg, params, batch, rng)
    return emoa2e_loss.emoa2e_loss(beta_hat, batch, frozen, camera, lambda_rec, lambda_lm)

  return Task(
    name="emoa2e",
    init=init,
    loss_fn=loss_fn,
    frozen=emoa2e_loss.landmark_model(morphable_model(config)),
  )
