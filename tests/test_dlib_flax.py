"""dlib's face-recognition ResNet in Flax: parity with dlib itself on real photos, through
the pure-Python ``.dat`` reader, and the reader's errors on damaged files."""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

dlib = pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")
if importlib.util.find_spec("face_recognition_models") is None:
  pytest.skip("face_recognition_models is not installed", allow_module_level=True)

from data_pipelines import faces  # noqa: E402
from facediff.convert import dlib_dat  # noqa: E402
from facediff.models import dlib_resnet  # noqa: E402


def _insightface_image(name):
  spec = importlib.util.find_spec("insightface")
  if spec is None:
    pytest.skip("insightface (its sample photos) is not installed")
  path = os.path.join(os.path.dirname(spec.origin), "data", "images", name)
  return np.array(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def dat():
  return dlib_dat.read_dlib_resnet()


@pytest.fixture(scope="module")
def chips():
  """dlib's 150x150 chips of every face its HOG detector finds in skimage's astronaut
  and insightface's t1.jpg (six people), with dlib's own descriptors of them."""
  detector = dlib.get_frontal_face_detector()
  predictor = dlib.shape_predictor(faces.model_path(faces.SHAPE_PREDICTORS[68]))
  net = dlib.face_recognition_model_v1(dlib_dat.default_path())
  out, desc, n_t1 = [], [], 0
  for name, img, upsample in (
    ("astronaut", skimage_data.astronaut(), 1),
    ("t1", _insightface_image("t1.jpg"), 0),  # all six faces without upsampling
  ):
    for rect in detector(img, upsample):
      chip = dlib.get_face_chip(img, predictor(img, rect), size=150, padding=0.25)
      out.append(chip)
      desc.append(np.asarray(net.compute_face_descriptor(chip), np.float64))
      n_t1 += name == "t1"
  assert n_t1 == 6
  return np.stack(out), np.stack(desc), n_t1


def _identity_loss(model, params, images, targets):
  """sum_i ||D(x_i) - t_i||^2: an identity loss as training uses it."""
  d = model.apply({"params": params}, images)
  return jnp.sum((d - targets) ** 2), d


@pytest.fixture(scope="module")
def loss_and_grad(dat):
  """One compiled program for every test: (loss, descriptors), d loss / d images."""
  model = dlib_resnet.DlibResNet(dat.config)
  fn = jax.jit(jax.value_and_grad(lambda p, x, t: _identity_loss(model, p, x, t), 1, True))
  return lambda x, t: fn(dat.params, x, t)


def test_reader_reads_dlibs_settings(dat):
  # loss_metric_'s defaults (dlib/dnn/loss.h) are what the file stores; float_details
  # writes the mantissa, then the exponent.
  assert dat.margin == float(np.float32(0.04))
  assert dat.distance_threshold == float(np.float32(0.6))
  assert dat.config.image_size == 150


def test_descriptors_match_dlib(chips, loss_and_grad, dat):
  images, ref, n_t1 = chips
  targets = np.roll(ref, 1, axis=0).astype(np.float32)
  (_, ours), _ = loss_and_grad(images.astype(np.float32), targets)
  ours = np.asarray(ours, np.float64)
  err = np.abs(ours - ref).max()
  cos = np.sum(ours * ref, 1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
  print(f"dlib descriptors, {len(ref)} chips: max abs err {err:.2e}, min cosine {cos.min():.9f}")
  assert err <= 1e-5
  # six different people in t1.jpg: all pairwise farther than the file's threshold
  t1 = ours[-n_t1:]
  dist = np.linalg.norm(t1[:, None] - t1[None], axis=-1)[np.triu_indices(n_t1, 1)]
  assert dist.min() > dat.distance_threshold


def test_input_gradient_is_finite_and_matches_finite_differences(chips, loss_and_grad):
  images, ref, _ = chips
  x = images.astype(np.float32)
  targets = np.roll(ref, 1, axis=0).astype(np.float32)
  (loss, _), grad = loss_and_grad(x, targets)
  grad = np.asarray(grad, np.float64)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  # central difference along the gradient, 0.05 grey levels per pixel at most: the net is
  # piecewise linear (relu, max-pool), so small steps cross few kinks (a random direction
  # is nearly orthogonal to the gradient, and the kinks would swamp its slope)
  v = (0.05 * grad / np.abs(grad).max()).astype(np.float32)
  (lp, _), _ = loss_and_grad(x + v, targets)
  (lm, _), _ = loss_and_grad(x - v, targets)
  fd = (float(lp) - float(lm)) / 2
  analytic = float(np.sum(grad * v))
  print(f"directional derivative: autodiff {analytic:.6e}, finite difference {fd:.6e}")
  assert fd == pytest.approx(analytic, rel=0.01)


def _damaged_copy(tmp_path, edit):
  data = bytearray(open(dlib_dat.default_path(), "rb").read())
  path = str(tmp_path / "damaged.dat")
  with open(path, "wb") as f:
    f.write(edit(data))
  return path


def test_truncated_file_raises(tmp_path):
  path = _damaged_copy(tmp_path, lambda d: d[: len(d) // 2])
  with pytest.raises(dlib_dat.DlibDatError, match=rf"{path}: at byte \d+: file ends"):
    dlib_dat.read_dlib_resnet(path)


def test_trailing_bytes_raise(tmp_path):
  size = os.path.getsize(dlib_dat.default_path())
  path = _damaged_copy(tmp_path, lambda d: d + b"\x00")
  with pytest.raises(dlib_dat.DlibDatError, match=rf"at byte {size}: 1 unexpected byte"):
    dlib_dat.read_dlib_resnet(path)


def test_wrong_versions_raise(tmp_path):
  def bump_loss_version(d):
    d[1] = 2  # `01 01`: the add_loss_layer version
    return d

  path = _damaged_copy(tmp_path, bump_loss_version)
  with pytest.raises(dlib_dat.DlibDatError, match="at byte 0: add_loss_layer version"):
    dlib_dat.read_dlib_resnet(path)

  at = {}

  def rename_first_conv(d):
    at["i"] = d.index(b"con_4") - 2  # the string's length integer `01 05`
    d[at["i"] + 6] = ord("9")
    return d

  path = _damaged_copy(tmp_path, rename_first_conv)
  with pytest.raises(dlib_dat.DlibDatError, match=rf"at byte {at['i']}: stem_conv layer.*'con_9'"):
    dlib_dat.read_dlib_resnet(path)


@pytest.mark.parametrize(
  "change",
  [dict(stage_blocks=(3, 4, 3, 3, 2)), dict(stage_blocks=(3, 3, 3, 3, 1))],
  ids=["one_block_more", "one_block_fewer"],
)
def test_layer_count_mismatch_raises(change):
  config = dataclasses.replace(dlib_resnet.DlibResNetConfig(), **change)
  with pytest.raises(dlib_dat.DlibDatError, match=r"dlib_face_recognition.*at byte \d+"):
    dlib_dat.read_dlib_resnet(config=config)
