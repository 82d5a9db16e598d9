"""Image metrics of the papers' tables: MSE, PSNR, SSIM (DiffSFSR Tab. 1-3, TGDM Tab. 1-2)
and LPIPS (TGDM Tab. 1), pure jnp and jit-able, on NHWC batches.

Value range: every function takes ``value_range=(lo, hi)``, the range the images live in,
by default (-1, 1), the models' output range; (0, 1) and (0, 255) work the same way.
MSE, PSNR and SSIM are computed after mapping the images to [0, 1], so their numbers do
not depend on the input convention: MSE is in [0, 1]^2 units and PSNR/SSIM use a data
range of 1 (PSNR on [-1, 1] images equals ``skimage.metrics.peak_signal_noise_ratio(...,
data_range=2)``). LPIPS maps to [-1, 1], its own input range.

All return one value per image, shape (B,), float32; average over the batch (or the
evaluation set) outside. Images are never clipped: a generated image outside its range
counts as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from facediff.models import lpips as lpips_model

ValueRange = tuple[float, float]
DEFAULT_RANGE: ValueRange = (-1.0, 1.0)

# Wang et al. 2004 (SSIM), Sec. III-C: 11 x 11 Gaussian window, sigma 1.5, K1, K2.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

_HIGHEST = jax.lax.Precision.HIGHEST


def to_unit_range(x: jax.Array, value_range: ValueRange = DEFAULT_RANGE) -> jax.Array:
  """(x - lo) / (hi - lo) in float32: images in ``value_range`` to [0, 1]."""
  lo, hi = value_range
  if not hi > lo:
    raise ValueError(f"value_range {value_range}: need lo < hi")
  return (jnp.asarray(x, jnp.float32) - lo) / (hi - lo)


def _check_pair(name: str, x: jax.Array, y: jax.Array) -> None:
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"{name} needs two NHWC batches of one shape, got {x.shape} and {y.shape}")


def mse(x: jax.Array, y: jax.Array, value_range: ValueRange = DEFAULT_RANGE) -> jax.Array:
  """Mean squared error per image, mean over H, W, C, in [0, 1] units (DiffSFSR's "MSE.",
  Sec. 4.1 "Metrics"). (B, H, W, C) x2 -> (B,)."""
  _check_pair("mse", x, y)
  d = to_unit_range(x, value_range) - to_unit_range(y, value_range)
  return jnp.mean(jnp.square(d), axis=(1, 2, 3))


def psnr(x: jax.Array, y: jax.Array, value_range: ValueRange = DEFAULT_RANGE) -> jax.Array:
  """Peak signal-to-noise ratio in dB per image (TGDM Tab. 1 "PSNR"):
  10 log10(1 / MSE) with the images in [0, 1] (data range 1). Identical images give +inf,
  as scikit-image does. (B, H, W, C) x2 -> (B,)."""
  return 10.0 * jnp.log10(1.0 / mse(x, y, value_range))


def _face_mask(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """(B, H, W) or (B, H, W, 1) mask -> float32 {0, 1} (> 0.5 counts), broadcast to
  ``shape`` (B, H, W, C)."""
  m = jnp.asarray(mask, jnp.float32)
  if m.ndim == 3:
    m = m[..., None]
  if m.ndim != 4 or m.shape[:3] != tuple(shape[:3]) or m.shape[3] not in (1, shape[3]):
    raise ValueError(f"mask of shape {m.shape} does not fit images of shape {tuple(shape)}")
  return jnp.broadcast_to((m > 0.5).astype(jnp.float32), shape)


def masked_mse(
  x: jax.Array, y: jax.Array, mask: jax.Array, value_range: ValueRange = DEFAULT_RANGE
) -> jax.Array:
  """Mean squared error over the masked pixels only (every channel of each pixel whose
  mask is > 0.5), in [0, 1] units: sum(m (x - y)^2) / sum(m) per image. An empty mask
  gives NaN (0 / 0). ``mask``: (B, H, W) or (B, H, W, 1). (B, H, W, C) x2 -> (B,)."""
  _check_pair("masked_mse", x, y)
  m = _face_mask(mask, x.shape)
  d = to_unit_range(x, value_range) - to_unit_range(y, value_range)
  return jnp.sum(m * jnp.square(d), axis=(1, 2, 3)) / jnp.sum(m, axis=(1, 2, 3))


def masked_psnr(
  x: jax.Array, y: jax.Array, mask: jax.Array, value_range: ValueRange = DEFAULT_RANGE
) -> jax.Array:
  """PSNR in dB over the masked pixels (``masked_mse``), data range 1: 10 log10(1 / MSE)
  (scikit-image's ``peak_signal_noise_ratio`` of the masked pixel values). facediff's
  score of a result against an exact answer known only on the face (the synthetic 3DMM
  set: the render of the recombined coefficients). (B, H, W, C) x2 -> (B,)."""
  return 10.0 * jnp.log10(1.0 / masked_mse(x, y, mask, value_range))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """1-D Gaussian weights exp(-k^2 / (2 sigma^2)), k = -(size-1)/2 ... (size-1)/2, summing
  to 1 (Wang et al. 2004's window is their outer product)."""
  if size < 1 or size % 2 == 0:
    raise ValueError(f"SSIM window size {size}: need an odd positive size")
  k = np.arange(size, dtype=np.float64) - (size - 1) / 2
  w = np.exp(-0.5 * (k / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _blur_valid(x: jax.Array, window: np.ndarray) -> jax.Array:
  """Separable Gaussian filter of each channel, VALID (no padding): (B, H, W, C) ->
  (B, H - s + 1, W - s + 1, C)."""
  b, h, w, c = x.shape
  s = window.shape[0]
  z = jnp.transpose(x, (0, 3, 1, 2)).reshape(b * c, h, w, 1)  # channels into the batch
  dn = ("NHWC", "HWIO", "NHWC")
  kh = jnp.asarray(window).reshape(s, 1, 1, 1)
  kw = jnp.asarray(window).reshape(1, s, 1, 1)
  z = jax.lax.conv_general_dilated(z, kh, (1, 1), "VALID", dimension_numbers=dn, precision=_HIGHEST)
  z = jax.lax.conv_general_dilated(z, kw, (1, 1), "VALID", dimension_numbers=dn, precision=_HIGHEST)
  z = z.reshape(b, c, h - s + 1, w - s + 1)
  return jnp.transpose(z, (0, 2, 3, 1))


def ssim(
  x: jax.Array,
  y: jax.Array,
  value_range: ValueRange = DEFAULT_RANGE,
  window_size: int = SSIM_WINDOW,
  sigma: float = SSIM_SIGMA,
  k1: float = SSIM_K1,
  k2: float = SSIM_K2,
) -> jax.Array:
  """Structural similarity per image (Wang, Bovik, Sheikh, Simoncelli, "Image Quality
  Assessment: From Error Visibility to Structural Similarity", TIP 2004, Eq. 13 with the
  Gaussian window of Sec. III-C), data range 1 after mapping to [0, 1]:

    SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

  C1 = (K1)^2, C2 = (K2)^2; mu, s^2, s_xy are Gaussian-weighted local means, variances
  (population form, E[x^2] - mu^2) and covariance. The SSIM map is averaged over the
  positions where the whole window fits inside the image, then over channels. This is
  ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)`` on [0, 1] images. SSIM is
  not invariant to shifting the intensities (the luminance term), so the mapping to [0, 1]
  matters: scikit-image on [-1, 1] images with data_range=2 gives a different number.
  (B, H, W, C) x2 with H, W >= ``window_size`` -> (B,).
  """
  _check_pair("ssim", x, y)
  if min(x.shape[1:3]) < window_size:
    raise ValueError(f"ssim needs H, W >= {window_size} (the window), got {x.shape[1:3]}")
  x = to_unit_range(x, value_range)
  y = to_unit_range(y, value_range)
  win = gaussian_window(window_size, sigma)
  # One filter pass over the five moment images.
  moments = _blur_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), win)
  mu_x, mu_y, xx, yy, xy = jnp.split(moments, 5, axis=-1)
  var_x = xx - mu_x * mu_x
  var_y = yy - mu_y * mu_y
  cov = xy - mu_x * mu_y
  c1, c2 = k1**2, k2**2
  num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
  den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


def lpips(
  params,
  x: jax.Array,
  y: jax.Array,
  config: lpips_model.LPIPSConfig | None = None,
  value_range: ValueRange = DEFAULT_RANGE,
) -> jax.Array:
  """LPIPS distance per image (Zhang et al. 2018; TGDM Tab. 1 "LPIPS", VGG v0.1): the
  model of ``facediff.models.lpips`` (the same one TGDM's perceptual loss uses,
  ``facediff.losses.lpips``) on the images mapped to [-1, 1]. ``params`` from
  ``facediff.convert.lpips.load_params``. (B, H, W, 3) x2 -> (B,)."""
  _check_pair("lpips", x, y)
  config = config or lpips_model.LPIPSConfig()
  if tuple(value_range) != (-1.0, 1.0):
    x = 2.0 * to_unit_range(x, value_range) - 1.0
    y = 2.0 * to_unit_range(y, value_range) - 1.0
  return lpips_model.apply_lpips(config, params, x, y)


def image_metrics(
  x: jax.Array,
  y: jax.Array,
  value_range: ValueRange = DEFAULT_RANGE,
  lpips_params=None,
  lpips_config: lpips_model.LPIPSConfig | None = None,
) -> dict[str, jax.Array]:
  """All image metrics of one batch pair, keyed by the papers' column names (those of
  ``facediff.metrics.table.METRICS``): {"MSE", "PSNR", "SSIM"} and "LPIPS" when
  ``lpips_params`` is given, each (B,). ``x``: generated, ``y``: reference."""
  out = {
    "MSE": mse(x, y, value_range),
    "PSNR": psnr(x, y, value_range),
    "SSIM": ssim(x, y, value_range),
  }
  if lpips_params is not None:
    out["LPIPS"] = lpips(lpips_params, x, y, lpips_config, value_range)
  return out
