"""In-graph face encoders (facediff.losses.face_encoders): warping the stored image with
the loader's crop transforms inside jit and encoding it with the Flax ports gives the
embeddings the exporter stored (real dlib and fer weights, real photos)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib")
pytest.importorskip("fer")

from _photos import IMAGES, astronaut_face  # noqa: E402
from _photos import cut as _cut  # noqa: E402

from data_pipelines import export, loaders  # noqa: E402
from facediff.losses import face_encoders  # noqa: E402

SIZE = 256


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  from data_pipelines import faces

  photos = tmp_path_factory.mktemp("enc_in")
  Image.fromarray(astronaut_face()).save(photos / "astronaut.png")
  t1 = np.array(Image.open(os.path.join(IMAGES, "t1.jpg")).convert("RGB"))
  for i, det in enumerate(faces.FaceDetector()(t1)[:3]):
    Image.fromarray(_cut(t1, det, 1.0)).save(photos / f"t1_{i}.png")
  out = str(tmp_path_factory.mktemp("enc_out"))
  export.export(
    str(photos), out, export.ExportConfig(encoders=["dlib", "fer", "mask68"], image_size=SIZE)
  )
  return out


def _batch(path, exp_field):
  c = ml_collections.ConfigDict()
  c.data = dict(
    path=path,
    global_batch_size=4,
    image_size=SIZE,
    id_fields=["id_dlib"],
    id_dims=[128],
    exp_field=exp_field,
    exp_dim=None,
    mask_field="mask",
    crop_fields=["dlib150", "fer64"],
    seed=0,
    num_workers=0,
  )
  return next(loaders.make_eval_triplets(c, "reconstruct", seed=0))


def _cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_dlib_in_graph_matches_the_stored_identity(dataset):
  batch = _batch(dataset, "exp_fer")
  enc, params = face_encoders.load("id_dlib")
  got = jax.jit(lambda p, x, m: face_encoders.embed(enc, p, x, m))(
    params, batch["bkg_image"], batch["crops"]
  )
  cos = _cos(got, batch["id"]["id_dlib"])
  print("dlib cosine, in-graph vs stored:", np.round(cos, 5))
  assert np.all(cos >= 0.99), cos


def test_fer_in_graph_matches_the_stored_expression(dataset):
  probs_batch = _batch(dataset, "exp_fer")
  feat_batch = _batch(dataset, "exp_fer_feat")
  enc_p, params = face_encoders.load("exp_fer")
  enc_f, _ = face_encoders.load("exp_fer_feat")
  run = jax.jit(
    lambda p, x, m: (
      face_encoders.embed(enc_p, p, x, m),
      face_encoders.embed(enc_f, p, x, m),
    )
  )
  probs, feat = run(params, probs_batch["bkg_image"], probs_batch["crops"])
  want_probs, want_feat = np.asarray(probs_batch["exp"]), np.asarray(feat_batch["exp"])
  cos = _cos(feat, want_feat)
  print("fer: argmax", np.argmax(probs, -1), "stored", np.argmax(want_probs, -1))
  print("fer feature cosine:", np.round(cos, 5))
  np.testing.assert_array_equal(np.argmax(probs, -1), np.argmax(want_probs, -1))
  assert np.all(cos >= 0.99), cos


def test_no_gradient_reaches_the_encoder_weights_and_images_get_one():
  enc, params = face_encoders.load("id_dlib")
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)), jnp.float32)
  m = jnp.asarray([[[150 / 64 * 0.8, 0, 10], [0, 150 / 64 * 0.8, 10]]], jnp.float32)

  def f(p, x):
    return jnp.sum(face_encoders.embed(enc, p, x, {"dlib150": m}) ** 2)

  gp, gx = jax.grad(f, argnums=(0, 1))(params, x)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(gp))
  assert float(jnp.max(jnp.abs(gx))) > 0.0


def test_errors_name_the_field_and_the_missing_crop():
  with pytest.raises(ValueError, match="id_arcface.*encoder_weights.id_arcface"):
    face_encoders.load("id_arcface")
  with pytest.raises(ValueError, match="'id_nope'"):
    face_encoders.load("id_nope")
  enc, params = face_encoders.load("exp_fer")
  with pytest.raises(ValueError, match="fer64.*crop_fields"):
    face_encoders.embed(enc, params, jnp.zeros((1, 8, 8, 3)), {"dlib150": jnp.zeros((1, 2, 3))})
