"""Deep3DFaceRecon (D3DFR) coefficient regressor: ResNet-50 -> 257 coefficients.

The torch module follows the public Deep3DFaceRecon_pytorch ``ReconNetWrapper``
(torchvision ResNet-50 trunk as ``backbone.*`` without its fc, then
``final_layers.0..6``: seven 1x1 convolutions with 80, 64, 80, 3, 27, 2, 1 outputs,
concatenated as id | exp | tex | angle | gamma | trans; ``fc_dim`` = 257 is a class
constant there, not a checkpoint key). Its released ``epoch_20.pth`` holds the state
dict under ``net_recon``; pass ``--weights d3dfr=PATH``.

Input: D3DFR's own alignment (``align``): five points (eye centres, nose tip, mouth
corners) fitted to the 3-D template of ``BFM/similarity_Lm3D_all.mat`` by D3DFR's
``POS`` least squares (scale + translation), the image rescaled by 102/s (bicubic)
and a 224x224 window cut; RGB in [0, 1]. The template ships with D3DFR, not here:
pass ``--weights d3dfr_lm3d=PATH`` (the ``.mat`` with key ``lm`` (68, 3)).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from data_pipelines.encoders import Encoder, Field, WeightsError, register
from data_pipelines.encoders._torch import load_into, load_state_dict, run, to_nchw

COEFF_SPLITS = (("id", 80), ("exp", 64), ("tex", 80), ("angle", 3), ("gamma", 27), ("trans", 3))
NUM_COEFFS = 257
_FINAL = (80, 64, 80, 3, 27, 2, 1)


class Bottleneck(nn.Module):
  """torchvision ResNet-50 bottleneck (stride on the 3x3 conv)."""

  def __init__(self, cin, width, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(width * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50Trunk(nn.Module):
  def __init__(self, layers=(3, 4, 6, 3)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
      stride = 1 if i == 0 else 2
      down = nn.Sequential(
        nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4)
      )
      blocks = [Bottleneck(cin, width, stride, down)]
      blocks += [Bottleneck(width * 4, width) for _ in range(n - 1)]
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
      cin = width * 4
    self.avgpool = nn.AdaptiveAvgPool2d(1)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.avgpool(x)


class ReconNet(nn.Module):
  fc_dim = NUM_COEFFS

  def __init__(self):
    super().__init__()
    self.backbone = ResNet50Trunk()
    self.final_layers = nn.ModuleList([nn.Conv2d(2048, n, 1, bias=True) for n in _FINAL])

  def forward(self, x):
    f = self.backbone(x)
    return torch.flatten(torch.cat([layer(f) for layer in self.final_layers], dim=1), 1)


def split_coeffs(coeffs: np.ndarray) -> dict[str, np.ndarray]:
  """257 -> {id 80, exp 64, tex 80, angle 3, gamma 27, trans 3} (D3DFR order)."""
  out, i = {}, 0
  for name, n in COEFF_SPLITS:
    out[name] = coeffs[..., i : i + n]
    i += n
  return out


def load_lm3d(path: str) -> np.ndarray:
  """D3DFR's 5-point 3-D template from ``similarity_Lm3D_all.mat``."""
  from scipy.io import loadmat

  try:
    lm = np.asarray(loadmat(path)["lm"], np.float64)
  except Exception as e:
    raise WeightsError(f"--weights d3dfr_lm3d={path}: cannot read key 'lm' ({e})") from e
  if lm.shape != (68, 3):
    raise WeightsError(f"--weights d3dfr_lm3d={path}: 'lm' has shape {lm.shape}, expected (68, 3)")
  return five_points_d3dfr(lm)


def five_points_d3dfr(lm68: np.ndarray) -> np.ndarray:
  """D3DFR's five points from 68: eye centres (mean of the corners 37/40, 43/46),
  nose tip 31, mouth corners 49, 55 (1-based), ordered eyes, nose, mouth."""
  lm = np.asarray(lm68, np.float64)
  return np.stack([(lm[36] + lm[39]) / 2, (lm[42] + lm[45]) / 2, lm[30], lm[48], lm[54]])


