"""EmoA2E's training loss (TGDM Sec. 4.2, Eq. 12-14).

    L_rec = ||beta - beta_hat||_2                  (Eq. 12)
    L_lm  = ||l - l_hat||_2                        (Eq. 13)
    L     = lambda_rec L_rec + lambda_lm L_lm      (Eq. 14; lambda_rec = 100, lambda_lm = 0.1)

The paper writes plain L2 norms; we read them as Euclidean distances, not squared:
L_rec is the distance between the 64-D expression vectors of a frame, L_lm the distance
between corresponding landmarks (2-D, pixels of the landmark camera), both averaged
over frames (and landmarks) and the batch. l are the 68 landmarks of the ground-truth
3DMM rho, l_hat those of "the modified one" rho_hat, i.e. rho with its expression
replaced by beta_hat (identity and pose stay rho's), projected through facediff.render.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from facediff.render import mesh
from facediff.render.bfm import MorphableModel

LAMBDA_REC = 100.0
LAMBDA_LM = 0.1


def landmark_model(model: MorphableModel) -> MorphableModel:
  """The morphable model cut to its 68 keypoint vertices (keypoints 0..67, no mesh):
  the landmarks of any coefficients are those of the full model, for 68 / N of the
  cost. Host (numpy) arrays in and out."""
  kp = np.asarray(model.keypoints)
  n = model.num_vertices

  def rows(base):
    base = np.asarray(base)
    return base.reshape(n, 3, base.shape[-1])[kp].reshape(3 * len(kp), base.shape[-1])

  return dataclasses.replace(
    model,
    mean_shape=np.asarray(model.mean_shape)[kp],
    id_base=rows(model.id_base),
    exp_base=rows(model.exp_base),
    mean_tex=np.asarray(model.mean_tex)[kp],
    tex_base=rows(model.tex_base),
    triangles=np.zeros((0, 3), np.int32),
    point_buf=np.zeros((len(kp), 1), np.int32),
    keypoints=np.arange(len(kp), dtype=np.int32),
    front_mask=np.zeros((0,), np.int32),
    skin_mask=np.asarray(model.skin_mask)[kp],
  )


def landmarks(
  model: MorphableModel,
  identity: jax.Array,
  expression: jax.Array,
  angle: jax.Array,
  translation: jax.Array,
  camera: mesh.Camera,
) -> jax.Array:
  """The 68 projected landmarks (..., 68, 2), pixels (col, row), of coefficients with
  any leading axes (D3DFR ``compute_for_render``'s shape, pose and camera; TGDM Eq. 7)."""
  shape = mesh.face_shape(model, identity, expression)
  posed = mesh.rigid_transform(shape, mesh.rotation_matrix(angle), translation)
  return mesh.landmarks(model, posed, camera)


def _distance(d: jax.Array) -> jax.Array:
  """||d||_2 over the last axis, with gradient 0 (not NaN) where d = 0."""
  sq = jnp.sum(jnp.square(d.astype(jnp.float32)), axis=-1)
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def reconstruction_loss(beta: jax.Array, beta_hat: jax.Array) -> jax.Array:
  """TGDM Eq. 12: ||beta - beta_hat||_2 per frame, averaged over frames and batch."""
  return jnp.mean(_distance(beta - beta_hat))


def landmark_loss(lm: jax.Array, lm_hat: jax.Array) -> jax.Array:
  """TGDM Eq. 13: ||l - l_hat||_2 per landmark, averaged over the 68 points, frames
  and batch (pixels)."""
  return jnp.mean(_distance(lm - lm_hat))


def emoa2e_loss(
  beta_hat: jax.Array,
  target: dict[str, Any],
  model: MorphableModel,
  camera: mesh.Camera,
  lambda_rec: float = LAMBDA_REC,
  lambda_lm: float = LAMBDA_LM,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TGDM Eq. 14 for predictions ``beta_hat`` (B, F, 64) and ground truth ``target``
  with ``identity`` (B, 80), ``expression`` (B, F, 64), ``angle`` (B, F, 3) and
  ``translation`` (B, F, 3). Returns (loss, {"loss_rec", "loss_lm", "loss"})."""
  beta = target["expression"]
  frames = beta.shape[1]
  identity = jnp.broadcast_to(
    target["identity"][:, None], (beta.shape[0], frames, target["identity"].shape[-1])
  )
  pose = (target["angle"], target["translation"])
  lm = landmarks(model, identity, beta, *pose, camera)
  lm_hat = landmarks(model, identity, beta_hat, *pose, camera)
  rec = reconstruction_loss(beta, beta_hat)
  lmk = landmark_loss(lm, lm_hat)
  loss = lambda_rec * rec + lambda_lm * lmk
  return loss, {"loss_rec": rec, "loss_lm": lmk, "loss": loss}
