"""Flax InceptionResnetV1 and DLN against the PyTorch originals on random weights.

References: facenet-pytorch's own ``models/inception_resnet_v1.py``, loaded by path
(``data_pipelines.encoders.facenet.facenet_module``: the package import needs
torchvision), and the DLN module of ``data_pipelines/encoders/dln.py`` built on it.
Random weights with BatchNorm statistics set from a calibration batch and then
perturbed, so every layer's statistics matter and activations stay O(1).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from data_pipelines.encoders import dln as torch_dln  # noqa: E402
from data_pipelines.encoders import facenet as torch_facenet  # noqa: E402
from facediff.convert import common  # noqa: E402
from facediff.convert import facenet as convert  # noqa: E402
from facediff.models import dln, facenet  # noqa: E402

SMALL = (1, 1, 1)  # one Block35 / Block17 / Block8: every block type, fewer layers
REL = 1e-4


def _truncate(net, repeats):
  """A reference InceptionResnetV1 keeping the first ``repeats`` units of each repeat_*."""
  for i, n in enumerate(repeats, start=1):
    name = f"repeat_{i}"
    setattr(net, name, torch.nn.Sequential(*list(getattr(net, name))[:n]))
  return net


def _reference_facenet(repeats=(5, 10, 5)):
  mod = torch_facenet.facenet_module()  # facenet-pytorch's file, loaded by path
  return _truncate(mod.InceptionResnetV1(pretrained=None, classify=False), repeats)


def _images(batch, seed, size=160):
  """Blocky random RGB images with noise in [0, 255], (B, size, size, 3) float32."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (batch, size // 8, size // 8, 3))
  img = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
  return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _randomise(net, seed):
  """Random conv/linear weights, BatchNorm stats from a calibration batch then
  perturbed, random BN affines and conv biases. Returns the net in eval mode."""
  g = torch.Generator().manual_seed(seed)
  torch.manual_seed(seed)
  for m in net.modules():
    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
      m.reset_parameters()
  bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  for m in bns:
    m.reset_running_stats()
    m.momentum = 1.0  # running stats := this batch's stats
  net.train()
  with torch.no_grad():
    calib = (_nchw(_images(4, seed + 100)) - 127.5) / 128.0
    net(calib)
    for m in bns:
      c = m.num_features
      m.momentum = 0.1
      m.running_mean.add_(0.1 * torch.randn(c, generator=g) * m.running_var.sqrt())
      m.running_var.mul_(0.7 + 0.6 * torch.rand(c, generator=g))
      m.weight.copy_(0.5 + torch.rand(c, generator=g))
      m.bias.copy_(0.1 * torch.randn(c, generator=g))
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
        m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
  return net.eval()


@functools.lru_cache(maxsize=None)
def _facenet_fn(config, with_grad):
  """jit((params, images, w) -> (embedding, last_bn output, d <w, embedding> / d images
  or None)) of the Flax InceptionResnetV1: forward and input gradient in one program."""
  model = facenet.InceptionResnetV1(config)

  def forward(params, x):
    out, state = model.apply(
      {"params": params},
      x,
      capture_intermediates=lambda mdl, _: mdl.name == "last_bn",
      mutable=["intermediates"],
    )
    return out, state["intermediates"]["last_bn"]["__call__"][0]

  def fn(params, x, w):
    if not with_grad:
      return (*forward(params, x), None)
    (out, pre), vjp = jax.vjp(lambda img: forward(params, img), x)
    (grad,) = vjp((w, jnp.zeros_like(pre)))
    return out, pre, grad

  return jax.jit(fn)


def _torch_facenet(net, x, w=None):
  """Reference embedding, its last_bn output (before L2 normalisation) and, given ``w``,
  the input gradient of <w, embedding>."""
  seen = {}
  hook = net.last_bn.register_forward_hook(lambda m, i, o: seen.setdefault("pre", o))
  xt = _nchw(x).requires_grad_(w is not None)
  try:
    with torch.set_grad_enabled(w is not None):
      out = net((xt - 127.5) / 128.0)
  finally:
    hook.remove()
  grad = None
  if w is not None:
    (out * torch.from_numpy(w)).sum().backward()
    grad = xt.grad.permute(0, 2, 3, 1).numpy()
  return out.detach().numpy(), seen["pre"].detach().numpy(), grad


def _max_rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _cosine(a, b):
  a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _check_gradient_float32(grad, ref):
  """Input gradients of a ReLU network in float32, torch vs Flax.

  The gradient jumps where a pre-activation crosses zero, and float32 rounding (which
  differs between XLA's fused program and torch) can leave a pre-activation within
  ~1e-6 of zero on either side: the flipped unit then changes the gradient around its
  pixel by up to ~1% of the gradient's maximum (seen on 2 of 6 random nets with one block
  of each type). So beyond the cosine, most entries must match to 1e-4, all to 2e-2.
  """
  err = np.abs(grad - ref) / np.abs(ref).max()
  print(
    f"  input grad: max rel {err.max():.2e}, entries over {REL:.0e}: {np.mean(err > REL):.4f}, "
    f"cos {_cosine(grad, ref).min():.8f}"
  )
  assert np.abs(ref).max() > 0
  assert _cosine(grad, ref).min() > 1 - 1e-4
  assert np.mean(err > REL) < 0.1
  assert err.max() < 2e-2


