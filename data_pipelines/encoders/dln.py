"""DLN-style expression embedding (16-D), facediff's own layout.

DiffSFSR uses DLN (Zhang et al., "Learning a facial expression embedding
disentangled from identity", CVPR 2021) as its expression encoder. DLN has no public
code or weights, so this module follows the paper's description only (FACTS.md):
two FaceNet-style branches, a face branch and an identity branch, give V_face and
V_id; their difference V_exp = V_face - V_id goes through a degree-2 polynomial
projection to 16-D. The branches are facenet-pytorch InceptionResnetV1 trunks
(512-D, L2-normalised); the projection is ``proj(concat[d, d*d])``.

THE CHECKPOINT LAYOUT IS FACEDIFF'S OWN (not a published format): a torch state dict
with keys ``face.*`` and ``id.*`` (InceptionResnetV1 key names) and ``proj.weight``
(16, 1024), ``proj.bias`` (16,). Pass ``--weights dln=PATH``.
"""

from __future__ import annotations

import torch
from torch import nn

from data_pipelines.encoders import Encoder, Field, register
from data_pipelines.encoders._torch import load_into, load_state_dict, run
from data_pipelines.encoders.facenet import facenet_input, inception_resnet_v1

DLN_DIM = 16


class DLN(nn.Module):
  def __init__(self, dim: int = DLN_DIM):
    super().__init__()
    self.face = inception_resnet_v1()
    self.id = inception_resnet_v1()
    self.proj = nn.Linear(2 * 512, dim)

  def forward(self, x):
    d = self.face(x) - self.id(x)  # V_exp = V_face - V_id
    return polynomial_projection(self.proj, d)


def polynomial_projection(proj: nn.Linear, d: torch.Tensor) -> torch.Tensor:
  """Degree-2 polynomial projection of DLN (facediff's form): W [d; d*d] + b."""
  return proj(torch.cat([d, d * d], dim=1))


@register("dln")
class DLNEncoder(Encoder):
  version = "facediff-dln/1"
  crop = "facenet160"
  weight_keys = ("dln",)
  fields = {"exp_dln": Field("float32", (DLN_DIM,))}
  batch_size = 16

  def __init__(self, weights=None, **options):
    super().__init__(weights, **options)
    self.net = DLN().eval()
    path = self.weights["dln"]
    load_into(self.net, load_state_dict(path, flag="dln"), flag="dln", path=path)

  def __call__(self, batch):
    if batch.ndim != 4 or batch.shape[1:] != (160, 160, 3):
      raise ValueError(f"dln expects (B, 160, 160, 3) crops, got {batch.shape}")
    return {"exp_dln": run(self.net, facenet_input(batch))}
