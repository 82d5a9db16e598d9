"""IResNet (ArcFace, CurricularFace): Flax port and converter against PyTorch references.

The references are written here from the published layouts (insightface
``arcface_torch/backbones/iresnet.py``; CurricularFace ``backbone/model_irse.py``,
FACTS.md "Face networks"), independently of facediff and of data_pipelines' copies
(which are compared too). No real weights exist offline: every weight, BN running
statistic and PReLU slope is random, so each layer matters.
"""

import copy
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

from facediff.convert import common  # noqa: E402
from facediff.convert import iresnet as convert  # noqa: E402
from facediff.models import iresnet as model_lib  # noqa: E402

WIDTHS = (64, 128, 256, 512)
SMALL = (2, 1, 1, 1)  # every block kind: projected, subsampled and identity shortcuts
# ours vs torch: max abs error / max |torch output|
REL_TOL = 1e-4

# ----------------------------------------------------------------------------- references


class ArcFaceBlock(nn.Module):
  """insightface IBasicBlock: bn1, conv1, bn2, prelu, conv2(stride), bn3 (+ downsample)."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
    self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
    self.prelu = nn.PReLU(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5)
      )

  def forward(self, x):
    out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    return out + (x if self.downsample is None else self.downsample(x))


class ArcFaceIResNet(nn.Module):
  """insightface IResNet: conv1, bn1, prelu, layer1..4 (stride 2 first), bn2, flatten,
  dropout, fc (512*7*7 -> 512), features (BatchNorm1d)."""

  def __init__(self, layers):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
    self.prelu = nn.PReLU(64)
    cin = 64
    for i, (n, cout) in enumerate(zip(layers, WIDTHS, strict=True)):
      stage = [ArcFaceBlock(cin if j == 0 else cout, cout, 2 if j == 0 else 1) for j in range(n)]
      self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
      cin = cout
    self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
    self.dropout = nn.Dropout(0.0)
    self.fc = nn.Linear(512 * 7 * 7, 512)
    self.features = nn.BatchNorm1d(512, eps=1e-5)

  def forward(self, x):
    x = self.prelu(self.bn1(self.conv1(x)))
    for i in range(4):
      x = getattr(self, f"layer{i + 1}")(x)
    x = self.dropout(torch.flatten(self.bn2(x), 1))
    return self.features(self.fc(x))


class IRUnit(nn.Module):
  """CurricularFace bottleneck_IR: res_layer = BN, conv3x3, PReLU, conv3x3(stride), BN;
  shortcut_layer = MaxPool2d(1, stride) if the width is kept, else conv1x1(stride) + BN."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    if cin == cout:
      self.shortcut_layer = nn.MaxPool2d(1, stride)
    else:
      self.shortcut_layer = nn.Sequential(
        nn.Conv2d(cin, cout, (1, 1), stride, bias=False), nn.BatchNorm2d(cout)
      )
    self.res_layer = nn.Sequential(
      nn.BatchNorm2d(cin),
      nn.Conv2d(cin, cout, (3, 3), (1, 1), 1, bias=False),
      nn.PReLU(cout),
      nn.Conv2d(cout, cout, (3, 3), stride, 1, bias=False),
      nn.BatchNorm2d(cout),
    )

  def forward(self, x):
    return self.shortcut_layer(x) + self.res_layer(x)


class IRBackbone(nn.Module):
  """CurricularFace Backbone((112, 112), depth, 'ir'): input_layer, body, output_layer =
  BN2d, Dropout, Flatten, Linear(25088, 512), BatchNorm1d(512, affine=False)."""

  def __init__(self, layers):
    super().__init__()
    self.input_layer = nn.Sequential(
      nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
    )
    units, cin = [], 64
    for n, cout in zip(layers, WIDTHS, strict=True):
      units.append(IRUnit(cin, cout, 2))
      units += [IRUnit(cout, cout, 1) for _ in range(n - 1)]
      cin = cout
    self.body = nn.Sequential(*units)
    self.output_layer = nn.Sequential(
      nn.BatchNorm2d(512),
      nn.Dropout(0.4),
      nn.Flatten(),
      nn.Linear(512 * 7 * 7, 512),
      nn.BatchNorm1d(512, affine=False),
    )

  def forward(self, x):
    return self.output_layer(self.body(self.input_layer(x)))


