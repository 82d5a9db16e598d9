"""TGDM's perceptual loss: LPIPS-VGG between the predicted clean image and the target."""

from __future__ import annotations

import jax

from facediff.models import lpips as lpips_model


def lpips_loss(
  params,
  x: jax.Array,
  y: jax.Array,
  config: lpips_model.LPIPSConfig | None = None,
) -> jax.Array:
  """TGDM Eq. 20, L_p = || phi_vgg(Z0_hat) - phi_vgg(I_d) ||, taken as the LPIPS
  distance (Zhang et al. 2018, the paper's ref. [95]) and averaged over the batch;
  Eq. 21 weights it with lambda_p = 1 in L = 10 L_simple + L_rec + L_p.

  ``params``: LPIPS params (``facediff.convert.lpips.load_params``), frozen: no gradient
  reaches them. ``x``, ``y``: (B, H, W, 3) images in [-1, 1] (x = the predicted clean
  image Z0_hat, y = the target I_d; the distance is symmetric). Returns a float32 scalar,
  differentiable with respect to ``x`` and ``y``. ``config`` defaults to LPIPS-VGG v0.1.
  """
  config = config or lpips_model.LPIPSConfig()
  return lpips_model.apply_lpips(config, params, x, y).mean()
