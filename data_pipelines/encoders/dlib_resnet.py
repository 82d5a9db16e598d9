"""dlib's face-recognition ResNet (128-D), real weights from face-recognition-models."""

from __future__ import annotations

import numpy as np

from data_pipelines import faces
from data_pipelines.encoders import Encoder, Field, register


@register("dlib")
class DlibResNet(Encoder):
  """``dlib.face_recognition_model_v1`` on dlib's 150x150 face chip.

  The same descriptor as ``compute_face_descriptor(image, shape)`` (which cuts the
  identical chip internally); ``num_jitters`` > 1 averages jittered copies.
  """

  version = "dlib_face_recognition_resnet_model_v1"
  crop = "dlib150"
  fields = {"id_dlib": Field("float32", (128,))}
  batch_size = 16

  def __init__(self, weights=None, **options):
    super().__init__(weights, **options)
    import dlib

    path = self.weights.get("dlib") or faces.model_path(faces.DLIB_RESNET)
    self._net = dlib.face_recognition_model_v1(path)
    self.num_jitters = int(options.get("num_jitters", 1))

  def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
    chips = [np.ascontiguousarray(c) for c in batch]
    desc = self._net.compute_face_descriptor(chips, self.num_jitters)
    return {"id_dlib": np.asarray([np.asarray(d) for d in desc], np.float32)}
