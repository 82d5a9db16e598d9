"""Evaluation metrics of DiffSFSR and TGDM, one function per metric.

Image (``image``; NHWC batches, ``value_range`` default [-1, 1], jit-able, (B,) results):
  ``mse``, ``psnr``, ``ssim``, ``lpips``; ``masked_mse``, ``masked_psnr`` (over a face
  mask); ``image_metrics`` (all of them, keyed by the papers' column names).
Identity / expression / landmarks (``identity``; embeddings from
``facediff.losses.face_encoders`` via ``face_embeddings``, jit-able): ``identity_cosine``,
``retrieval_accuracy``
(and ``retrieve``), ``expression_error``, ``landmark_distance``,
``expression_landmark_distance`` (LMD of 3DMM expression coefficients).
3DMM coefficients (``coeffs``; host numpy): ``coefficient_distances`` (TGDM's Exp, Angle,
Gaze).
Head pose (``pose``; host numpy + OpenCV): ``head_pose``, ``pose_error``,
``pose_distance``.
FID (``fid``): ``inception_features`` (the FID Inception port, jit-compiled and batched;
  weights from the user's pytorch-fid file), then host numpy:
  ``feature_statistics``, ``frechet_distance`` (with ``trace_sqrt_product``),
  ``fid_from_features``.
Reporting (``table``): ``format_table``, ``Metric``, ``METRICS``.
"""

from facediff.metrics.coeffs import coefficient_distances
from facediff.metrics.fid import (
  feature_statistics,
  fid_from_features,
  frechet_distance,
  inception_features,
  trace_sqrt_product,
)
from facediff.metrics.identity import (
  MOUTH,
  expression_error,
  expression_landmark_distance,
  face_embeddings,
  identity_cosine,
  landmark_distance,
  retrieval_accuracy,
  retrieve,
)
from facediff.metrics.image import (
  image_metrics,
  lpips,
  masked_mse,
  masked_psnr,
  mse,
  psnr,
  ssim,
)
from facediff.metrics.pose import head_pose, pose_distance, pose_error
from facediff.metrics.table import METRICS, Metric, format_table

__all__ = [
  "METRICS",
  "MOUTH",
  "Metric",
  "coefficient_distances",
  "expression_error",
  "expression_landmark_distance",
  "feature_statistics",
  "face_embeddings",
  "fid_from_features",
  "format_table",
  "frechet_distance",
  "head_pose",
  "identity_cosine",
  "image_metrics",
  "inception_features",
  "landmark_distance",
  "lpips",
  "masked_mse",
  "masked_psnr",
  "mse",
  "pose_distance",
  "pose_error",
  "psnr",
  "retrieval_accuracy",
  "retrieve",
  "ssim",
  "trace_sqrt_product",
]
