"""The metrics TGDM's evaluation adds: masked_mse / masked_psnr against scikit-image's MSE /
PSNR of the masked pixel values (gathered with numpy boolean indexing), and
coefficient_distances against the layouts' slices written out."""

import jax
import numpy as np
import pytest
import skimage.metrics as skm

from facediff import metrics


def test_masked_psnr_matches_scikit_image_on_the_masked_pixels():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 20, 24, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.1, x.shape), -1, 1).astype(np.float32)
  y[..., 1] += 0.3  # errors differ between channels: every channel must count
  mask = rng.uniform(size=(3, 20, 24, 1)).astype(np.float32)  # soft: > 0.5 counts
  f = jax.jit(lambda a, b, m: (metrics.masked_mse(a, b, m), metrics.masked_psnr(a, b, m)))
  mse, psnr = (np.asarray(v) for v in f(x, y, mask))
  for i in range(3):
    sel = mask[i, ..., 0] > 0.5
    a = (x[i][sel].astype(np.float64) + 1) / 2  # (n, 3): every channel of each pixel
    b = (y[i][sel].astype(np.float64) + 1) / 2
    np.testing.assert_allclose(mse[i], skm.mean_squared_error(a, b), rtol=1e-5)
    np.testing.assert_allclose(psnr[i], skm.peak_signal_noise_ratio(a, b, data_range=1), rtol=1e-5)
  # A (B, H, W) mask and a [0, 255] value range give the same numbers.
  psnr255 = metrics.masked_psnr((x + 1) * 127.5, (y + 1) * 127.5, mask[..., 0], (0.0, 255.0))
  np.testing.assert_allclose(psnr255, psnr, rtol=1e-5)
  # Outside the mask nothing counts; the full mask is the plain PSNR.
  y2 = np.where(mask > 0.5, y, -x)
  np.testing.assert_allclose(metrics.masked_psnr(x, y2, mask), psnr, rtol=1e-5)
  ones = np.ones(mask.shape, np.float32)
  np.testing.assert_allclose(metrics.masked_psnr(x, y, ones), metrics.psnr(x, y), rtol=1e-5)
  assert np.isnan(np.asarray(metrics.masked_mse(x, y, np.zeros_like(mask)))).all()
  with pytest.raises(ValueError, match="does not fit"):
    metrics.masked_mse(x, y, mask[:, :10])


def test_coefficient_distances_match_the_slices_written_out():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 5, 257))
  d = metrics.coefficient_distances(a, b)  # D3DFR: id 0:80 exp 80:144 ... angle 224:227
  assert sorted(d) == ["Angle", "Exp"]  # no gaze in D3DFR's layout
  np.testing.assert_allclose(d["Exp"], np.sqrt(((a[:, 80:144] - b[:, 80:144]) ** 2).sum(1)))
  np.testing.assert_allclose(d["Angle"], np.sqrt(((a[:, 224:227] - b[:, 224:227]) ** 2).sum(1)))
  a, b = rng.normal(size=(2, 3, 261))  # TGDM: ... gamma 224:251, angle 251:254, gaze 257:261
  d = metrics.coefficient_distances(a, b, "tgdm")
  np.testing.assert_allclose(d["Angle"], np.sqrt(((a[:, 251:254] - b[:, 251:254]) ** 2).sum(1)))
  np.testing.assert_allclose(d["Gaze"], np.sqrt(((a[:, 257:] - b[:, 257:]) ** 2).sum(1)))
  np.testing.assert_allclose(d["Exp"], np.sqrt(((a[:, 80:144] - b[:, 80:144]) ** 2).sum(1)))
  with pytest.raises(ValueError, match="257"):
    metrics.coefficient_distances(a, b, "d3dfr")
