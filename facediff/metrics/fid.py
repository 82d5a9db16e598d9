"""Fréchet Inception Distance (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule
Converge to a Local Nash Equilibrium", NeurIPS 2017; TGDM Tab. 1-4 "FID"): the Fréchet
distance between Gaussians fitted to two sets of image features. Host numpy / scipy in
float64 (the matrix square root is not a jit-able op and float32 loses the digits).

The features are NOT computed here: no Inception-v3 weights ship offline. Pass the
2048-D pool features of the standard FID Inception (pytorch-fid's / TF's
``pool_3``) from a user-supplied network, one row per image, to ``feature_statistics``;
any other feature extractor gives a Fréchet distance that is not comparable with the
papers' FID.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> (mean (D,), covariance (D, D)), float64; the covariance is the
  unbiased sample covariance (divides by N - 1, ``np.cov``'s default)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"feature_statistics needs (N >= 2, D) features, got {x.shape}")
  mu = x.mean(axis=0)
  centred = x - mu
  return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
  """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)
  (Dowson & Landau 1982; Heusel et al. 2017 Eq. 6):

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  (sigma1 sigma2)^(1/2) by ``scipy.linalg.sqrtm``. If it is not finite (singular
  covariances, e.g. fewer samples than dimensions), both covariances get ``eps`` added
  on the diagonal and it is taken again. A tiny imaginary part from rounding is dropped;
  a large one (|imag| > 1e-3 on the diagonal) raises. Returns d^2 (the number FID
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
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.all(np.isfinite(covmean)):
    offset = eps * np.eye(d)
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if imag > 1e-3:
      raise ValueError(f"frechet_distance: sqrtm has an imaginary part {imag:.3g}")
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