def _check_facenet(repeats, batch, seed, with_grad):
  net = _randomise(_reference_facenet(repeats), seed)
  config = facenet.FaceNetConfig(repeats=repeats)
  params = convert.facenet_from_torch(net.state_dict(), config)
  x = _images(batch, seed)
  w = np.random.default_rng(seed).normal(size=(batch, 512)).astype(np.float32)
  out, pre, grad = _facenet_fn(config, with_grad)(params, jnp.asarray(x), w)
  out, pre = np.asarray(out), np.asarray(pre)
  ref, ref_pre, ref_grad = _torch_facenet(net, x, w if with_grad else None)
  assert out.shape == (batch, 512)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
  print(
    f"\nfacenet {repeats} B={batch}: max|d| {np.max(np.abs(out - ref)):.2e}, "
    f"rel {_max_rel(out, ref):.2e}, pre-norm rel {_max_rel(pre, ref_pre):.2e}, "
    f"cos {_cosine(out, ref).min():.8f}"
  )
  assert _max_rel(pre, ref_pre) < REL
  assert _max_rel(out, ref) < REL
  assert _cosine(out, ref).min() > 1 - 1e-6
  if with_grad:
    _check_gradient_float32(np.asarray(grad), ref_grad)


def test_facenet_full_network_matches_facenet_pytorch():
  """The released architecture (5/10/5 blocks), 160 px, batch 1: the embedding and the
  last_bn output (before L2 normalisation), float32, one jit."""
  _check_facenet((5, 10, 5), batch=1, seed=0, with_grad=False)


def _check_gradient_float64(repeats, batch, seed, size):
  """Embedding and d <w, embedding> / d image in float64 on both sides, where no ReLU
  kink flips (see _check_gradient_float32): they must agree to rounding."""
  net = _randomise(_reference_facenet(repeats), seed).double()
  x = _images(batch, seed, size).astype(np.float64)
  w = np.random.default_rng(seed).normal(size=(batch, 512))
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
  ref_out = net((xt - 127.5) / 128.0)
  (ref_out * torch.from_numpy(w)).sum().backward()
  ref = xt.grad.permute(0, 2, 3, 1).numpy()
  ref_out = ref_out.detach().numpy()
  with jax.enable_x64(True):
    config = facenet.FaceNetConfig(repeats=repeats, dtype="float64")
    params = jax.tree.map(
      lambda a: np.asarray(a, np.float64), convert.facenet_from_torch(net.state_dict(), config)
    )
    model = facenet.InceptionResnetV1(config)

    def objective(p, img, weights):
      out = model.apply({"params": p}, img)
      return jnp.sum(out * weights), out

    (_, out), grad = jax.jit(jax.value_and_grad(objective, argnums=1, has_aux=True))(
      params, jnp.asarray(x), jnp.asarray(w)
    )
    out, grad = np.asarray(out), np.asarray(grad)
  assert out.dtype == grad.dtype == np.float64
  print(
    f"\nfloat64 {repeats} {size} px B={batch}: embedding max|d| "
    f"{np.max(np.abs(out - ref_out)):.2e}, input grad max rel {_max_rel(grad, ref):.2e}, "
    f"cos {_cosine(grad, ref).min():.12f}"
  )
  assert np.abs(ref).max() > 0
  assert np.max(np.abs(out - ref_out)) < 1e-10
  assert _max_rel(grad, ref) < 1e-9


def test_facenet_input_gradient_float64_matches_torch():
  """The input gradient (for identity losses): one block of each type, batch 2, at
  112 px (Block8 then runs at 2x2), which keeps the float64 convolutions quick."""
  _check_gradient_float64(SMALL, batch=2, seed=1, size=112)


@pytest.mark.slow
def test_facenet_full_network_batch4():
  _check_facenet((5, 10, 5), batch=4, seed=3, with_grad=False)


@pytest.mark.slow
def test_facenet_full_network_input_gradient_float64():
  _check_gradient_float64((5, 10, 5), batch=1, seed=2, size=160)


@pytest.mark.slow
def test_facenet_float32_input_gradients_agree_up_to_relu_kinks():
  """One block of each type, six random nets, float32 gradients (kinks show up here)."""
  for seed in range(6):
    _check_facenet(SMALL, batch=2, seed=seed, with_grad=True)


def _check_dln(repeats, batch, seed):
  net = torch_dln.DLN()
  _truncate(net.face, repeats)
  _truncate(net.id, repeats)
  _randomise(net, seed)
  config = dln.DLNConfig(branch=facenet.FaceNetConfig(repeats=repeats))
  params = convert.dln_from_torch(net.state_dict(), config)
  x = _images(batch, seed)
  out = np.asarray(jax.jit(dln.DLN(config).apply)({"params": params}, jnp.asarray(x)))
  with torch.no_grad():
    ref = net((_nchw(x) - 127.5) / 128.0).numpy()
  assert out.shape == (batch, dln.DLN_DIM)
  print(
    f"\ndln {repeats} B={batch}: max|d| {np.max(np.abs(out - ref)):.2e}, "
    f"rel {_max_rel(out, ref):.2e}, cos {_cosine(out, ref).min():.8f}"
  )
  assert _max_rel(out, ref) < REL
  return net, params, x


