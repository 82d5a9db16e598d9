"""LPIPS-VGG: parity with the LPIPS formula written out in PyTorch on a torchvision-layout
VGG16 (random weights, built here) with the REAL lpips v0.1 linear heads; converter."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from facediff.convert import common  # noqa: E402
from facediff.convert import lpips as lpips_convert  # noqa: E402
from facediff.losses.lpips import lpips_loss  # noqa: E402
from facediff.models import lpips as lpips_model  # noqa: E402
from facediff.models import vgg16 as vgg16_model  # noqa: E402

# VGG16 = configuration "D" of Simonyan & Zisserman; "M" = 2x2 max-pool.
_VGG16_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAPS = (3, 8, 15, 22, 29)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_CHANNELS = (64, 128, 256, 512, 512)


class _TorchVGG16(torch.nn.Module):
  """torchvision's ``vgg16().features`` layout: conv3x3(pad 1) + ReLU, max-pools."""

  def __init__(self):
    super().__init__()
    mods, c = [], 3
    for v in _VGG16_D:
      if v == "M":
        mods.append(torch.nn.MaxPool2d(2, 2))
      else:
        mods += [torch.nn.Conv2d(c, v, 3, padding=1), torch.nn.ReLU()]
        c = v
    self.features = torch.nn.Sequential(*mods)


def _heads_path():
  spec = importlib.util.find_spec("lpips")
  if spec is None:
    pytest.skip("lpips package (for its linear heads) not installed")
  return os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "vgg.pth")


def _torch_features(vgg, z):
  """The five tapped ReLU maps of the torch trunk, on the lpips-scaled input."""
  shift = torch.tensor(_SHIFT, dtype=z.dtype).view(1, 3, 1, 1)
  scale = torch.tensor(_SCALE, dtype=z.dtype).view(1, 3, 1, 1)
  z = (z - shift) / scale
  out = []
  for i, layer in enumerate(vgg.features):
    z = layer(z)
    if i in _TAPS:
      out.append(z)
    if i == _TAPS[-1]:
      break
  return out


def _torch_lpips(vgg, heads, x, y):
  """LPIPS v0.1 step by step: unit-normalise channels (eps 1e-10), squared difference,
  1x1 conv with the head, spatial mean, sum over layers -> (distance (B,), spatial map
  (B, H, W) from each layer's map upsampled bilinearly, x's features)."""
  fx, fy = _torch_features(vgg, x), _torch_features(vgg, y)
  dist, dist_map = 0, 0
  for f0, f1, w in zip(fx, fy, heads, strict=True):
    n0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
    n1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
    m = torch.nn.functional.conv2d((n0 - n1) ** 2, w.to(x.dtype))
    dist = dist + m.mean(dim=(2, 3))[:, 0]
    up = torch.nn.functional.interpolate(m, size=x.shape[2:], mode="bilinear", align_corners=False)
    dist_map = dist_map + up[:, 0]
  return dist, dist_map, fx


@pytest.fixture(scope="module")
def setup():
  torch.manual_seed(0)
  vgg = _TorchVGG16().eval().requires_grad_(False)  # frozen: gradients for the images only
  with torch.no_grad():  # He init keeps activations O(1) through 13 layers
    for m in vgg.features:
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        m.bias.normal_(0.0, 0.1)
  heads_sd = torch.load(_heads_path(), map_location="cpu", weights_only=True)
  heads = [heads_sd[f"lin{i}.model.1.weight"] for i in range(5)]
  vgg_sd = {k: v.numpy().copy() for k, v in vgg.state_dict().items()}
  params = lpips_convert.load_params(vgg_sd)  # heads: the packaged file
  return vgg.double(), heads, vgg_sd, params  # float64 reference


def _pairs(shape, seed):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  y = rng.uniform(-1, 1, shape).astype(np.float32)
  # a near pair too: small distances are the hard case for relative accuracy
  y[-1] = np.clip(x[-1] + 0.05 * rng.normal(size=shape[1:]), -1, 1)
  return x, y


