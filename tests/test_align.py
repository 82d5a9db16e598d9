"""facediff.losses.align against cv2.warpAffine / cv2.cvtColor on a real photo, with
the crop geometries the exporter uses (FaceAligner on the astronaut's face)."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data

from facediff.losses import align

dlib = pytest.importorskip("dlib")
from data_pipelines import faces  # noqa: E402

CV2_BORDERS = {
  "constant": cv2.BORDER_CONSTANT,
  "replicate": cv2.BORDER_REPLICATE,
  "reflect": cv2.BORDER_REFLECT_101,
}
SIZE = 256  # the stored face image


@pytest.fixture(scope="module")
def photo_and_crops():
  """The astronaut's 256x256 face image and, per crop kind, its image -> crop matrix."""
  kinds = ("image", "arcface112", "dlib150", "facenet160", "fer64")
  astro = data.astronaut()
  left, top, right, bottom = faces.FaceDetector()(astro)[0].rect  # the face (a weak hit
  m = right - left  # on the suit scores lower): cut it out with a box width around
  photo = astro[max(0, top - m) : bottom + m, max(0, left - m) : right + m]
  res = faces.FaceAligner(crops=kinds, image_size=SIZE)(photo)
  assert res.num_faces == 1
  image_matrix = res.crops["image"].matrix
  mats = {
    k: faces.relative_transform(res.crops[k].matrix, image_matrix) for k in kinds if k != "image"
  }
  return res.crops["image"].image, mats


def on_cv2_grid(m):
  """The matrix whose inverse is ``m``'s rounded to multiples of 1/32 (cv2's
  INTER_TAB_SIZE), so cv2's fixed-point sample positions are exact."""
  inv = np.round(cv2.invertAffineTransform(m) * 32) / 32
  return cv2.invertAffineTransform(inv)


def zoom_out(m, factor, size):
  """``m`` followed by a shrink by ``factor`` about the crop's centre: the crop then
  covers ``factor`` times more of the source, reaching past the image's edges."""
  c = (size - 1) / 2
  s = np.array([[1 / factor, 0, c - c / factor], [0, 1 / factor, c - c / factor], [0, 0, 1]])
  return (s @ np.vstack([m, [0, 0, 1]]))[:2]


def ours(img, m, size, border, fill=0.0):
  x = jnp.asarray(img, jnp.float32)[None]
  if x.ndim == 3:
    x = x[..., None]
  out = _warp(x, jnp.asarray(m, jnp.float32)[None], size, border, fill)
  return np.asarray(out)[0]


# one compiled program per (shape, size, border), not one per operation
_warp = jax.jit(align.warp_affine, static_argnums=(2, 3))


def theirs(img, m, size, border):
  # cv2 gets the same float32-rounded matrix as ours
  m = np.asarray(m, np.float32).astype(np.float64)
  return cv2.warpAffine(
    img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=CV2_BORDERS[border], borderValue=0
  )


@pytest.mark.parametrize("border", ["constant", "replicate", "reflect"])
def test_warp_equals_cv2_for_each_crop_geometry(photo_and_crops, border):
  img, mats = photo_and_crops
  x = img.astype(np.float32)
  for kind, m in mats.items():
    size = align.CROP_GEOMETRY[kind].size
    # sample positions on cv2's 1/32-pixel grid: the two agree to float32 rounding
    # (translations of ~100 px carry ~1e-5 px of float32 error in the positions)
    q = on_cv2_grid(m)
    d = np.abs(ours(x, q, size, border) - theirs(x, q, size, border))
    assert d.mean() < 1e-3 and d.max() < 2e-2, (kind, d.mean(), d.max())
    # the exporter's own matrices: cv2 rounds each position to 1/32 px, ours is exact
    d = np.abs(ours(x, m, size, border) - theirs(x, m, size, border))
    assert d.mean() < 0.25 and d.max() < 6, (kind, d.mean(), d.max())
    # uint8 images: cv2 rounds its result to integers
    d = np.abs(np.round(ours(img, q, size, border)) - theirs(img, q, size, border))
    assert d.max() <= 1, (kind, d.max())
  # a crop reaching well past the image's edges exercises the border rule
  q = on_cv2_grid(zoom_out(mats["dlib150"], 2.5, 150))
  got, want = ours(x, q, 150, border), theirs(x, q, 150, border)
  assert np.abs(got - want).max() < 2e-2
  if border == "constant":
    assert (want == 0).all(-1).mean() > 0.2