REFERENCES = {"arcface": ArcFaceIResNet, "curricularface": IRBackbone}


def _randomise(net, seed):
  """Random convs/linears, BN affine params and PReLU slopes (some negative); then BN
  running statistics calibrated on random images (as training leaves them, so that
  activations keep a sane scale at any depth) and perturbed per channel; eval mode."""
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0.0, fan_in**-0.5, generator=g)
        if m.bias is not None:
          m.bias.normal_(0.0, 0.1, generator=g)
      elif isinstance(m, nn.PReLU):
        m.weight.uniform_(-0.2, 0.6, generator=g)
    for m in bns:
      if m.affine:
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0.0, 0.3, generator=g)
      m.reset_running_stats()
      m.momentum = None  # running stats = this batch's statistics
    net.train()
    for m in net.modules():
      if isinstance(m, nn.Dropout):
        m.eval()
    net(_torch_input(torch.from_numpy(_images(4, seed + 100))))
    for m in bns:
      m.momentum = 0.1
      std = m.running_var.sqrt()
      m.running_mean.add_(0.2 * std * torch.randn(std.shape, generator=g))
      m.running_var.mul_(torch.empty_like(std).uniform_(0.6, 1.6, generator=g))
  return net.eval()


def _images(n, seed):
  """Smooth-ish random faces-sized images: a coarse grid upsampled plus pixel noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (n, 14, 14, 3))
  img = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2) + rng.normal(0, 20, (n, 112, 112, 3))
  return np.clip(img, 0, 255).astype(np.float32)


def _torch_input(x):
  """RGB [0, 255] NHWC -> (x / 255 - 0.5) / 0.5, NCHW (FACTS.md "Face networks")."""
  return (x.permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5


def _torch_forward_and_grad(net, images, cotangent):
  """Embeddings and d<emb, cotangent>/d images (raw [0, 255] pixels, NHWC)."""
  x = torch.from_numpy(images.copy()).requires_grad_(True)
  emb = net(_torch_input(x))
  (emb * torch.from_numpy(cotangent)).sum().backward()
  return emb.detach().numpy(), x.grad.numpy()


def _flax_forward_and_grad(config, params, images, cotangent):
  module = model_lib.IResNet(config)

  @jax.jit
  def run(params, x, ct):
    emb, vjp = jax.vjp(lambda x: module.apply({"params": params}, x), x)
    return emb, vjp(ct)[0]

  emb, grad = run(params, jnp.asarray(images), jnp.asarray(cotangent))
  return np.asarray(emb), np.asarray(grad)


def _state_dict(net):
  return {k: v.numpy() for k, v in net.state_dict().items()}


def _rel_err(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _cosines(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _grad_l2(grad, ref):
  return float(np.linalg.norm(grad - ref) / np.linalg.norm(ref))


def _check_parity(config, net, seed, grad_tol, n_images=2):
  """Embeddings: max abs error under REL_TOL of the reference's largest output, cosine
  above 1 - 1e-6 (against torch float32).

  Input gradients are compared with torch float64, by relative L2 error under
  ``grad_tol``. PReLU's kink makes them discontinuous: a pre-activation within float32
  rounding of 0 takes the other slope in one float32 implementation and changes the
  gradient over that unit's receptive field. Seen here: on a (2, 1, 1, 1) net torch
  float32 is 8e-4 off float64 (one flipped unit, one 11x11 patch) while facediff is
  1e-6 off; on r100 facediff has two flipped units among all PReLU inputs and torch
  float32 one (pre-activation errors alike, ~2e-5 of their spread), which puts
  facediff's gradient 1.7e-3 off and torch's 1.6e-4 off. So deep nets get a looser
  bound (1e-2); a real error in the backward pass is of order 1."""
  params = convert.torch_to_flax(_state_dict(net), config)
  images = _images(n_images, seed)
  cotangent = np.random.default_rng(seed + 1).normal(size=(n_images, 512)).astype(np.float32)
  ref, ref_grad = _torch_forward_and_grad(net, images, cotangent)
  net64 = copy.deepcopy(net).double()
  _, grad64 = _torch_forward_and_grad(
    net64, images.astype(np.float64), cotangent.astype(np.float64)
  )
  ours, grad = _flax_forward_and_grad(config, params, images, cotangent)
  err, cos = _rel_err(ours, ref), _cosines(ours, ref)
  torch_err, grad_err = _grad_l2(ref_grad, grad64), _grad_l2(grad, grad64)
  print(
    f"{config.variant} {config.layers}: |ref| max {np.abs(ref).max():.3g}, "
    f"max abs err / max |ref| {err:.2e}, min cosine {cos.min():.8f}; input grad rel L2 vs "
    f"torch float64: ours {grad_err:.2e}, torch float32 {torch_err:.2e}"
  )
  # non-trivial: embeddings of different images differ, gradients are not zero
  assert np.max(np.abs(ref[0] - ref[1])) > 0.1 * np.max(np.abs(ref))
  assert np.abs(ref_grad).max() > 0
  assert err < REL_TOL, err
  assert cos.min() > 1 - 1e-6
  assert grad_err < grad_tol, (grad_err, grad_tol)
  return images, ours


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", ["arcface", "curricularface"])
def test_small_parity_with_torch_reference(variant):
  """Embeddings and input gradients equal the torch reference's (2, 1, 1, 1 blocks)."""
  config, net = _small_net(variant)
  images, ours = _check_parity(config, net, seed=3, grad_tol=1e-3)
  if variant == "arcface":
    # data_pipelines' exporter module reads the same state dict to the same numbers.
    from data_pipelines.encoders import iresnet as dp

    dp_net = dp.IResNet(SMALL)
    dp_net.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
      dp_out = dp_net.eval()(dp.arcface_input(images)).numpy()
    assert _rel_err(ours, dp_out) < REL_TOL


