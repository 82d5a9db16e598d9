"""DLN-style 16-D expression embedding in Flax Linen (facediff's own layout), NHWC.

DiffSFSR's expression encoder is DLN (Zhang et al., "Learning a facial expression
embedding disentangled from identity", CVPR 2021), which has no public code or weights.
facediff follows the paper's description (FACTS.md "Face networks"), exactly as the
PyTorch module ``data_pipelines/encoders/dln.py`` does: two InceptionResnetV1 branches,
a face branch (``face``) and an identity branch (``id``), each giving a 512-D
L2-normalised embedding of the same image; their difference V_exp = V_face - V_id goes
through a degree-2 polynomial projection ``proj(concat[d, d*d])`` to 16-D.

Parameter names mirror that module's state dict (``face/...``, ``id/...`` with
InceptionResnetV1 names, ``proj/kernel``, ``proj/bias``); the converter is
``facediff/convert/facenet.py``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from facediff.models import layers
from facediff.models.facenet import FaceNetConfig, InceptionResnetV1

DLN_DIM = 16


@dataclasses.dataclass(frozen=True)
class DLNConfig:
  """Shape of the DLN embedding: two InceptionResnetV1 branches and a 16-D projection."""

  branch: FaceNetConfig = FaceNetConfig()
  dim: int = DLN_DIM
  # Compute dtype of both branches and the projection (parameters stay float32).
  dtype: str = "float32"

  @property
  def branch_config(self) -> FaceNetConfig:
    """The branches' config, with this config's compute dtype."""
    return dataclasses.replace(self.branch, dtype=self.dtype)


def polynomial_features(d: jax.Array) -> jax.Array:
  """DLN's degree-2 polynomial features (facediff's form, as
  ``data_pipelines.encoders.dln.polynomial_projection``): concat[d, d * d] on the last
  axis; the projection is then W [d; d*d] + b."""
  return jnp.concatenate([d, d * d], axis=-1)


class DLN(nn.Module):
  """``__call__(images)``: (B, H, W, 3) float RGB in [0, 255] (160x160) -> (B, dim).

  V_exp = face(x) - id(x) (both L2-normalised, float32), then
  ``proj(polynomial_features(V_exp))``.
  """

  config: DLNConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    branch = cfg.branch_config
    face = InceptionResnetV1(branch, name="face")
    identity = InceptionResnetV1(branch, name="id")
    d = face(images) - identity(images)  # V_exp = V_face - V_id
    feats = polynomial_features(d).astype(jnp.dtype(cfg.dtype))
    out = layers.Dense(cfg.dim, ("mlp", "embed"), dtype=jnp.dtype(cfg.dtype), name="proj")(feats)
    return out.astype(jnp.promote_types(jnp.float32, out.dtype))


def init_params(config: DLNConfig, key: jax.Array):
  """Random params (boxed with logical axes, as module.init returns them). Traceable:
  use under jax.jit / jax.eval_shape (see facediff.partitioning.init_sharded)."""
  size = config.branch.image_size
  return DLN(config).init(key, jnp.zeros((1, size, size, 3), jnp.float32))["params"]


def abstract_params(config: DLNConfig):
  """The param tree's shapes and dtypes (``jax.eval_shape``, nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
