"""The exporter's crop_<kind> transforms reproduce the encoders' crops from the stored
face image, and dlib's chip geometry (dlib_chip_matrix) is the one dlib samples."""

import io
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

dlib = pytest.importorskip("dlib")
from _photos import IMAGES, astronaut_face  # noqa: E402
from _photos import cut as _cut  # noqa: E402

from data_pipelines import encoders, export, faces, records  # noqa: E402
from data_pipelines.encoders import Encoder, Field  # noqa: E402
from facediff.losses import align  # noqa: E402

SIZE = 256
KINDS = ("arcface112", "dlib150", "facenet160", "fer64")
CV2_BORDERS = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE}


class CropStub(Encoder):
  """An encoder that reads one crop kind and writes its mean (no weights needed)."""

  version = "stub"

  def __init__(self, kind):
    super().__init__()
    self.crop, self.name = kind, f"stub_{kind}"
    self.fields = {f"mean_{kind}": Field("float32", ())}

  def __call__(self, batch):
    return {f"mean_{self.crop}": batch.reshape(len(batch), -1).mean(1)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Three one-face photos: the astronaut and two faces of insightface's t1.jpg."""
  d = tmp_path_factory.mktemp("crop_in")
  Image.fromarray(astronaut_face()).save(d / "astronaut.png")
  t1 = np.array(Image.open(os.path.join(IMAGES, "t1.jpg")).convert("RGB"))
  for i, det in enumerate(faces.FaceDetector()(t1)[:2]):
    Image.fromarray(_cut(t1, det, 1.0)).save(d / f"t1_{i}.png")
  return str(d)


@pytest.fixture(scope="module")
def exported(photos, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("crop_out"))
  cfg = export.ExportConfig(encoders=[CropStub(k) for k in KINDS], image_size=SIZE)
  m = export.export(photos, out, cfg)
  recs = list(records.iter_records(out))
  assert len(recs) == 3
  aligner = faces.FaceAligner(crops=("image", *KINDS), image_size=SIZE)
  refs = [
    aligner(np.array(Image.open(os.path.join(photos, r["key"])).convert("RGB"))) for r in recs
  ]
  return m, recs, refs


def test_manifest_declares_crop_fields(exported):
  m, recs, _ = exported
  for kind in KINDS:
    spec = m.fields[f"crop_{kind}"]
    assert spec.dtype == "float32" and spec.shape == [2, 3]
    assert all(r[f"crop_{kind}"].dtype == np.float32 for r in recs)
  m.check_fields({f"crop_{k}": 3 for k in KINDS})
  assert "crop_transforms" in m.extra


def test_transforms_carry_the_landmarks(exported):
  # geometry alone: the stored image's landmarks, mapped by crop_<kind>, land on the
  # landmarks of the aligner's crop of the original photo
  _, recs, refs = exported
  for r, ref in zip(recs, refs, strict=True):
    for kind in KINDS:
      got = faces.apply_affine(r[f"crop_{kind}"].astype(np.float64), r["landmarks"])
      np.testing.assert_allclose(got, ref.crops[kind].landmarks, atol=2e-3)


def _crop_cv2(image, m, kind):
  """The crop as the exporter cuts it (grey first for fer64), with cv2."""
  geo = align.CROP_GEOMETRY[kind]
  if geo.grey:
    image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
  return cv2.warpAffine(
    image,
    m.astype(np.float64),
    (geo.size, geo.size),
    flags=cv2.INTER_LINEAR,
    borderMode=CV2_BORDERS[geo.border],
    borderValue=0,
  )


_encoder_crop = jax.jit(align.encoder_crop, static_argnums=2)


def test_stored_image_reproduces_the_crops(exported):
  """Warping the stored 256x256 image with crop_<kind> (cv2 and warp_affine) gives
  the aligner's crop of the original photo up to resampling twice."""
  _, recs, refs = exported
  stats = {k: [] for k in KINDS}
  for r, ref in zip(recs, refs, strict=True):
    img = np.array(Image.open(io.BytesIO(r["image"])).convert("RGB"))
    assert img.shape == (SIZE, SIZE, 3)
    for kind in KINDS:
      m = r[f"crop_{kind}"]
      want = ref.crops[kind].image.astype(np.float32)
      via_cv2 = _crop_cv2(img, m, kind).astype(np.float32)  # uint8, as the exporter
      via_cv2_float = _crop_cv2(img.astype(np.float32), m, kind)
      x = jnp.asarray(img[None], jnp.float32)
      via_jnp = np.asarray(_encoder_crop(x, jnp.asarray(m[None]), kind))[0]
      via_jnp = via_jnp[..., 0] if kind == "fer64" else via_jnp
      stats[kind].append(
        [np.abs(d).mean() for d in (via_cv2 - want, via_jnp - want, via_jnp - via_cv2_float)]
      )
  for kind, s in stats.items():
    s = np.array(s)
    print(
      f"{kind}: mean abs diff, worst of {len(s)} photos (uint8 levels): cv2 crop of the "
      f"stored image vs the exporter's crop {s[:, 0].max():.2f}, warp_affine's "
      f"{s[:, 1].max():.2f}; warp_affine vs cv2 (float) {s[:, 2].max():.3f}"
    )
    assert s[:, :2].max() < 4.0, kind
    assert s[:, 2].max() < 0.2, kind


@pytest.mark.parametrize("side", [200, 299, 301, 610, 1300])
def test_dlib_chip_matrix_is_what_dlib_samples(side):
  # a chip of a coordinate ramp reads back the position dlib sampled (bilinear and
  # pyramid_down are exact on linear ramps away from the borders)
  w = int(side * 2.2)
  for angle in (0.0, 0.3):
    rect = dlib.drectangle(
      w / 2 - side / 2 + 0.3, w / 2 - side / 2 + 0.7, w / 2 + side / 2 + 0.3, w / 2 + side / 2 + 0.7
    )
    details = dlib.chip_details(rect, dlib.chip_dims(150, 150), angle)
    inv = cv2.invertAffineTransform(faces.dlib_chip_matrix(details))
    gx, gy = np.meshgrid(np.arange(150.0), np.arange(150.0))
    for axis, ramp in enumerate(
      np.meshgrid(np.arange(w, dtype=np.float64), np.arange(w, dtype=np.float64))
    ):
      sampled = dlib.extract_image_chip(ramp, details)
      want = inv[axis, 0] * gx + inv[axis, 1] * gy + inv[axis, 2]
      np.testing.assert_allclose(sampled, want, atol=1e-4)


@pytest.fixture(scope="module")
def astro():
  img = astronaut_face()
  return img, faces.FaceAligner(crops=("dlib150",))(img)


def test_dlib_chip_matrix_on_a_face(astro):
  img, res = astro
  chip, m = res.crops["dlib150"].image, res.crops["dlib150"].matrix
  mine = cv2.warpAffine(img, m, (150, 150), flags=cv2.INTER_LINEAR).astype(np.float32)
  # dlib truncates where cv2 rounds: about half a level apart on average
  assert np.abs(mine - chip).mean() < 1.0


def test_d3dfr_matrix_reproduces_its_crop(astro):
  from data_pipelines.encoders import d3dfr

  img, res = astro
  five = d3dfr.five_points_d3dfr(res.landmarks68)
  tmpl = np.concatenate([(five - five.mean(0)) * [1, -1] / 50.0, np.zeros((5, 1))], 1)
  crop = d3dfr.align(img, res.landmarks68, tmpl).astype(np.float32)
  m = d3dfr.align_matrix(img.shape, res.landmarks68, tmpl)
  mine = cv2.warpAffine(img, m, (224, 224), flags=cv2.INTER_LINEAR).astype(np.float32)
  # PIL's bicubic (antialiased) resize vs one bilinear warp: same geometry
  assert np.abs(mine - crop).mean() < 4.0
  shifted = m + [[0, 0, 1.0], [0, 0, 0]]  # a one-pixel error would show
  worse = cv2.warpAffine(img, shifted, (224, 224), flags=cv2.INTER_LINEAR).astype(np.float32)
  assert np.abs(worse - crop).mean() > np.abs(mine - crop).mean() * 1.3


def test_encoders_name_their_crop_kinds():
  assert CropStub("fer64").crop_kinds() == ("fer64",)
  assert encoders.create("mask68").crop_kinds() == ()  # reads the stored image itself
  bad = CropStub("fer64")
  bad.fields = {"crop_x": Field("float32", ())}
  with pytest.raises(export.ExportError, match="prefix 'crop_' is reserved"):
    export.build_encoders(export.ExportConfig(encoders=[bad]))