def pos(xp: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
  """D3DFR ``POS``: least squares xp ~ [R1; R2] x + t over 5 points (affine camera);
  returns t (2,) and the scale s = (|R1| + |R2|)/2."""
  n = xp.shape[0]
  a = np.zeros((2 * n, 8))
  a[0::2, 0:3], a[0::2, 3] = x, 1
  a[1::2, 4:7], a[1::2, 7] = x, 1
  k = np.linalg.lstsq(a, xp.reshape(-1), rcond=None)[0]
  s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
  return np.array([k[3], k[7]]), float(s)


def align_geometry(
  image_shape: tuple[int, ...],
  lm68: np.ndarray,
  lm3d5: np.ndarray,
  target_size: int = 224,
  rescale_factor: float = 102.0,
) -> tuple[int, int, int, int]:
  """D3DFR ``align_img``'s resize and window: (w, h, left, up) of the rescaled image
  and of the ``target_size`` window cut from it."""
  h0, w0 = image_shape[:2]
  lm = five_points_d3dfr(lm68).copy()
  lm[:, 1] = h0 - 1 - lm[:, 1]  # D3DFR flips y before the fit
  t, s = pos(lm, lm3d5)
  s = rescale_factor / s
  w, h = int(w0 * s), int(h0 * s)
  left = int(w / 2 - target_size / 2 + (t[0] - w0 / 2) * s)
  up = int(h / 2 - target_size / 2 + (h0 / 2 - t[1]) * s)
  return w, h, left, up


def align(
  image: np.ndarray,
  lm68: np.ndarray,
  lm3d5: np.ndarray,
  target_size: int = 224,
  rescale_factor: float = 102.0,
) -> np.ndarray:
  """D3DFR ``align_img``: 224x224 RGB uint8 crop (zeros outside the image)."""
  w, h, left, up = align_geometry(image.shape, lm68, lm3d5, target_size, rescale_factor)
  img = Image.fromarray(image).resize((w, h), resample=Image.BICUBIC)
  return np.asarray(img.crop((left, up, left + target_size, up + target_size)).convert("RGB"))


def align_matrix(
  image_shape: tuple[int, ...],
  lm68: np.ndarray,
  lm3d5: np.ndarray,
  target_size: int = 224,
  rescale_factor: float = 102.0,
) -> np.ndarray:
  """2x3 matrix, original pixels -> ``align``'s crop pixels (pixel centres at integers).

  PIL's resize from w0 to w puts output pixel x at input (x + 0.5) w0/w - 0.5, so
  x_crop = (x + 0.5) w/w0 - 0.5 - left (and likewise in y with h/h0, up).
  """
  h0, w0 = image_shape[:2]
  w, h, left, up = align_geometry(image_shape, lm68, lm3d5, target_size, rescale_factor)
  sx, sy = w / w0, h / h0
  return np.array([[sx, 0.0, 0.5 * sx - 0.5 - left], [0.0, sy, 0.5 * sy - 0.5 - up]])


@register("d3dfr")
class D3DFR(Encoder):
  version = "deep3dfacerecon-resnet50"
  crop = None
  weight_keys = ("d3dfr", "d3dfr_lm3d")
  fields = {"coeffs": Field("float32", (NUM_COEFFS,))}
  batch_size = 16

  def __init__(self, weights=None, **options):
    super().__init__(weights, **options)
    self.net = ReconNet().eval()
    path = self.weights["d3dfr"]
    load_into(
      self.net,
      load_state_dict(path, flag="d3dfr", nested=("net_recon", "state_dict")),
      flag="d3dfr",
      path=path,
    )
    self.lm3d = load_lm3d(self.weights["d3dfr_lm3d"])

  def prepare(self, face) -> np.ndarray:
    if face.source is None:
      raise KeyError("encoder 'd3dfr' needs the original image (FaceResult.source)")
    return align(face.source, face.landmarks68, self.lm3d)

  def crop_kinds(self) -> tuple[str, ...]:
    return ("d3dfr224",)

  def crop_transforms(self, face) -> dict[str, np.ndarray]:
    if face.source is None:
      raise KeyError("encoder 'd3dfr' needs the original image (FaceResult.source)")
    return {"d3dfr224": align_matrix(face.source.shape, face.landmarks68, self.lm3d)}

  def __call__(self, batch):
    if batch.ndim != 4 or batch.shape[1:] != (224, 224, 3):
      raise ValueError(f"d3dfr expects (B, 224, 224, 3) crops, got {batch.shape}")
    return {"coeffs": run(self.net, to_nchw(batch) / 255.0)}