def test_dln_matches_torch_dln():
  """DLN = proj(concat[d, d*d]), d = face(x) - id(x): one block of each type, batch 2."""
  net, params, _ = _check_dln(SMALL, batch=2, seed=4)
  # the converter put the torch projection where the Flax module reads it
  np.testing.assert_array_equal(params["proj"]["kernel"], net.proj.weight.detach().numpy().T)


@pytest.mark.slow
def test_dln_full_network_matches_torch_dln():
  _check_dln((5, 10, 5), batch=2, seed=5)


def test_params_carry_logical_axes_and_shard():
  """Every parameter names its axes (conv_*, mlp/embed, norm), so the partitioning rules
  place it: the 1792 -> 512 projection splits over fsdp, BatchNorm vectors replicate."""
  from facediff import partitioning

  abstract = dln.abstract_params(dln.DLNConfig(branch=facenet.FaceNetConfig(repeats=SMALL)))
  leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == len(x.value.shape) for x in leaves)
  mesh = partitioning.make_mesh({"data": 1, "fsdp": -1})
  specs = partitioning.param_specs(abstract, mesh)
  head = specs["face"]["last_linear"]["kernel"]
  assert head == jax.sharding.PartitionSpec("fsdp", None)  # (1792 'mlp', 512 'embed')
  assert specs["id"]["conv2d_1a"]["bn"]["var"] == jax.sharding.PartitionSpec(None)
  assert specs["proj"]["kernel"] == jax.sharding.PartitionSpec("fsdp", None)


# ----------------------------------------------------------------------------- converter


def test_converter_reads_released_layout_from_file_and_round_trips(tmp_path):
  """A file as facenet-pytorch releases it (classifier ``logits.*``, DataParallel
  prefix, ``num_batches_tracked``) converts; params_to_torch inverts it exactly and
  loads strictly into the reference module."""
  net = _reference_facenet(SMALL)
  for p in net.parameters():
    torch.nn.init.normal_(p)
  sd = {f"module.{k}": v for k, v in net.state_dict().items()}
  sd["module.logits.weight"] = torch.zeros(10, 512)
  sd["module.logits.bias"] = torch.zeros(10)
  path = tmp_path / "20180402-114759-vggface2.pt"
  torch.save(sd, path)
  config = facenet.FaceNetConfig(repeats=SMALL)
  params = convert.facenet_from_torch(path, config)
  assert np.asarray(params["conv2d_1a"]["conv"]["kernel"]).shape == (3, 3, 3, 32)
  np.testing.assert_array_equal(
    params["repeat_2_0"]["branch1_1"]["conv"]["kernel"][0, :, :, :],
    net.repeat_2[0].branch1[1].conv.weight.detach().numpy()[:, :, 0, :].transpose(2, 1, 0),
  )
  back = convert.params_to_torch(params)
  fresh = _reference_facenet(SMALL)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  for k, v in net.state_dict().items():
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  again = convert.facenet_from_torch(back, config)
  flat, flat_again = common.flatten_params(params), common.flatten_params(again)
  assert flat.keys() == flat_again.keys()
  for k in flat:
    np.testing.assert_array_equal(flat[k], flat_again[k])


def test_converter_errors_name_file_and_keys(tmp_path):
  config = facenet.FaceNetConfig(repeats=SMALL)
  sd = {k: v.clone() for k, v in _reference_facenet(SMALL).state_dict().items()}
  del sd["block8.conv2d.bias"]
  sd["repeat_1.1.conv2d.weight"] = torch.zeros(256, 96, 1, 1)  # a Block35 the config lacks
  sd["last_linear.weight"] = torch.zeros(512, 1000)
  path = tmp_path / "bad_facenet.pt"
  torch.save(sd, path)
  with pytest.raises(common.StateDictMismatchError) as err:
    convert.facenet_from_torch(path, config)
  msg = str(err.value)
  assert str(path) in msg
  assert err.value.missing == ["block8.conv2d.bias"]
  assert err.value.unexpected == ["repeat_1.1.conv2d.weight"]
  assert err.value.mismatched == [("last_linear.weight", (512, 1792), (512, 1000))]
  assert "last_linear.weight: expected (512, 1792), got (512, 1000)" in msg

  # a plain InceptionResnetV1 file given as a DLN checkpoint
  with pytest.raises(common.StateDictMismatchError, match="my_dln.pt") as err:
    convert.dln_from_torch(
      {k: v for k, v in sd.items() if k != "last_linear.weight"},
      dln.DLNConfig(branch=config),
      source="my_dln.pt",
    )
  assert "proj.weight" in err.value.missing and "face.block8.conv2d.bias" in err.value.missing
  assert "conv2d_1a.conv.weight" in err.value.unexpected