@pytest.mark.slow
@pytest.mark.parametrize(
  "config",
  [
    model_lib.IResNetConfig.arcface_r50(),
    model_lib.IResNetConfig.arcface_r100(),
    model_lib.IResNetConfig.curricularface_ir101(),
  ],
  ids=["arcface_r50", "arcface_r100", "curricularface_ir101"],
)
def test_published_depths_parity(config):
  seed = sum(config.layers)
  net = _randomise(REFERENCES[config.variant](config.layers), seed)
  images, ours = _check_parity(config, net, seed, grad_tol=1e-2)
  from data_pipelines.encoders import iresnet as dp

  if config.variant == "arcface":
    dp_net = dp.IResNet(config.layers)
  else:
    dp_net = dp.IRBackbone(100)
  dp_net.load_state_dict(net.state_dict(), strict=True)
  with torch.no_grad():
    dp_out = dp_net.eval()(dp.arcface_input(images)).numpy()
  assert _rel_err(ours, dp_out) < REL_TOL


@pytest.mark.parametrize(
  "config",
  [
    model_lib.IResNetConfig.arcface_r50(),
    model_lib.IResNetConfig.arcface_r100(),
    model_lib.IResNetConfig.curricularface_ir101(),
  ],
  ids=["arcface_r50", "arcface_r100", "curricularface_ir101"],
)
def test_published_layouts(config):
  """The converter expects exactly the reference's keys and shapes at full depth (no
  weights are allocated); the parameter counts agree; the config is recovered."""
  with torch.device("meta"):
    ref = REFERENCES[config.variant](config.layers).state_dict()
  ref = {k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")}
  shapes = {k: tuple(v.shape) for k, v in ref.items()}
  assert convert.expected_torch_shapes(config) == shapes
  # one flax leaf per torch tensor (no two leaves share a key), hence equal counts
  assert len(convert.torch_layout(config)) == len(shapes)
  assert convert.infer_config(ref) == config  # reads shapes only: meta tensors suffice


@functools.cache
def _small_net(variant):
  """The small config and its randomised reference (built once per variant; not to be
  modified)."""
  config = model_lib.IResNetConfig(layers=SMALL, variant=variant)
  return config, _randomise(REFERENCES[variant](SMALL), seed=1 if variant == "arcface" else 2)


def _small_checkpoint(variant):
  config, net = _small_net(variant)
  return config, dict(net.state_dict())


def test_checkpoint_forms_and_round_trip(tmp_path):
  """A .pth path, a DataParallel ``module.`` prefix in a ``{"state_dict": ...}`` wrapper
  and a dict of tensors give the same params; num_batches_tracked is ignored; ``load``
  infers the config; flax_to_torch gives the state dict back."""
  config, state = _small_checkpoint("curricularface")
  assert any(k.endswith("num_batches_tracked") for k in state)
  path = tmp_path / "CurricularFace_Backbone.pth"
  torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
  from_dict = convert.torch_to_flax(state, config)
  inferred, from_path = convert.load(path)
  assert inferred == config
  flat_a, flat_b = common.flatten_params(from_dict), common.flatten_params(from_path)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k])
  back = convert.flax_to_torch(from_path, config)
  want = {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}
  assert back.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(back[k], want[k])


