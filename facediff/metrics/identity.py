"""Identity, expression and landmark metrics on embeddings and landmark arrays: pure jnp,
jit-able.

The embeddings come from the frozen encoders of ``facediff.losses.face_encoders``
(``embed(encoder, params, images, crops)``): identity (ArcFace "ID-A", CurricularFace
"ID-C", dlib, FaceNet; DiffSFSR uses CosFace for "ID."), expression (DLN, fer).
Landmarks are 68-point arrays in pixel coordinates (the iBUG order that
``facediff.render`` projects and dlib's shape predictor gives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from facediff.losses import emoa2e as emoa2e_loss
from facediff.losses import face_encoders
from facediff.render import mesh
from facediff.render.bfm import MorphableModel

_HIGHEST = jax.lax.Precision.HIGHEST
_EPS = 1e-12

# iBUG 68-point indices.
MOUTH = tuple(range(48, 68))  # outer lips 48-59, inner lips 60-67 (TGDM's mouth LMD)
OUTER_EYE_CORNERS = (36, 45)  # right eye's outer corner, left eye's outer corner


def face_embeddings(
  encoder: face_encoders.FaceEncoder,
  params,
  images: jax.Array,
  crops: dict[str, jax.Array],
  value_range: tuple[float, float] = (-1.0, 1.0),
) -> jax.Array:
  """The embeddings the metrics below compare: ``facediff.losses.face_encoders.embed``
  (the same frozen encoders and crops as the training losses, ``load(field)`` gives
  ``encoder, params``) on images in ``value_range`` (mapped to [-1, 1] first).
  (B, S, S, 3) -> (B, D) float32."""
  lo, hi = value_range
  if (lo, hi) != (-1.0, 1.0):
    images = 2.0 * (jnp.asarray(images, jnp.float32) - lo) / (hi - lo) - 1.0
  return face_encoders.embed(encoder, params, images, crops)


def _norm(x: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.linalg.norm(x, axis=-1), _EPS)


def identity_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity of paired identity embeddings (TGDM Tab. 1 "ID-C" / "ID-A": the
  cosine between the source's and the generated face's embeddings; DiffSFSR Eq. 5 uses
  1 - this as L_id). (B, D) x2 -> (B,)."""
  if a.shape != b.shape:
    raise ValueError(f"identity_cosine needs paired embeddings, got {a.shape} and {b.shape}")
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return jnp.sum(a * b, axis=-1) / (_norm(a) * _norm(b))


def cosine_matrix(query: jax.Array, gallery: jax.Array) -> jax.Array:
  """(Q, D), (G, D) -> (Q, G) cosines, q.g / (|q| |g|): the dot product first, then one
  division, so two identical gallery rows score bit-identically for every query."""
  query = jnp.asarray(query, jnp.float32)
  gallery = jnp.asarray(gallery, jnp.float32)
  dots = jnp.einsum("qd,gd->qg", query, gallery, precision=_HIGHEST)
  return dots / (_norm(query)[:, None] * _norm(gallery)[None, :])


def retrieve(query: jax.Array, gallery: jax.Array) -> jax.Array:
  """Index of each query's nearest gallery embedding by cosine similarity, (Q,) int32.
  Ties go to the lowest gallery index (``jnp.argmax`` returns the first maximum)."""
  return jnp.argmax(cosine_matrix(query, gallery), axis=-1).astype(jnp.int32)


def retrieval_accuracy(
  query: jax.Array, gallery: jax.Array, gallery_labels: jax.Array, query_labels: jax.Array
) -> jax.Array:
  """Identity retrieval top-1 accuracy (DiffSFSR Tab. 1 "ID.", retrieval with a face
  recognition network): the fraction of queries (generated faces, (Q, D)) whose most
  cosine-similar gallery embedding ((G, D), e.g. one per source identity) carries the
  query's identity label. Labels are integers, (G,) and (Q,). Ties: see ``retrieve``.
  Returns a float32 scalar in [0, 1]."""
  query, gallery = jnp.asarray(query), jnp.asarray(gallery)
  gallery_labels, query_labels = jnp.asarray(gallery_labels), jnp.asarray(query_labels)
  if query.shape[-1] != gallery.shape[-1]:
    raise ValueError(f"query dim {query.shape[-1]} != gallery dim {gallery.shape[-1]}")
  if gallery_labels.shape != gallery.shape[:1] or query_labels.shape != query.shape[:1]:
    raise ValueError(
      f"labels {gallery_labels.shape} / {query_labels.shape} do not match gallery "
      f"{gallery.shape} / query {query.shape}"
    )
  hit = gallery_labels[retrieve(query, gallery)] == query_labels
  return jnp.mean(hit.astype(jnp.float32))


