"""FaceNet InceptionResnetV1 from facenet-pytorch, with user-supplied weights.

``import facenet_pytorch`` fails here (its package import needs torchvision), so
its ``models/inception_resnet_v1.py`` is loaded as a file under a private parent
package registered in ``sys.modules``. The recognition weights do not ship with
the package: pass ``--weights facenet=PATH`` (facenet-pytorch's released state dict,
e.g. ``20180402-114759-vggface2.pt``; its classifier ``logits.*`` is ignored).
Input 160x160 RGB, ``(x - 127.5)/128``; output 512-D, L2-normalised.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import torch

from data_pipelines.encoders import Encoder, Field, WeightsError, register
from data_pipelines.encoders._torch import load_into, load_state_dict, run, to_nchw

_PARENT = "_facediff_facenet_pytorch"


def facenet_module():
  """The ``inception_resnet_v1`` module of the installed facenet-pytorch."""
  name = f"{_PARENT}.models.inception_resnet_v1"
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.find_spec("facenet_pytorch")
  if spec is None or not spec.origin:
    raise WeightsError(
      "facenet-pytorch is not installed (pip install --no-deps "
      "facenet-pytorch); it ships the InceptionResnetV1 architecture"
    )
  root = os.path.dirname(spec.origin)
  for pkg, path in ((_PARENT, root), (f"{_PARENT}.models", os.path.join(root, "models"))):
    if pkg not in sys.modules:
      m = types.ModuleType(pkg)
      m.__path__ = [path]
      sys.modules[pkg] = m
  fspec = importlib.util.spec_from_file_location(
    name, os.path.join(root, "models", "inception_resnet_v1.py")
  )
  mod = importlib.util.module_from_spec(fspec)
  sys.modules[name] = mod
  try:
    fspec.loader.exec_module(mod)
  except Exception:
    del sys.modules[name]
    raise
  return mod


def inception_resnet_v1() -> torch.nn.Module:
  """A fresh (random) InceptionResnetV1 in embedding mode, eval."""
  return facenet_module().InceptionResnetV1(pretrained=None, classify=False).eval()


def facenet_input(batch: np.ndarray) -> torch.Tensor:
  """uint8 RGB (B, 160, 160, 3) -> (x - 127.5)/128, NCHW (facenet-pytorch's
  fixed_image_standardization)."""
  return (to_nchw(batch) - 127.5) / 128.0


@register("facenet")
class FaceNet(Encoder):
  version = "facenet-pytorch-inception_resnet_v1"
  crop = "facenet160"
  weight_keys = ("facenet",)
  fields = {"id_facenet": Field("float32", (512,))}
  batch_size = 16

  def __init__(self, weights=None, **options):
    super().__init__(weights, **options)
    self.net = inception_resnet_v1()
    path = self.weights["facenet"]
    load_into(
      self.net,
      load_state_dict(path, flag="facenet"),
      flag="facenet",
      path=path,
      ignore=("logits.",),
    )

  def __call__(self, batch):
    if batch.ndim != 4 or batch.shape[1:] != (160, 160, 3):
      raise ValueError(f"facenet expects (B, 160, 160, 3) crops, got {batch.shape}")
    return {"id_facenet": run(self.net, facenet_input(batch))}
