"""Fréchet Inception Distance (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule
Converge to a Local Nash Equilibrium", NeurIPS 2017; TGDM Tab. 1-4 "FID"): the Fréchet
distance between Gaussians fitted to two sets of image features. The statistics and the
distance are host numpy in float64 (float32 loses the digits).

Features: ``inception_features`` runs the FID Inception (``facediff.models.inception``,
pytorch-fid's network; weights from ``pt_inception-2015-12-05-6726825d.pth`` through
``facediff.convert.inception.load``), jit-compiled and batched, and returns the 2048-D
``pool_3`` features, one row per image. No Inception weights ship offline: the user
supplies that file. Another feature extractor gives a Fréchet distance that is not
comparable with the papers' FID.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from facediff.models import inception as inception_model


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> (mean (D,), covariance (D, D)), float64; the covariance is the
  unbiased sample covariance (divides by N - 1, ``np.cov``'s default)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"feature_statistics needs (N >= 2, D) features, got {x.shape}")
  mu = x.mean(axis=0)
  centred = x - mu
  return mu, centred.T @ centred / (x.shape[0] - 1)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr((sigma1 sigma2)^(1/2)) of two symmetric positive semi-definite matrices, float64.

  sigma1 sigma2 = A (A sigma2) with A = sigma1^(1/2), and (A sigma2) A = A sigma2 A share
  its eigenvalues; A sigma2 A is symmetric PSD, so the trace is the sum of the square roots
  of its eigenvalues (``eigh``; rounding's tiny negatives count as 0). This is the number
  pytorch-fid takes from ``scipy.linalg.sqrtm(sigma1 @ sigma2)`` (agreeing to ~1e-7
  relative where that works), but stays real and exact for rank-deficient covariances
  (fewer images than feature dimensions), where the non-symmetric product can be
  defective and sqrtm returns large imaginary parts (pytorch-fid then raises
  "Imaginary component").
  """
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  m = root1 @ sigma2 @ root1
  lam = np.linalg.eigvalsh(0.5 * (m + m.T))
  return float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)
  (Dowson & Landau 1982; Heusel et al. 2017 Eq. 6):

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)),

  the trace of the root by ``trace_sqrt_product`` (defined and real also for singular
  covariances, e.g. fewer samples than dimensions). Returns d^2 (the number FID
  reports), a Python float.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = (
    np.atleast_2d(np.asarray(sigma1, np.float64)),
    np.atleast_2d(np.asarray(sigma2, np.float64)),
  )
  d = mu1.shape[0]
  if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(
      f"frechet_distance: shapes mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
      f"sigma2 {s2.shape} do not agree"
    )
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))


@functools.lru_cache(maxsize=8)
def _inception_fn(config: inception_model.InceptionConfig):
  """jit(params, images -> (pool_3, logits)), one compiled program per config (and shape)."""
  return jax.jit(lambda params, x: inception_model.apply_inception(config, params, x))


def inception_features(
  params,
  images,
  config: inception_model.InceptionConfig | None = None,
  batch_size: int = 50,
  *,
  with_logits: bool = False,
):
  """FID features of ``images`` (N, H, W, 3) in [-1, 1] (numpy or jax): the FID
  Inception's pool_3 (``facediff.models.inception``; resized to 299 inside), computed in
  batches of ``batch_size`` with one jit-compiled program (the last batch is padded by
  repeating its final image, and the padding dropped). ``params``: from
  ``facediff.convert.inception.load``; ``config`` defaults to the FID network.
  Returns (N, 2048) float32 numpy; with ``with_logits`` also the (N, 1008) fc logits.
  """
  config = config or inception_model.InceptionConfig()
  if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
    raise ValueError(f"inception_features needs (N, H, W, 3) images, got {np.shape(images)}")
  n = len(images)
  fn = _inception_fn(config)
  feats = [np.zeros((0, config.feature_dim), np.float32)]
  logits = [np.zeros((0, config.num_classes), np.float32)]
  for start in range(0, n, batch_size):
    chunk = jnp.asarray(images[start : start + batch_size], jnp.float32)
    keep = chunk.shape[0]
    if keep < batch_size:
      chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], batch_size - keep, axis=0)], axis=0)
    f, lg = jax.device_get(fn(params, chunk))
    feats.append(np.asarray(f)[:keep])
    logits.append(np.asarray(lg)[:keep])
  feats, logits = np.concatenate(feats), np.concatenate(logits)
  return (feats, logits) if with_logits else feats


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two feature sets (N1, D) and (N2, D): ``frechet_distance`` of their
  ``feature_statistics`` (pytorch-fid's ``calculate_frechet_distance`` of
  ``calculate_activation_statistics``)."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