def expression_error(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distance of paired expression embeddings (DiffSFSR Tab. 1 "Exp.": between
  the output's and the expression source's embeddings; TGDM "Exp" between 3DMM expression
  coefficients). (B, D) x2 -> (B,)."""
  if a.shape != b.shape:
    raise ValueError(f"expression_error needs paired embeddings, got {a.shape} and {b.shape}")
  d = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.square(d), axis=-1))


def landmark_distance(
  pred: jax.Array,
  target: jax.Array,
  indices: tuple[int, ...] | None = None,
  normalize: str | None = None,
) -> jax.Array:
  """Landmark distance, LMD (Chen et al., CVPR 2019; TGDM Tab. 3, mouth landmarks): the
  mean over landmarks of the Euclidean distance between corresponding points,
  (B, 68, 2) x2 -> (B,).

  ``indices``: the landmarks to average over (``MOUTH`` for TGDM's LMD; None = all).
  ``normalize``: None keeps the unit of the inputs (pixels at the evaluation resolution,
  the usual LMD); "inter_ocular" divides each image's distance by the target's distance
  between the outer eye corners (36, 45), the 300-W convention, making it resolution-free.
  """
  if pred.shape != target.shape or pred.shape[-1] != 2:
    raise ValueError(f"landmark_distance needs (B, K, 2) pairs, got {pred.shape}, {target.shape}")
  pred = jnp.asarray(pred, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  scale = 1.0
  if normalize == "inter_ocular":
    i, j = OUTER_EYE_CORNERS
    scale = jnp.linalg.norm(target[:, i] - target[:, j], axis=-1)
  elif normalize is not None:
    raise ValueError(f"landmark_distance normalize={normalize!r}: None or 'inter_ocular'")
  if indices is not None:
    idx = jnp.asarray(indices, jnp.int32)
    pred, target = pred[:, idx], target[:, idx]
  dist = jnp.sqrt(jnp.sum(jnp.square(pred - target), axis=-1))
  return jnp.mean(dist, axis=-1) / scale


def expression_landmark_distance(
  model: MorphableModel,
  identity: jax.Array,
  expression_pred: jax.Array,
  expression_true: jax.Array,
  angle: jax.Array,
  translation: jax.Array,
  camera: mesh.Camera | None = None,
  indices: tuple[int, ...] | None = None,
) -> jax.Array:
  """LMD of expression coefficients (TGDM Tab. 3's LMD for an audio-to-expression model
  evaluated in 3DMM space, the landmarks of Eq. 13): the 68 landmarks of the morphable
  model with the same identity and pose and the predicted vs the true expression,
  projected by ``camera`` (default D3DFR's 224-px one), then :func:`landmark_distance`
  (pixels). Any leading axes: identity (..., 80) broadcasts against the expressions
  (..., 64), angle and translation (..., 3); returns the distance per leading index."""
  camera = camera or mesh.camera_for_size(mesh.D3DFR_IMAGE_SIZE)
  for x in (expression_pred, expression_true):
    if x.shape[-1] != model.exp_base.shape[-1]:
      raise ValueError(
        f"expression_landmark_distance: {x.shape[-1]}-D expressions for a model with "
        f"{model.exp_base.shape[-1]} expression bases"
      )
  lead = jnp.broadcast_shapes(
    expression_pred.shape[:-1], expression_true.shape[:-1], identity.shape[:-1]
  )
  identity = jnp.broadcast_to(identity, lead + identity.shape[-1:])
  angle = jnp.broadcast_to(angle, lead + (3,))
  translation = jnp.broadcast_to(translation, lead + (3,))

  def lms(expression):
    expression = jnp.broadcast_to(expression, lead + expression.shape[-1:])
    lm = emoa2e_loss.landmarks(model, identity, expression, angle, translation, camera)
    return lm.reshape((-1,) + lm.shape[-2:])

  d = landmark_distance(lms(expression_pred), lms(expression_true), indices)
  return d.reshape(lead)