def _nchw(a, dtype=torch.float64):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))).to(dtype)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(b), 1e-12)))


def test_real_heads_load(setup):
  _, heads, _, params = setup
  for i, c in enumerate(_CHANNELS):
    k = np.asarray(params[f"lin{i}"]["kernel"])
    assert k.shape == (1, 1, c, 1)
    np.testing.assert_array_equal(k[0, 0, :, 0], heads[i].numpy()[0, :, 0, 0])
    assert k.min() >= 0  # the released heads are non-negative


@pytest.fixture(scope="module")
def forward(setup):
  """One compiled program at 40 x 56 (pooling floors 5 -> 2 and 7 -> 3; upsampling 3 -> 56
  has a non-integer ratio) on an identical, a random and a near pair: features, distance,
  map, loss and the loss's gradients; and the same from the float64 torch reference."""
  vgg, heads, _, params = setup
  cfg = lpips_model.LPIPSConfig()
  x, y = _pairs((3, 40, 56, 3), seed=1)
  y[0] = x[0]

  def run(p, a, b):
    scaled = lpips_model.scale_input(a, cfg.shift, cfg.scale)
    feats = vgg16_model.VGG16Features(cfg.vgg).apply({"params": p["vgg"]}, scaled)
    dist = lpips_model.apply_lpips(cfg, p, a, b)
    dist_map = lpips_model.apply_lpips(cfg, p, a, b, spatial=True)
    loss, grads = jax.value_and_grad(lpips_loss, argnums=(0, 1, 2))(p, a, b)
    return feats, dist, dist_map, loss, grads

  got = jax.jit(run)(params, x, y)
  tx = _nchw(x).requires_grad_(True)
  ty = _nchw(y).requires_grad_(True)
  dist, dist_map, feats = _torch_lpips(vgg, heads, tx, ty)
  dist.mean().backward()
  ref = (
    [np.transpose(f.detach().numpy(), (0, 2, 3, 1)) for f in feats],
    dist.detach().numpy(),
    dist_map.detach().numpy(),
    [np.transpose(t.grad.numpy(), (0, 2, 3, 1)) for t in (tx, ty)],
  )
  return got, ref


def test_vgg16_features_match_torch(forward):
  (feats, *_), (ref_feats, *_) = forward
  assert len(feats) == 5
  for f, r, c in zip(feats, ref_feats, _CHANNELS, strict=True):
    assert f.shape == r.shape and f.shape[-1] == c
    assert np.max(np.abs(np.asarray(f) - r)) <= 1e-5 * np.max(np.abs(r))


def test_distance_matches_torch(forward):
  (_, dist, _, loss, _), (_, ref, *_) = forward
  assert dist.shape == (3,) and dist.dtype == jnp.float32
  assert np.all(ref[1:] > 0)
  assert _rel(dist[1:], ref[1:]) < 1e-5, (np.asarray(dist), ref)
  np.testing.assert_allclose(float(loss), ref.mean(), rtol=1e-5)


def test_identical_images_give_zero(forward):
  # zero up to float32 rounding (XLA's vectorised channel sums need not round every
  # pixel alike); the other pairs' distances are ~1e-2 .. 1
  (_, dist, dist_map, *_), (_, ref, *_) = forward
  assert ref[0] == 0.0
  assert abs(float(dist[0])) < 1e-12
  assert float(jnp.max(jnp.abs(dist_map[0]))) < 1e-12


def test_spatial_map_matches_torch(forward):
  (_, _, dist_map, *_), (_, _, ref_map, *_) = forward
  assert dist_map.shape == (3, 40, 56)
  assert np.max(np.abs(np.asarray(dist_map) - ref_map)) <= 1e-5 * np.max(ref_map)


