"""Aligned face crops of a batch of images, differentiable, for the identity and
expression losses.

The exporter (``data_pipelines/export.py``) stores per record the 2x3 transform
``crop_<kind>`` from the stored face image to each encoder's input crop. Inside a
jitted training step the same crops are cut from the generated image with
``warp_affine`` (bilinear, as ``cv2.warpAffine(..., flags=INTER_LINEAR)``), so the
frozen encoders see the geometry they saw when the stored embeddings were computed.
The loader rescales the transforms to the training image size
(``config.data.crop_fields``).

Conventions (cv2.warpAffine's): a matrix ``M`` maps source pixel coordinates to
destination ones, ``dst = M @ [x, y, 1]``; pixel centres sit at integer
coordinates; each output pixel ``p`` samples the source at ``M^-1 p``. Images are
NHWC. The sampling is exact bilinear; cv2 itself rounds sample positions to 1/32
pixel (``INTER_TAB_SIZE``), which is where the two differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

BORDERS = ("constant", "replicate", "reflect")

# cv2.cvtColor(COLOR_RGB2GRAY): Y = 0.299 R + 0.587 G + 0.114 B (OpenCV's colour
# conversion documentation, the ITU-R BT.601 luma weights).
GREY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class CropGeometry:
  """Output side, border rule and colour of one encoder crop kind."""

  size: int
  border: str
  grey: bool = False


# How data_pipelines/faces.py (FaceAligner.crop) and encoders/d3dfr.py cut each kind:
# dlib150: dlib's chip (black outside the photo); arcface112: cv2 constant border;
# facenet160, fer64: cv2 replicate border, fer64 grey; d3dfr224: PIL crop (zeros).
CROP_GEOMETRY = {
  "arcface112": CropGeometry(112, "constant"),
  "dlib150": CropGeometry(150, "constant"),
  "facenet160": CropGeometry(160, "replicate"),
  "fer64": CropGeometry(64, "replicate", grey=True),
  "d3dfr224": CropGeometry(224, "constant"),
}


def invert_affine(matrices: jax.Array) -> jax.Array:
  """Inverses of 2x3 affine matrices (..., 2, 3), in closed form."""
  a, b, c = matrices[..., 0, 0], matrices[..., 0, 1], matrices[..., 0, 2]
  d, e, f = matrices[..., 1, 0], matrices[..., 1, 1], matrices[..., 1, 2]
  det = a * e - b * d
  ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
  row0 = jnp.stack([ia, ib, -(ia * c + ib * f)], -1)
  row1 = jnp.stack([id_, ie, -(id_ * c + ie * f)], -1)
  return jnp.stack([row0, row1], -2)


def _border_index(i: jax.Array, n: int, border: str) -> tuple[jax.Array, jax.Array | None]:
  """Source index of tap ``i`` in an axis of length ``n`` and, for the constant
  border, whether the tap lies inside (cv2 BORDER_CONSTANT / REPLICATE / REFLECT_101)."""
  if border == "constant":
    return jnp.clip(i, 0, n - 1), (i >= 0) & (i < n)
  if border == "replicate":
    return jnp.clip(i, 0, n - 1), None
  if n == 1:
    return jnp.zeros_like(i), None
  period = 2 * (n - 1)  # reflect-101: ... 2 1 | 0 1 2 ... n-1 | n-2 ...
  i = jnp.abs(i) % period
  return jnp.where(i >= n, period - i, i), None


def warp_affine(
  images: jax.Array,
  matrices: jax.Array,
  out_size: int | Sequence[int],
  border: str = "constant",
  fill_value: float = 0.0,
) -> jax.Array:
  """Bilinear affine warp of a batch, as ``cv2.warpAffine(img, M, (w, h), INTER_LINEAR)``.

  Args:
    images: (B, H, W, C) float (uint8 is cast to float32).
    matrices: (B, 2, 3), source -> destination pixel coordinates (cv2's convention).
    out_size: n for n x n, or (h, w).
    border: "constant" (taps outside the image read ``fill_value``; cv2
      BORDER_CONSTANT), "replicate" (BORDER_REPLICATE) or "reflect" (BORDER_REFLECT_101).
    fill_value: the constant border's value, in the images' units (0 is black for
      [0, 255] images; pass -1 for black in [-1, 1] images).

  Returns:
    (B, h, w, C) in the images' float dtype. Linear in ``images``, so its gradient
    with respect to them is the transposed warp.
  """
  if border not in BORDERS:
    raise ValueError(f"border {border!r}: expected one of {BORDERS}")
  if images.ndim != 4:
    raise ValueError(f"images: expected (B, H, W, C), got shape {images.shape}")
  if matrices.shape != (images.shape[0], 2, 3):
    raise ValueError(
      f"matrices: expected ({images.shape[0]}, 2, 3) for images {images.shape}, "
      f"got {matrices.shape}"
    )
  out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    images = images.astype(jnp.float32)
  b, h, w, c = images.shape
  inv = invert_affine(matrices.astype(jnp.float32))[:, :, :, None, None]  # (B, 2, 3, 1, 1)
  ys = jnp.arange(out_h, dtype=jnp.float32)[:, None]
  xs = jnp.arange(out_w, dtype=jnp.float32)[None, :]
  sx = inv[:, 0, 0] * xs + inv[:, 0, 1] * ys + inv[:, 0, 2]  # (B, out_h, out_w)
  sy = inv[:, 1, 0] * xs + inv[:, 1, 1] * ys + inv[:, 1, 2]
  x0, y0 = jnp.floor(sx), jnp.floor(sy)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  flat = images.reshape(b, h * w, c)

  def tap(yi, xi):
    yi, y_in = _border_index(yi, h, border)
    xi, x_in = _border_index(xi, w, border)
    idx = (yi * w + xi).reshape(b, out_h * out_w, 1)
    v = jnp.take_along_axis(flat, idx, axis=1, mode="clip").reshape(b, out_h, out_w, c)
    if border == "constant":
      v = jnp.where((y_in & x_in)[..., None], v, jnp.asarray(fill_value, v.dtype))
    return v

  top = (1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1)
  bottom = (1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)
  return ((1 - fy) * top + fy * bottom).astype(images.dtype)


def to_grey(images: jax.Array) -> jax.Array:
  """(..., 3) RGB -> (..., 1) grey with cv2's RGB2GRAY weights (0.299, 0.587, 0.114)."""
  if images.shape[-1] != 3:
    raise ValueError(f"to_grey: expected RGB (..., 3), got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    images = images.astype(jnp.float32)
  return jnp.sum(images * jnp.asarray(GREY_WEIGHTS, images.dtype), axis=-1, keepdims=True)


def encoder_crop(
  images: jax.Array, matrices: jax.Array, kind: str, fill_value: float = 0.0
) -> jax.Array:
  """The ``kind`` crop (``CROP_GEOMETRY``) of a batch: (B, n, n, 3), or (B, n, n, 1)
  grey for fer64. ``matrices`` map the images' pixels to the crop's (the loader's
  ``batch["crops"][kind]``); ``fill_value`` as in ``warp_affine``."""
  if kind not in CROP_GEOMETRY:
    raise ValueError(f"unknown crop kind {kind!r}; known: {sorted(CROP_GEOMETRY)}")
  geo = CROP_GEOMETRY[kind]
  if geo.grey:  # grey then warp, as the exporter did (both are linear, so they commute)
    images = to_grey(images)
  return warp_affine(images, matrices, geo.size, geo.border, fill_value)
