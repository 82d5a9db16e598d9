"""facediff.metrics.image: MSE / PSNR / SSIM against scikit-image (float64) on random and
real images, in both value ranges; the LPIPS wrapper against facediff's LPIPS loss."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import skimage.data
import skimage.metrics as skm

from facediff import metrics
from facediff.losses.lpips import lpips_loss
from facediff.models import lpips as lpips_model
from facediff.models import vgg16 as vgg16_model


def _skimage(x, y, data_range):
  """Per-image (MSE, PSNR, SSIM) from scikit-image, the Gaussian-window SSIM of Wang et al.;
  MSE in the units of [0, 1] images."""
  out = []
  for a, b in zip(np.asarray(x, np.float64), np.asarray(y, np.float64), strict=True):
    out.append(
      (
        skm.mean_squared_error(a, b) / data_range**2,
        skm.peak_signal_noise_ratio(a, b, data_range=data_range),
        skm.structural_similarity(
          a,
          b,
          gaussian_weights=True,
          sigma=1.5,
          use_sample_covariance=False,
          data_range=data_range,
          channel_axis=-1,
        ),
      )
    )
  return np.array(out).T


@jax.jit
def _ours_pm1(x, y):
  return metrics.mse(x, y), metrics.psnr(x, y), metrics.ssim(x, y)


def _ours(x, y, value_range):
  f = jax.jit(
    lambda a, b: [g(a, b, value_range) for g in (metrics.mse, metrics.psnr, metrics.ssim)]
  )
  return np.array([np.asarray(v) for v in f(x, y)])


def test_random_images_in_minus_one_one():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 40, 52, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
  y[1] = rng.uniform(-1, 1, x.shape[1:])  # unrelated: SSIM near 0
  ours = np.array([np.asarray(v) for v in _ours_pm1(x, y)])
  # SSIM is not shift-invariant (its luminance term): the reference runs on [0, 1] images.
  ref = _skimage((x + 1) / 2, (y + 1) / 2, data_range=1.0)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)  # MSE
  np.testing.assert_allclose(ours[1], ref[1], atol=1e-4)  # PSNR, dB
  np.testing.assert_allclose(ours[2], ref[2], atol=1e-5)  # SSIM


def _real_pair():
  """Three real 128 x 128 RGB crops (astronaut's face, chelsea, coffee), uint8, and the
  same degraded (blur from a 2x downsample, then noise and a brightness shift)."""
  crops = [
    skimage.data.astronaut()[30:158, 170:298],
    skimage.data.chelsea()[50:178, 150:278],
    skimage.data.coffee()[100:228, 200:328],
  ]
  x = np.stack(crops).astype(np.float64)
  small = x.reshape(3, 64, 2, 64, 2, 3).mean(axis=(2, 4))
  blurred = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
  rng = np.random.default_rng(1)
  y = np.clip(blurred + rng.normal(0, 6, x.shape) + 10, 0, 255).round()
  return x.astype(np.uint8), y.astype(np.uint8)


def test_real_images_in_0_255_and_0_1():
  x, y = _real_pair()
  ref = _skimage(x, y, data_range=255.0)
  ours_255 = _ours(x.astype(np.float32), y.astype(np.float32), (0.0, 255.0))
  ours_01 = _ours(x.astype(np.float32) / 255, y.astype(np.float32) / 255, (0.0, 1.0))
  for ours in (ours_255, ours_01):
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(ours[1], ref[1], atol=1e-4)
    np.testing.assert_allclose(ours[2], ref[2], atol=1e-5)
  assert 0.3 < ref[2].min() and ref[2].max() < 0.95  # a real, partial degradation


def test_grayscale_and_identical():
  cam = skimage.data.camera()[100:164, 200:264, None].astype(np.float32) / 127.5 - 1
  noisy = cam + np.random.default_rng(2).normal(0, 0.1, cam.shape).astype(np.float32)
  ref = _skimage((cam[None] + 1) / 2, (noisy[None] + 1) / 2, data_range=1.0)
  ours = np.array([np.asarray(v) for v in _ours_pm1(cam[None], noisy[None])])
  np.testing.assert_allclose(ours[1:], ref[1:], atol=1e-4)
  mse_, psnr_, ssim_ = _ours_pm1(cam[None], cam[None])
  assert float(mse_[0]) == 0.0 and np.isposinf(float(psnr_[0]))
  np.testing.assert_allclose(float(ssim_[0]), 1.0, atol=1e-6)


def test_gaussian_window_is_wang_et_al():
  w = metrics.image.gaussian_window()
  k = np.arange(-5, 6)
  ref = np.exp(-(k**2) / (2 * 1.5**2))
  np.testing.assert_allclose(w, ref / ref.sum(), rtol=1e-6)
  with pytest.raises(ValueError, match="window"):
    metrics.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def test_lpips_wrapper_equals_lpips_loss():
  cfg = lpips_model.LPIPSConfig(
    vgg=vgg16_model.VGG16Config(stage_channels=(4, 8, 8, 8, 8), stage_depths=(1, 1, 1, 1, 1))
  )
  rng = np.random.default_rng(3)
  # Random weights of the right shapes; non-negative heads, as the released ones are.
  params = jax.tree.map(
    lambda a: rng.uniform(0, 0.5, a.shape).astype(np.float32),
    nn.unbox(lpips_model.abstract_params(cfg)),
  )
  x = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)

  @jax.jit
  def run(x, y):
    return (
      metrics.lpips(params, x, y, cfg),
      metrics.lpips(params, (x + 1) / 2, (y + 1) / 2, cfg, value_range=(0.0, 1.0)),
      lpips_model.apply_lpips(cfg, params, x, y),
      lpips_loss(params, x, y, cfg),
      metrics.image_metrics(x, y, lpips_params=params, lpips_config=cfg),
      [f(x, y) for f in (metrics.mse, metrics.psnr, metrics.ssim)],
    )

  per_image, from_01, ref, loss, together, separate = run(x, y)
  np.testing.assert_array_equal(np.asarray(per_image), np.asarray(ref))
  np.testing.assert_allclose(float(np.mean(per_image)), float(loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(from_01), np.asarray(ref), rtol=1e-5)
  assert np.all(np.asarray(ref) > 0)
  # image_metrics: the same numbers under the papers' column names
  assert sorted(together) == ["LPIPS", "MSE", "PSNR", "SSIM"]
  for name, value in zip(["MSE", "PSNR", "SSIM"], separate, strict=True):
    np.testing.assert_allclose(np.asarray(together[name]), np.asarray(value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(together["LPIPS"]), np.asarray(ref), rtol=1e-6)
