"""Flax FID Inception against a PyTorch reference of pytorch-fid's network, random weights.

The reference (tests/_torch_fid_inception.py) is pytorch-fid's ``fid_inception_v3`` written
out without torchvision, with the same state-dict keys as the released
``pt_inception-2015-12-05-6726825d.pth``; its state dict goes through the real converter.
Pieces are checked against torch's own ops (F.interpolate, F.avg_pool2d, F.max_pool2d).
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import _torch_fid_inception as ref_lib  # noqa: E402

from facediff.convert import common  # noqa: E402
from facediff.convert import inception as convert  # noqa: E402
from facediff.metrics import fid  # noqa: E402
from facediff.models import inception  # noqa: E402


def _images(batch, size, seed):
  """Blocky random RGB images with noise, (B, size, size, 3) float32 in [-1, 1]."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (batch, size // 8 + 1, size // 8 + 1, 3))
  img = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :size, :size]
  return np.clip(img + rng.normal(0, 0.1, img.shape), -1, 1).astype(np.float32)


def _nchw01(x):
  """NHWC [-1, 1] numpy -> NCHW [0, 1] torch (pytorch-fid's input convention)."""
  return torch.from_numpy((np.asarray(x, np.float32) + 1) / 2).permute(0, 3, 1, 2).contiguous()


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def _reference(width_divisor, seed=0):
  net = ref_lib.FIDInception(width_divisor)
  return ref_lib.randomise(net, seed, _nchw01(_images(4, 96, seed + 100)))


@pytest.mark.parametrize("shape", [(512, 512), (64, 64), (300, 160)])
def test_resize_matches_torch_bilinear(shape):
  """resize_bilinear == F.interpolate(size=299, bilinear, align_corners=False): shrinking
  (no antialiasing), enlarging, and both at once."""
  x = np.random.default_rng(0).normal(size=(2, *shape, 3)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear(jnp.asarray(x), 299))
  want = F.interpolate(_nchw(x), size=(299, 299), mode="bilinear", align_corners=False)
  err = np.max(np.abs(got - want.permute(0, 2, 3, 1).numpy()))
  print(f"\nresize {shape} -> 299: max|d| {err:.2e}")
  assert err < 1e-5


def test_pool_branches_match_torch():
  """FID's patched pool branches: average without the padding, and Mixed_7c's max pool."""
  x = np.random.default_rng(1).normal(size=(2, 8, 7, 5)).astype(np.float32)
  avg = F.avg_pool2d(_nchw(x), 3, stride=1, padding=1, count_include_pad=False)
  mx = F.max_pool2d(_nchw(x), 3, stride=1, padding=1)
  got_avg = np.asarray(inception.avg_pool_3x3_tf(jnp.asarray(x)))
  got_max = np.asarray(inception.max_pool_3x3_s1(jnp.asarray(x)))
  np.testing.assert_allclose(got_avg, avg.permute(0, 2, 3, 1).numpy(), atol=1e-6)
  np.testing.assert_array_equal(got_max, mx.permute(0, 2, 3, 1).numpy())
  # the corner really is divided by 4, not 9
  np.testing.assert_allclose(got_avg[0, 0, 0], x[0, :2, :2].mean(axis=(0, 1)), atol=1e-6)


def _check_network(width_divisor, batch, size, seed, batch_size):
  """The converted reference through metrics.fid.inception_features (batched, last batch
  padded) against the reference's pool_3 and logits; FID of two halves of the features."""
  net = _reference(width_divisor)
  config, params = convert.load(net.state_dict(), source="reference")
  assert config == inception.InceptionConfig(width_divisor=width_divisor)
  x = _images(batch, size, seed)
  pool3, logits = fid.inception_features(params, x, config, batch_size, with_logits=True)
  with torch.no_grad():
    ref_pool3, ref_logits = (t.numpy() for t in net(_nchw01(x)))
  assert pool3.shape == (batch, 2048 // width_divisor) and logits.shape == (batch, 1008)
  d_pool = np.max(np.abs(pool3 - ref_pool3))
  d_logit = np.max(np.abs(logits - ref_logits))
  scale = np.max(np.abs(ref_pool3))
  print(
    f"\nFID inception /{width_divisor} {size}px B={batch}: pool3 max|d| {d_pool:.2e} "
    f"(max |pool3| {scale:.2f}), logits max|d| {d_logit:.2e} (max {np.abs(ref_logits).max():.2f})"
  )
  assert scale > 0.1  # the activations did not die out through the 94 layers
  assert d_pool / scale < 1e-5
  assert d_logit / np.max(np.abs(ref_logits)) < 1e-5
  a, b = pool3[: batch // 2], pool3[batch // 2 :]
  want = fid.frechet_distance(*fid.feature_statistics(a), *fid.feature_statistics(b))
  assert fid.fid_from_features(a, b) == want


def test_narrow_network_matches_reference():
  """Every block type at 1/8 width; five 128-px images (enlarged to 299 by the network)
  in batches of 2."""
  _check_network(8, batch=5, size=128, seed=0, batch_size=2)


@pytest.mark.slow
def test_full_network_matches_reference():
  """The FID network at full width (23.9M parameters), 512-px images shrunk to 299."""
  _check_network(1, batch=4, size=512, seed=1, batch_size=4)


def test_converter_reads_pth_and_names_bad_keys(tmp_path):
  """A torch.save'd .pth loads (config inferred, num_batches_tracked dropped) and round
  trips; a missing, an extra and a mis-shaped key are all named, with the file."""
  sd = _reference(16).state_dict()
  assert any(k.endswith("num_batches_tracked") for k in sd)
  path = tmp_path / "pt_inception-tiny.pth"
  torch.save(sd, path)
  config, params = convert.load(path)
  assert config.width_divisor == 16 and config.num_classes == 1008
  back = convert.flax_to_torch(params)
  want = {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  assert sorted(back) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(back[k], want[k], err_msg=k)

  bad = dict(sd)
  del bad["Mixed_6c.branch7x7_2.bn.running_var"]
  bad["AuxLogits.fc.weight"] = torch.zeros(1008, 48)
  bad["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(12, 64, 1, 1)
  bad_path = tmp_path / "bad.pth"
  torch.save(bad, bad_path)
  with pytest.raises(common.StateDictMismatchError) as e:
    convert.torch_to_flax(bad_path, config)
  msg = str(e.value)
  assert str(bad_path) in msg
  assert "Mixed_6c.branch7x7_2.bn.running_var" in msg
  assert "AuxLogits.fc.weight" in msg
  assert "Mixed_7c.branch_pool.conv.weight: expected (12, 128, 1, 1), got (12, 64, 1, 1)" in msg
  assert "torchvision's ImageNet inception_v3" in "".join(e.value.__notes__)
