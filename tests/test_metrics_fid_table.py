"""facediff.metrics FID (Fréchet distance against Gaussians with a closed form) and the
Markdown table of results."""

import math

import numpy as np
import pytest
import scipy.linalg

from facediff import metrics


def test_feature_statistics_is_mean_and_sample_covariance():
  x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(x)  # accumulated in float64
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=(2, 8))
  v1, v2 = rng.uniform(0.1, 3.0, (2, 8))
  # diagonal covariances: sum (mu1 - mu2)^2 + sum (sqrt(v1) - sqrt(v2))^2
  ref = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(ref, rel=1e-10)
  # one dimension: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
  assert metrics.frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_frechet_distance_shared_eigenvectors_closed_form():
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  d1, d2 = rng.uniform(0.05, 2.0, (2, 16))
  s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T  # commuting covariances
  mu1, mu2 = rng.normal(size=(2, 16))
  ref = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_fid_of_samples_approaches_the_closed_form():
  rng = np.random.default_rng(3)
  n, d = 20000, 4
  a = rng.normal(size=(n, d)) * np.sqrt([1.0, 2.0, 0.5, 1.5])
  b = rng.normal(size=(n, d)) * np.sqrt([2.0, 1.0, 0.5, 1.0]) + [0.5, 0, 0, -0.5]
  ref = 0.5 + sum(
    (np.sqrt(p) - np.sqrt(r)) ** 2 for p, r in zip([1, 2, 0.5, 1.5], [2, 1, 0.5, 1], strict=True)
  )
  got = metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
  assert got == pytest.approx(ref, abs=0.05)


def test_frechet_distance_singular_covariances():
  rng = np.random.default_rng(4)
  # fewer samples than dimensions: rank-deficient covariances still give a finite value
  a, b = rng.normal(size=(2, 5, 12))
  got = metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
  assert math.isfinite(got) and got > 0
  with pytest.raises(ValueError, match="do not agree"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_trace_sqrt_product_matches_sqrtm_and_rank_one_closed_form():
  """Full rank: the trace of scipy's sqrtm(s1 s2) (pytorch-fid's computation). Rank one
  (two samples each): s1 = u u^T, s2 = v v^T give Tr((s1 s2)^(1/2)) = |u . v|; for these
  integer features sqrtm(s1 s2) has imaginary parts of 1.6 on its diagonal (pytorch-fid
  raises "Imaginary component"), the eigenvalue form is exact."""
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(2, 40, 6)) * [1, 2, 3, 1, 0.5, 1]
  s1, s2 = np.cov(a.T), np.cov(b.T)
  want = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
  assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(want, rel=1e-10)

  a = np.array([[-2.0, 2.0, 2.0, -2.0], [2.0, -2.0, 0.0, 2.0]])
  b = np.array([[0.0, 1.0, 2.0, 1.0], [-2.0, 0.0, -2.0, -2.0]])
  (mu1, s1), (mu2, s2) = metrics.feature_statistics(a), metrics.feature_statistics(b)
  u, v = (a[0] - a[1]) / np.sqrt(2), (b[0] - b[1]) / np.sqrt(2)
  np.testing.assert_allclose(s1, np.outer(u, u))
  assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(abs(u @ v), rel=1e-7)
  want = np.sum((mu1 - mu2) ** 2) + u @ u + v @ v - 2 * abs(u @ v)
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-7)


def test_format_table():
  rows = {
    "TPSM": {"PSNR": 22.123, "LPIPS": 0.2, "ID-C": 0.71, "FID": 40.0},
    "Ours": {"PSNR": 24.5, "LPIPS": 0.1504, "ID-C": float("nan"), "FID": 38.004},
    "HifiHead": {"PSNR": 24.5, "LPIPS": 0.15, "FID": 30.1},
  }
  got = metrics.format_table(rows, ["PSNR", "LPIPS", "ID-C", "FID"])
  want = "\n".join(
    [
      "| Method | PSNR ↑ | LPIPS ↓ | ID-C ↑ | FID ↓ |",
      "|:--|--:|--:|--:|--:|",
      "| TPSM | 22.12 | 0.200 | **0.710** | 40.00 |",
      "| Ours | **24.50** | **0.150** | - | 38.00 |",
      "| HifiHead | **24.50** | **0.150** | - | **30.10** |",
    ]
  )
  assert got == want
  custom = metrics.Metric("Acc", higher_is_better=True, digits=1)
  got = metrics.format_table([("a", {"Acc": 0.5}), ("b", {"Acc": 0.7})], [custom], bold_best=False)
  assert got == "| Method | Acc ↑ |\n|:--|--:|\n| a | 0.5 |\n| b | 0.7 |"
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.format_table(rows, ["Nope"])
