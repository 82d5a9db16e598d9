"""ArcFace IResNet (insightface arcface_torch layout) and CurricularFace IR-101.

Both are written here in torch (FACTS.md "Face networks") with the public
checkpoints' key names, so the released ``backbone.pth`` (insightface) and
``CurricularFace_Backbone.pth`` state dicts load strictly. Neither ships offline:
the user passes ``--weights arcface=PATH`` / ``--weights curricularface=PATH``.
Input: the ArcFace 112x112 five-point crop, RGB, ``(x/255 - 0.5)/0.5``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data_pipelines.encoders import Encoder, Field, register
from data_pipelines.encoders._torch import load_into, load_state_dict, run, to_nchw

ARCFACE_LAYERS = {"r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
IR_LAYERS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


def _conv3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
  """BN, conv3x3, BN, PReLU, conv3x3(stride), BN, plus the shortcut."""

  def __init__(self, cin, cout, stride=1, downsample=None):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
    self.conv1 = _conv3(cin, cout)
    self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
    self.prelu = nn.PReLU(cout)
    self.conv2 = _conv3(cout, cout, stride)
    self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
    self.downsample = downsample

  def forward(self, x):
    y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
  """insightface IResNet: stem conv3x3+BN+PReLU, 4 stages (64..512, stride 2 each),
  head BN2d, flatten, dropout, Linear(512*7*7, 512), BN1d."""

  def __init__(self, layers=ARCFACE_LAYERS["r50"], num_features=512, dropout=0.0):
    super().__init__()
    self.conv1 = _conv3(3, 64)
    self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
    self.prelu = nn.PReLU(64)
    cin = 64
    for i, (n, cout) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
      down = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout, eps=1e-5))
      blocks = [IBasicBlock(cin, cout, 2, down)] + [IBasicBlock(cout, cout) for _ in range(n - 1)]
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
      cin = cout
    self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
    self.dropout = nn.Dropout(dropout)
    self.fc = nn.Linear(512 * 7 * 7, num_features)
    self.features = nn.BatchNorm1d(num_features, eps=1e-5)

  def forward(self, x):
    x = self.prelu(self.bn1(self.conv1(x)))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = self.dropout(torch.flatten(self.bn2(x), 1))
    return self.features(self.fc(x))


class BottleneckIR(nn.Module):
  """CurricularFace/face.evoLVe ``bottleneck_IR``: res = BN, conv3x3, PReLU,
  conv3x3(stride), BN; shortcut = MaxPool(1, stride) or conv1x1+BN."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    if cin == cout:
      self.shortcut_layer = nn.MaxPool2d(1, stride)
    else:
      self.shortcut_layer = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )
    self.res_layer = nn.Sequential(
      nn.BatchNorm2d(cin),
      _conv3(cin, cout),
      nn.PReLU(cout),
      _conv3(cout, cout, stride),
      nn.BatchNorm2d(cout),
    )

  def forward(self, x):
    return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
  """CurricularFace ``Backbone(112, 100, 'ir')`` (IR-101): input_layer, body,
  output_layer = BN2d, Dropout, Flatten, Linear(25088, 512), BN1d(affine=False)."""

  def __init__(self, num_layers=100):
    super().__init__()
    self.input_layer = nn.Sequential(_conv3(3, 64), nn.BatchNorm2d(64), nn.PReLU(64))
    body, cin = [], 64
    for n, cout in zip(IR_LAYERS[num_layers], (64, 128, 256, 512), strict=True):
      body += [BottleneckIR(cin, cout, 2)] + [BottleneckIR(cout, cout, 1) for _ in range(n - 1)]
      cin = cout
    self.body = nn.Sequential(*body)
    self.output_layer = nn.Sequential(
      nn.BatchNorm2d(512),
      nn.Dropout(),
      nn.Flatten(),
      nn.Linear(512 * 7 * 7, 512),
      nn.BatchNorm1d(512, affine=False),
    )

  def forward(self, x):
    return self.output_layer(self.body(self.input_layer(x)))


def arcface_input(batch: np.ndarray) -> torch.Tensor:
  """uint8 RGB (B, 112, 112, 3) -> (x/255 - 0.5)/0.5, NCHW."""
  return (to_nchw(batch) / 255.0 - 0.5) / 0.5


class _Arc112(Encoder):
  crop = "arcface112"
  batch_size = 16

  def _check(self, batch):
    if batch.ndim != 4 or batch.shape[1:] != (112, 112, 3):
      raise ValueError(f"{self.name} expects (B, 112, 112, 3) crops, got {batch.shape}")


class _ArcFace(_Arc112):
  arch = "r50"
  weight_keys = ("arcface",)
  fields = {"id_arcface": Field("float32", (512,))}

  def __init__(self, weights=None, **options):
    super().__init__(weights, **options)
    self.net = IResNet(ARCFACE_LAYERS[self.arch])
    path = self.weights["arcface"]
    load_into(self.net, load_state_dict(path, flag="arcface"), flag="arcface", path=path)

  def __call__(self, batch):
    self._check(batch)
    return {"id_arcface": run(self.net, arcface_input(batch))}


@register("arcface_r50")
class ArcFaceR50(_ArcFace):
  version = "insightface-iresnet50"
  arch = "r50"


@register("arcface_r100")
class ArcFaceR100(_ArcFace):
  version = "insightface-iresnet100"
  arch = "r100"


@register("curricularface")
class CurricularFace(_Arc112):
  """CurricularFace IR-101 (TGDM's identity embedding for face swapping)."""

  version = "curricularface-ir101"
  weight_keys = ("curricularface",)
  fields = {"id_curricularface": Field("float32", (512,))}

  def __init__(self, weights=None, num_layers: int = 100, **options):
    super().__init__(weights, **options)
    self.net = IRBackbone(num_layers)
    if num_layers != 100:
      self.version = f"curricularface-ir{num_layers}"
    path = self.weights["curricularface"]
    load_into(
      self.net, load_state_dict(path, flag="curricularface"), flag="curricularface", path=path
    )

  def __call__(self, batch):
    self._check(batch)
    return {"id_curricularface": run(self.net, arcface_input(batch))}