def test_converter_names_file_and_bad_keys(tmp_path):
  """One error lists the missing, unexpected and mis-shaped torch keys and the file."""
  config, state = _small_checkpoint("arcface")
  state = dict(state)
  del state["layer2.0.downsample.1.running_var"]
  state["layer5.0.conv1.weight"] = torch.zeros(3)
  state["fc.weight"] = torch.zeros(512, 512 * 6 * 6)
  path = tmp_path / "backbone.pth"
  torch.save(state, path)
  with pytest.raises(common.StateDictMismatchError) as info:
    convert.torch_to_flax(str(path), config)
  msg = str(info.value)
  assert str(path) in msg
  assert "1 missing key(s):\n    layer2.0.downsample.1.running_var" in msg
  assert "1 unexpected key(s):\n    layer5.0.conv1.weight" in msg
  assert "fc.weight: expected (512, 25088), got (512, 18432)" in msg
  # a deeper checkpoint than the config: the keys are listed, the note names the depths
  deep_config, deep = _small_checkpoint("arcface")
  deep = {k.replace("layer3.0.", "layer3.1."): v for k, v in deep.items()} | dict(deep)
  with pytest.raises(common.StateDictMismatchError, match="layer3.1.bn1.weight") as info:
    convert.torch_to_flax(deep, deep_config, source="deep.pth")
  assert "deep.pth" in str(info.value)
  assert any("layers=(2, 1, 2, 1)" in note for note in info.value.__notes__)


def test_converter_rejects_other_variant_and_non_checkpoints(tmp_path):
  config, state = _small_checkpoint("curricularface")
  arc = model_lib.IResNetConfig(layers=SMALL, variant="arcface")
  with pytest.raises(ValueError, match="ir.pth: holds a curricularface state dict.*'arcface'"):
    convert.torch_to_flax(state, arc, source="ir.pth")
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    convert.load(tmp_path / "missing.pth")
  with pytest.raises(ValueError, match="x.pth: neither an insightface IResNet"):
    convert.load({"conv.weight": torch.zeros(1)}, source="x.pth")
  with pytest.raises(ValueError, match="layers must be 4 positive"):
    model_lib.IResNetConfig(layers=(3, 4, 14))
  with pytest.raises(ValueError, match=r"expects images of shape \(B, 112, 112, 3\)"):
    model_lib.IResNet(config).init(jax.random.key(0), jnp.zeros((1, 96, 96, 3)))


def test_bfloat16_compute_stays_close():
  """dtype="bfloat16" (params float32, BN in float32) stays close to torch float32."""
  config, net = _small_net("arcface")
  params = convert.torch_to_flax(_state_dict(net), config)
  images = _images(2, 5)
  bf16 = model_lib.IResNetConfig(layers=SMALL, variant="arcface", dtype="bfloat16")
  out16 = jax.jit(model_lib.IResNet(bf16).apply)({"params": params}, jnp.asarray(images))
  with torch.no_grad():
    ref = net(_torch_input(torch.from_numpy(images))).numpy()
  assert out16.dtype == jnp.float32
  cos = _cosines(np.asarray(out16), ref)
  print(f"bfloat16 vs torch float32 cosine: {cos}")
  assert cos.min() > 0.99
