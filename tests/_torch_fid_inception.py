"""A PyTorch reference of pytorch-fid's FID Inception for tests, without torchvision.

torchvision cannot be imported here (FACTS.md), so pytorch-fid's ``fid_inception_v3()``
(torchvision ``Inception3(num_classes=1008, aux_logits=False)`` with the blocks replaced
by ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1`` / ``FIDInceptionE_2``) is
written out here as plain ``torch.nn`` modules with the same attribute names, so its
``state_dict()`` has exactly the keys of ``pt_inception-2015-12-05-6726825d.pth``
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ..., ``fc.weight``).
``forward`` is pytorch-fid's ``InceptionV3([3])``: [0, 1] NCHW input, bilinear resize to
299, 2x - 1, the network, pool_3; it also returns the fc logits.

``width_divisor`` divides every channel count (1 = the real network), for fast tests.
``randomise`` gives random weights whose activations stay O(1) through all 94 layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
  def __init__(self, cin, pool_features, d):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64 // d, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48 // d, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48 // d, 64 // d, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64 // d, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64 // d, 96 // d, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96 // d, 96 // d, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features // d, kernel_size=1)

  def forward(self, x):
    a = self.branch1x1(x)
    b = self.branch5x5_2(self.branch5x5_1(x))
    c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    p = self.branch_pool(_tf_avg_pool(x))
    return torch.cat([a, b, c, p], 1)


class InceptionB(nn.Module):
  def __init__(self, cin, d):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384 // d, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64 // d, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64 // d, 96 // d, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96 // d, 96 // d, kernel_size=3, stride=2)

  def forward(self, x):
    a = self.branch3x3(x)
    b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
  def __init__(self, cin, c7, d):
    super().__init__()
    c7 //= d
    self.branch1x1 = BasicConv2d(cin, 192 // d, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192 // d, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192 // d, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192 // d, kernel_size=1)

  def forward(self, x):
    a = self.branch1x1(x)
    b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    c = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
      c = layer(c)
    c = self.branch7x7dbl_5(c)
    p = self.branch_pool(_tf_avg_pool(x))
    return torch.cat([a, b, c, p], 1)


class InceptionD(nn.Module):
  def __init__(self, cin, d):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192 // d, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192 // d, 320 // d, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192 // d, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192 // d, 192 // d, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192 // d, 192 // d, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192 // d, 192 // d, kernel_size=3, stride=2)

  def forward(self, x):
    a = self.branch3x3_2(self.branch3x3_1(x))
    b = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b = layer(b)
    return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
  """FIDInceptionE_1 (``max_pool=False``) or FIDInceptionE_2 (``max_pool=True``)."""

  def __init__(self, cin, d, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320 // d, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384 // d, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384 // d, 384 // d, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384 // d, 384 // d, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448 // d, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448 // d, 384 // d, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384 // d, 384 // d, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384 // d, 384 // d, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192 // d, kernel_size=1)

  def forward(self, x):
    a = self.branch1x1(x)
    b = self.branch3x3_1(x)
    b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
    c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
    if self.max_pool:
      pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:
      pooled = _tf_avg_pool(x)
    return torch.cat([a, b, c, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
  def __init__(self, width_divisor: int = 1, num_classes: int = 1008):
    super().__init__()
    d = width_divisor
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32 // d, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32 // d, 32 // d, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32 // d, 64 // d, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64 // d, 80 // d, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80 // d, 192 // d, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192 // d, 32, d)
    self.Mixed_5c = FIDInceptionA(256 // d, 64, d)
    self.Mixed_5d = FIDInceptionA(288 // d, 64, d)
    self.Mixed_6a = InceptionB(288 // d, d)
    self.Mixed_6b = FIDInceptionC(768 // d, 128, d)
    self.Mixed_6c = FIDInceptionC(768 // d, 160, d)
    self.Mixed_6d = FIDInceptionC(768 // d, 160, d)
    self.Mixed_6e = FIDInceptionC(768 // d, 192, d)
    self.Mixed_7a = InceptionD(768 // d, d)
    self.Mixed_7b = FIDInceptionE(1280 // d, d, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048 // d, d, max_pool=True)
    self.fc = nn.Linear(2048 // d, num_classes)

  def trunk(self, x):
    """(B, 3, H, W) in [-1, 1] at the network's resolution -> Mixed_7c."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return x

  def forward(self, x01):
    """pytorch-fid ``InceptionV3([3])``: (B, 3, H, W) in [0, 1] -> (pool_3 (B, 2048),
    logits (B, num_classes))."""
    x = F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    pool3 = F.adaptive_avg_pool2d(self.trunk(x), (1, 1)).flatten(1)
    return pool3, self.fc(pool3)


def randomise(net: FIDInception, seed: int, calibration: torch.Tensor) -> FIDInception:
  """Random weights whose activations stay O(1) through all 94 layers: He-normal convs,
  random BN affines, then BN running statistics taken from ``calibration`` ((B, 3, H, W)
  in [0, 1]) and perturbed a little, so every number of the state dict matters. Returns
  the net in eval mode."""
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    for m in bns:
      c = m.num_features
      m.weight.copy_(0.5 + torch.rand(c, generator=g))
      m.bias.copy_(0.1 * torch.randn(c, generator=g))
      m.reset_running_stats()
      m.momentum = 1.0  # running stats := the calibration batch's
    net.train()
    net(calibration)
    for m in bns:
      c = m.num_features
      m.momentum = 0.1
      m.running_mean.add_(0.05 * torch.randn(c, generator=g) * m.running_var.sqrt())
      m.running_var.mul_(0.9 + 0.2 * torch.rand(c, generator=g))
  return net.eval()