def test_fill_value_and_batch(photo_and_crops):
  img, mats = photo_and_crops
  x = img.astype(np.float32) / 127.5 - 1  # training range
  ms = np.stack([on_cv2_grid(mats["arcface112"]), on_cv2_grid(zoom_out(mats["dlib150"], 2.5, 112))])
  out = _warp(
    jnp.asarray(np.stack([x, x[::-1]])), jnp.asarray(ms, jnp.float32), 112, fill_value=-1.0
  )
  for i, src in enumerate((x, x[::-1])):
    # cv2 with borderValue -1 reads -1 outside, as fill_value=-1 does
    want = cv2.warpAffine(
      np.ascontiguousarray(src),
      ms[i].astype(np.float32).astype(np.float64),
      (112, 112),
      flags=cv2.INTER_LINEAR,
      borderMode=cv2.BORDER_CONSTANT,
      borderValue=(-1, -1, -1),
    )
    np.testing.assert_allclose(np.asarray(out[i]), want, atol=2e-4)
  assert (np.asarray(out[1]) == -1).all(axis=-1).mean() > 0.05  # part lies outside


def test_to_grey_and_fer_crop_equal_cv2(photo_and_crops):
  img, mats = photo_and_crops
  grey = np.asarray(align.to_grey(jnp.asarray(img, jnp.float32)))[..., 0]
  want = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_RGB2GRAY)
  np.testing.assert_allclose(grey, want, atol=1e-4)
  # uint8: cv2 uses 14-bit fixed-point weights and rounds
  assert np.abs(np.round(grey) - cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)).max() <= 1
  # the fer crop: grey, then the replicate-border warp (faces.FaceAligner's order)
  q = on_cv2_grid(mats["fer64"])
  crop = jax.jit(align.encoder_crop, static_argnums=2)
  got = crop(jnp.asarray(img[None], jnp.float32), jnp.asarray(q[None], jnp.float32), "fer64")
  want = theirs(cv2.cvtColor(img.astype(np.float32), cv2.COLOR_RGB2GRAY), q, 64, "replicate")
  assert got.shape == (1, 64, 64, 1)
  np.testing.assert_allclose(np.asarray(got)[0, ..., 0], want, atol=2e-2)


def test_gradient_is_the_transposed_warp(photo_and_crops):
  img, mats = photo_and_crops
  x = jnp.asarray(img[None], jnp.float32) / 255.0
  m = jnp.asarray(
    zoom_out(mats["dlib150"], 2.0, 150)[None], jnp.float32
  )  # partly outside the image

  @jax.jit
  def warp(z):
    return align.warp_affine(z, m, 150, "constant")

  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.normal(size=(1, 150, 150, 3)), jnp.float32)
  v = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  g = jax.jit(jax.grad(lambda z: jnp.sum(warp(z) * y)))(x)
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0
  # adjoint identity <W^T y, v> = <y, W v> (the warp is linear in the image)
  lhs, rhs = float(jnp.sum(g * v)), float(jnp.sum(y * warp(v)))
  assert abs(lhs - rhs) <= 1e-4 * abs(rhs)
  # and under jit, with the replicate border too
  f = jax.jit(lambda z: jnp.sum(align.warp_affine(z, m, 160, "replicate") ** 2))
  assert np.isfinite(np.asarray(jax.grad(f)(x))).all()


def test_bad_arguments():
  x = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match="border 'wrap'"):
    align.warp_affine(x, jnp.zeros((2, 2, 3)), 4, "wrap")
  with pytest.raises(ValueError, match=r"matrices: expected \(2, 2, 3\)"):
    align.warp_affine(x, jnp.zeros((2, 3)), 4)
  with pytest.raises(ValueError, match="unknown crop kind 'vgg224'"):
    align.encoder_crop(x, jnp.zeros((2, 2, 3)), "vgg224")
