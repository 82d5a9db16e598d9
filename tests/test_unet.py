"""facediff UNet vs diffusers' PyTorch UNet2DConditionModel (tiny random models, float32)."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from facediff.convert import common  # noqa: E402
from facediff.convert import unet as unet_convert  # noqa: E402
from facediff.models import unet as unet_model  # noqa: E402

# Two diffusers configs: A = DiffSFSR-like 9 input channels, cross dim 32, 2 levels;
# B = 3 levels, per-block layers / heads / transformer layers, linear projections,
# sin/cos order and freq shift changed, an odd latent size (forces upsample sizes).
CONFIG_A = dict(
  sample_size=16,
  in_channels=9,
  out_channels=4,
  block_out_channels=(32, 64),
  layers_per_block=1,
  attention_head_dim=2,
  cross_attention_dim=32,
  norm_num_groups=8,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
CONFIG_B = dict(
  sample_size=10,
  in_channels=4,
  out_channels=3,
  block_out_channels=(16, 32, 32),
  layers_per_block=(2, 1, 1),
  attention_head_dim=(2, 4, 4),
  cross_attention_dim=24,
  norm_num_groups=8,
  transformer_layers_per_block=(2, 1, 1),
  use_linear_projection=True,
  flip_sin_to_cos=False,
  freq_shift=1,
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def _torch_unet(cfg, seed=0):
  torch.manual_seed(seed)
  m = diffusers.UNet2DConditionModel(**cfg).eval()
  with torch.no_grad():  # move every weight (norms, zero biases) off its init value
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return m


def _inputs(cfg, batch=2, length=7, seed=1):
  g = torch.Generator().manual_seed(seed)
  s = cfg["sample_size"]
  x = torch.randn(batch, cfg["in_channels"], s, s, generator=g)
  t = torch.tensor([3, 901][:batch] + [500] * max(0, batch - 2))
  ctx = torch.randn(batch, length, cfg["cross_attention_dim"], generator=g)
  return x, t, ctx


def _torch_out(m, x, t, ctx):
  with torch.no_grad():
    return m(x, t, ctx).sample.numpy()


@functools.lru_cache(maxsize=None)
def _jitted_apply(config):
  # one compiled function per config, shared by the tests (compiles dominate their time)
  return jax.jit(functools.partial(unet_model.apply_unet, config, layout="NCHW"))


def _flax_out(config, params, x, t, ctx):
  fn = _jitted_apply(config)
  return np.asarray(fn(params, x.numpy(), jnp.asarray(t.numpy(), jnp.int32), ctx.numpy()))


def _converted(m):
  config = unet_convert.config_from_diffusers(dict(m.config))
  return config, unet_convert.convert_unet_state_dict(
    {k: v.numpy() for k, v in m.state_dict().items()}, config
  )


def test_parity_config_a_via_pipeline_folder(tmp_path):
  m = _torch_unet(CONFIG_A)
  m.save_pretrained(tmp_path / "unet")  # pipeline layout: <root>/unet/
  config, params = unet_convert.load_unet(tmp_path)
  assert config.in_channels == 9 and config.cross_attention_dim == 32
  x, t, ctx = _inputs(CONFIG_A)
  ref = _torch_out(m, x, t, ctx)
  np.testing.assert_allclose(_flax_out(config, params, x, t, ctx), ref, atol=1e-4, rtol=1e-4)


def test_parity_config_b_bin_weights_nhwc(tmp_path):
  m = _torch_unet(CONFIG_B, seed=3)
  m.save_pretrained(tmp_path, safe_serialization=False)  # diffusion_pytorch_model.bin
  assert os.path.isfile(tmp_path / "diffusion_pytorch_model.bin")
  config, params = unet_convert.load_unet(tmp_path)
  assert config.use_linear_projection and config.transformer_layers_list() == (2, 1, 1)
  x, t, ctx = _inputs(CONFIG_B, batch=3, length=5)
  ref = _torch_out(m, x, t, ctx)
  # NHWC path directly through the module
  out = jax.jit(unet_model.UNet2DConditionModel(config).apply)(
    {"params": params}, jnp.asarray(x.numpy()).transpose(0, 2, 3, 1), t.numpy(), ctx.numpy()
  )
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=1e-4)


def test_scalar_timestep_broadcasts():
  m = _torch_unet(CONFIG_A)
  config, params = _converted(m)
  x, _, ctx = _inputs(CONFIG_A)
  with torch.no_grad():
    ref = m(x, 250, ctx).sample.numpy()
  out = _jitted_apply(config)(params, x.numpy(), jnp.int32(250), ctx.numpy())
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def test_export_round_trip(tmp_path):
  config, params = _converted(_torch_unet(CONFIG_A, seed=5))
  # Move every facediff param (norms, biases included) so that the exported model is not
  # the one we started from, and a transposed or misplaced tensor would show.
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  params_plain = jax.tree.unflatten(
    tree, [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
  )
  folder = unet_convert.save_unet_pretrained(params_plain, config, tmp_path / "exported")
  with open(os.path.join(folder, "config.json")) as f:
    assert json.load(f)["_class_name"] == "UNet2DConditionModel"
  m = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
  # every diffusers key exists with the right shape (from_pretrained would warn otherwise)
  sd = {k: v.numpy() for k, v in m.state_dict().items()}
  exported = unet_convert.unet_params_to_diffusers(params_plain)
  assert sorted(sd) == sorted(exported)
  x, t, ctx = _inputs(CONFIG_A)
  ref = _torch_out(m, x, t, ctx)
  np.testing.assert_allclose(_flax_out(config, params_plain, x, t, ctx), ref, atol=1e-4, rtol=1e-4)
  # and back again
  config2, params2 = unet_convert.load_unet(folder)
  assert config2 == config
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params_plain), strict=True):
    np.testing.assert_array_equal(a, b)


def test_widen_conv_in_keeps_output():
  cfg4 = dict(CONFIG_A, in_channels=4)
  m = _torch_unet(cfg4)
  config, params = _converted(m)
  wide_cfg, wide = unet_convert.widen_conv_in(params, config, 9)
  assert wide_cfg.in_channels == 9
  k = np.asarray(wide["conv_in"]["kernel"])
  assert k.shape == (3, 3, 9, 32)
  np.testing.assert_array_equal(k[:, :, 4:, :], 0.0)
  np.testing.assert_array_equal(k[:, :, :4, :], params["conv_in"]["kernel"])
  x, t, ctx = _inputs(cfg4)
  ref = _torch_out(m, x, t, ctx)
  for extra in (torch.zeros(2, 5, 16, 16), torch.randn(2, 5, 16, 16)):
    out = _flax_out(wide_cfg, wide, torch.cat([x, extra], 1), t, ctx)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="narrow"):
    unet_convert.widen_conv_in(params, config, 3)


def test_corrupted_state_dict_lists_every_problem(tmp_path):
  m = _torch_unet(CONFIG_A)
  sd = {k: v.numpy() for k, v in m.state_dict().items()}
  del sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
  del sd["mid_block.resnets.1.norm2.bias"]
  sd["up_blocks.1.resnets.0.extra_thing.weight"] = np.zeros((3,), np.float32)
  sd["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
  folder = tmp_path / "unet"
  m.save_pretrained(folder)
  path = folder / "diffusion_pytorch_model.safetensors"
  common.write_safetensors(sd, path)
  with pytest.raises(common.StateDictMismatchError) as e:
    unet_convert.load_unet(folder)
  msg = str(e.value)
  assert str(path) in msg
  assert "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel" in msg
  assert "mid_block/resnets_1/norm2/bias" in msg
  assert "up_blocks_1/resnets_0/extra_thing/scale" in msg
  assert "conv_out/kernel: expected (3, 3, 32, 4), got (1, 1, 32, 4)" in msg
  assert len(e.value.missing) == 2 and len(e.value.unexpected) == 1
  assert len(e.value.mismatched) == 1


def test_unreadable_and_unsupported_inputs(tmp_path):
  bad = tmp_path / "diffusion_pytorch_model.safetensors"
  bad.write_bytes(b"\x00" * 4)
  with pytest.raises(ValueError, match=str(bad)):
    common.read_state_dict(bad)
  with pytest.raises(FileNotFoundError, match="neither"):
    unet_convert.load_unet(tmp_path / "nowhere")
  cfg = dict(diffusers.UNet2DConditionModel(**CONFIG_A).config)
  cfg["class_embed_type"] = "timestep"
  with pytest.raises(ValueError, match="class_embed_type"):
    unet_convert.config_from_diffusers(cfg, source="x/config.json")


def test_sd14_parameter_count():
  abstract = unet_model.abstract_params(unet_model.UNetConfig.sd14())
  assert unet_model.count_params(abstract) == 859_520_964
  wide = unet_model.abstract_params(unet_model.UNetConfig.sd14(in_channels=9))
  assert unet_model.count_params(wide) == 859_520_964 + 5 * 9 * 320  # conv_in widened only
  # the SD-1.4 tree has exactly diffusers' key set
  m = diffusers.UNet2DConditionModel(
    block_out_channels=(32, 64, 64, 64),
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=2,
  )
  ours = common.flatten_params(
    unet_model.abstract_params(
      unet_model.UNetConfig.sd14(
        block_out_channels=(32, 64, 64, 64),
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=2,
      ),
      sample_hw=(16, 16),
    )
  )
  theirs = common.torch_to_flax_generic({k: v.numpy() for k, v in m.state_dict().items()})
  assert sorted(ours) == sorted(theirs)


def test_bfloat16_compute_close_to_float32():
  m = _torch_unet(CONFIG_A)
  config, params = _converted(m)
  x, t, ctx = _inputs(CONFIG_A)
  ref = _torch_out(m, x, t, ctx)
  out = _flax_out(config.replace(dtype="bfloat16"), params, x, t, ctx)
  assert out.dtype == np.float32
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert rel < 0.03, rel


@pytest.mark.slow
def test_sd14_parity_full_size():
  cfg = dict(diffusers.UNet2DConditionModel().config)
  cfg.update(sample_size=32, cross_attention_dim=768)
  m = _torch_unet({k: v for k, v in cfg.items() if not k.startswith("_")})
  config = unet_convert.config_from_diffusers(dict(m.config))
  state = {k: v.numpy() for k, v in m.state_dict().items()}
  params = unet_convert.convert_unet_state_dict(state, config)
  x, t, ctx = _inputs(
    dict(sample_size=32, in_channels=4, cross_attention_dim=768), batch=1, length=77
  )
  ref = _torch_out(m, x, t, ctx)
  np.testing.assert_allclose(_flax_out(config, params, x, t, ctx), ref, atol=2e-3, rtol=1e-3)


def test_remat_same_value_and_gradient():
  config = unet_model.UNetConfig.tiny(
    block_out_channels=(32,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    sample_size=8,
  )
  params = jax.jit(lambda k: unet_model.init_params(config, k, context_len=3))(jax.random.key(0))
  params = nn.unbox(params)
  k1, k2 = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k1, (2, 8, 8, 4))
  ctx = jax.random.normal(k2, (2, 3, 32))
  t = jnp.array([1, 700])

  def loss(p, cfg):
    return jnp.mean(unet_model.apply_unet(cfg, p, x, t, ctx) ** 2)

  v0, g0 = jax.jit(jax.value_and_grad(functools.partial(loss, cfg=config)))(params)
  v1, g1 = jax.jit(jax.value_and_grad(functools.partial(loss, cfg=config.replace(remat=True))))(
    params
  )
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_attention_implementations_match_torch_sdpa(impl):
  from facediff.models import layers

  rng = np.random.default_rng(0)
  b, lq, lk, h, d = 2, 300, 260, 4, 8  # lq not a multiple of the block: padding path
  q, k, v = (rng.standard_normal((b, n, h * d)).astype(np.float32) for n in (lq, lk, lk))
  layers_block = layers._BLOCK_ELEMS
  layers._BLOCK_ELEMS = 64 * lk  # force several query blocks
  try:
    out = jax.jit(functools.partial(layers.multi_head_attention, heads=h, implementation=impl))(
      q, k, v
    )
  finally:
    layers._BLOCK_ELEMS = layers_block
  tq, tk, tv = (torch.from_numpy(a).reshape(b, -1, h, d).transpose(1, 2) for a in (q, k, v))
  ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
  ref = ref.transpose(1, 2).reshape(b, lq, h * d).numpy()
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_load_fp16_variant_and_sharded_index(tmp_path):
  m = _torch_unet(CONFIG_A)
  m.half().save_pretrained(tmp_path / "half", variant="fp16")
  config, params = unet_convert.load_unet(tmp_path / "half", variant="fp16")
  want = unet_convert.convert_unet_state_dict(
    {k: v.float().numpy() for k, v in m.state_dict().items()}, config
  )
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  # a checkpoint split in shards with an index file
  m.float().save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  assert any(f.endswith(".index.json") for f in os.listdir(tmp_path / "sharded"))
  _, params2 = unet_convert.load_unet(tmp_path / "sharded")
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