def _cos(a, b):
  return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_gradients_match_torch_and_weights_are_frozen(forward):
  # Against float64 torch. Any float32 implementation has a few ReLU / max-pool decisions
  # flip under rounding, which moves the gradient of a patch of pixels (torch's own
  # float32 gradient showed cosine 0.999995 on one such pair): hence cosine and
  # relative L2 error, not an element-wise bound.
  (*_, (gp, gx, gy)), (*_, ref_grads) = forward
  for g, r in zip((gx, gy), ref_grads, strict=True):
    g = np.asarray(g)
    assert _cos(g, r) > 1 - 2e-5
    assert np.linalg.norm(g - r) <= 1e-2 * np.linalg.norm(r)
    assert np.max(np.abs(g[0])) < 1e-10  # identical pair: gradient 0 up to rounding
  assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(gp))


def test_converter_accepts_torchvision_and_lpips_layouts(setup, tmp_path):
  _, _, vgg_sd, params = setup
  # a full torchvision checkpoint also holds the classifier: ignored
  full = dict(vgg_sd, **{"classifier.0.weight": np.zeros((4, 8), np.float32)})
  path = tmp_path / "vgg16.pth"
  torch.save({k: torch.from_numpy(v) for k, v in full.items()}, path)
  from_file = lpips_convert.load_params(path, lpips_convert.default_heads_path())
  # a saved lpips LPIPS module: net.slice<k>.<index> for the trunk, lin<l> and buffers
  slices = {3: 1, 8: 2, 15: 3, 22: 4, 29: 5}
  lp = {}
  for k, v in vgg_sd.items():
    idx = int(k.split(".")[1])
    lp[f"net.slice{next(s for t, s in slices.items() if idx <= t)}.{idx}.{k.split('.')[2]}"] = v
  heads = torch.load(_heads_path(), map_location="cpu", weights_only=True)
  lp.update({k: v.numpy() for k, v in heads.items()})
  lp["lin2.model.0.weight"] = lp.pop("lin2.model.1.weight")  # saved without dropout
  lp["scaling_layer.shift"] = np.asarray(_SHIFT, np.float32).reshape(1, 3, 1, 1)
  from_lpips = lpips_convert.load_params(lp, lp)
  want = common.flatten_params(params)
  for got in (from_file, from_lpips):
    flat = common.flatten_params(got)
    assert flat.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(flat[k], want[k])


def test_converter_errors_name_file_and_keys(setup, tmp_path):
  _, _, vgg_sd, _ = setup
  bad = dict(vgg_sd)
  del bad["features.28.bias"]
  bad["features.1.weight"] = np.zeros((64,), np.float32)
  bad["features.0.weight"] = np.zeros((64, 1, 3, 3), np.float32)
  path = tmp_path / "broken_vgg16.pth"
  torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, path)
  with pytest.raises(common.StateDictMismatchError) as e:
    lpips_convert.load_params(path)
  msg = str(e.value)
  assert str(path) in msg
  assert e.value.missing == ["features.28.bias"]
  assert e.value.unexpected == ["features.1.weight"]
  assert e.value.mismatched == [("features.0.weight", (64, 3, 3, 3), (64, 1, 3, 3))]
  for key in ("features.28.bias", "features.1.weight", "features.0.weight"):
    assert key in msg

  heads = torch.load(_heads_path(), map_location="cpu", weights_only=True)
  del heads["lin4.model.1.weight"]
  with pytest.raises(common.StateDictMismatchError, match="lin4.model.1.weight") as e:
    lpips_convert.load_params(vgg_sd, heads)
  assert "<lpips heads state dict>" in str(e.value)

  with pytest.raises(FileNotFoundError, match="no_such_vgg16.pth"):
    lpips_convert.load_params(tmp_path / "no_such_vgg16.pth")


def test_bad_inputs_raise():
  cfg = lpips_model.LPIPSConfig()
  params = lpips_model.abstract_params(cfg)
  with pytest.raises(ValueError, match="same shape"):
    jax.eval_shape(
      lambda p: lpips_model.apply_lpips(
        cfg, p, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 16, 3))
      ),
      params,
    )
  with pytest.raises(ValueError, match="H, W >= 16"):
    jax.eval_shape(
      lambda p: lpips_model.apply_lpips(cfg, p, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3))),
      params,
    )
