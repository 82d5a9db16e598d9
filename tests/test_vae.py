"""VAE: parity with diffusers' AutoencoderKL (torch, float32) through the converter."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from facediff.convert import common  # noqa: E402
from facediff.convert import vae as vae_convert  # noqa: E402
from facediff.models import vae as vae_lib  # noqa: E402

CONFIGS = [
  dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4),
  dict(
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    norm_num_groups=4,
    latent_channels=3,
    in_channels=2,
    out_channels=5,
  ),
]


def _torch_vae(kw, seed=0):
  n = len(kw["block_out_channels"])
  torch.manual_seed(seed)
  m = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kw
  ).eval()
  with torch.no_grad():  # non-trivial norms and biases
    for p in m.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return m


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("kw", CONFIGS, ids=["two_level", "three_level_odd_channels"])
def test_vae_matches_diffusers(kw):
  tvae = _torch_vae(kw)
  cfg = vae_convert.config_from_diffusers(dict(tvae.config))
  params = vae_convert.torch_to_flax({k: v.numpy() for k, v in tvae.state_dict().items()}, cfg)
  vae = vae_lib.AutoencoderKL(cfg)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 24, cfg.in_channels)).astype(np.float32)
  f = cfg.downsample_factor
  z = rng.normal(size=(2, 16 // f, 24 // f, cfg.latent_channels)).astype(np.float32)
  with torch.no_grad():
    post = tvae.encode(_nchw(x)).latent_dist
    dec = tvae.decode(_nchw(z)).sample
  v = {"params": params}
  ours = jax.jit(lambda v, x: vae.apply(v, x, method=vae.encode))(v, x)
  np.testing.assert_allclose(np.asarray(ours.mean), _nhwc(post.mean), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(ours.logvar), _nhwc(post.logvar), atol=1e-4, rtol=1e-4)
  out = jax.jit(lambda v, z: vae.apply(v, z, method=vae.decode))(v, z)
  np.testing.assert_allclose(np.asarray(out), _nhwc(dec), atol=1e-4, rtol=1e-4)


def test_posterior_sampling_and_scaled_latents():
  cfg = vae_lib.VAEConfig.tiny()
  vae = vae_lib.AutoencoderKL(cfg)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  v = jax.jit(vae.init)(jax.random.key(1), x)
  post = jax.jit(lambda v, x: vae.apply(v, x, method=vae.encode))(v, x)
  key = jax.random.key(7)
  # sample = mean + exp(logvar / 2) * eps with eps from the key, written out.
  eps = jax.random.normal(key, post.mean.shape)
  np.testing.assert_allclose(
    post.sample(key), post.mean + jnp.exp(0.5 * post.logvar) * eps, rtol=1e-6
  )
  enc = jax.jit(lambda v, x, k: vae.apply(v, x, k, method=vae.encode_latents))
  z = enc(v, x, key)
  np.testing.assert_allclose(z, 0.18215 * post.sample(key), rtol=1e-5, atol=1e-6)
  mode = jax.jit(lambda v, x: vae.apply(v, x, method=vae.encode_latents))(v, x)
  np.testing.assert_allclose(mode, 0.18215 * post.mean, rtol=1e-5, atol=1e-6)
  dec_l = jax.jit(lambda v, z: vae.apply(v, z, method=vae.decode_latents))(v, z)
  dec = jax.jit(lambda v, z: vae.apply(v, z, method=vae.decode))(v, z / 0.18215)
  np.testing.assert_allclose(dec_l, dec, rtol=1e-5, atol=1e-6)
  big = vae_lib.DiagonalGaussian.from_moments(jnp.concatenate([x[..., :2], 100 + x[..., :2]], -1))
  assert float(big.logvar.max()) == 20.0  # diffusers' clamp


def test_vae_export_roundtrip(tmp_path):
  cfg = vae_lib.VAEConfig.tiny()
  vae = vae_lib.AutoencoderKL(cfg)
  x = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3), minval=-1, maxval=1)
  params = vae.init(jax.random.key(3), x)["params"]
  sd = vae_convert.flax_to_torch(params)
  common.write_safetensors(sd, tmp_path / "diffusion_pytorch_model.safetensors")
  import json

  with open(tmp_path / "config.json", "w") as f:
    json.dump(vae_convert.config_to_diffusers(cfg), f)
  tvae = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    ref = tvae(_nchw(np.asarray(x))).sample
  ours = vae.apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(ours), _nhwc(ref), atol=1e-4, rtol=1e-4)


def test_legacy_attention_keys_load():
  kw = CONFIGS[0]
  tvae = _torch_vae(kw, seed=2)
  cfg = vae_convert.config_from_diffusers(dict(tvae.config))
  sd = {k: v.numpy() for k, v in tvae.state_dict().items()}
  legacy = {}
  for k, v in sd.items():
    for new, old in (
      ("to_q", "query"),
      ("to_k", "key"),
      ("to_v", "value"),
      ("to_out.0", "proj_attn"),
    ):
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
    legacy[k] = v
  a = common.flatten_params(vae_convert.torch_to_flax(sd, cfg))
  b = common.flatten_params(vae_convert.torch_to_flax(legacy, cfg))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_vae_bad_state_dict_lists_keys():
  tvae = _torch_vae(CONFIGS[0])
  cfg = vae_convert.config_from_diffusers(dict(tvae.config))
  sd = {k: v.numpy() for k, v in tvae.state_dict().items()}
  del sd["decoder.up_blocks.1.resnets.1.conv2.bias"]
  sd["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  with pytest.raises(common.StateDictMismatchError) as e:
    vae_convert.torch_to_flax(sd, cfg, source="vae/diffusion_pytorch_model.safetensors")
  msg = str(e.value)
  assert "vae/diffusion_pytorch_model.safetensors" in msg
  assert "decoder/up_blocks_1/resnets_1/conv2/bias" in msg
  assert "quant_conv/kernel" in msg


def test_unsupported_config_is_named():
  with pytest.raises(ValueError, match="down_block_types"):
    vae_convert.config_from_diffusers(
      {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
      }
    )


def test_bfloat16_compute_close_to_float32():
  tvae = _torch_vae(CONFIGS[0])
  cfg = vae_convert.config_from_diffusers(dict(tvae.config))
  params = vae_convert.torch_to_flax({k: v.numpy() for k, v in tvae.state_dict().items()}, cfg)
  z = np.random.default_rng(1).normal(size=(1, 8, 8, 4)).astype(np.float32)
  out = {}
  for dt in ("float32", "bfloat16"):
    vae = vae_lib.AutoencoderKL(dataclasses.replace(cfg, dtype=dt))
    decode = jax.jit(functools.partial(vae.apply, method=vae.decode))
    out[dt] = np.asarray(decode({"params": params}, z))
  assert out["bfloat16"].dtype == np.float32
  scale = np.abs(out["float32"]).max()
  assert np.abs(out["bfloat16"] - out["float32"]).max() < 0.05 * scale


@pytest.mark.slow
def test_sd14_vae_shapes_match_diffusers():
  """VAEConfig.sd14() has exactly the parameters of diffusers' SD-1.x AutoencoderKL."""
  n = 4
  tvae = diffusers.AutoencoderKL(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * n,
    up_block_types=("UpDecoderBlock2D",) * n,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
  )
  want = {
    k: tuple(v.shape)
    for k, v in vae_convert.flax_to_torch(
      jax.tree.map(
        lambda s: np.zeros(s.shape, np.float32), vae_lib.abstract_params(vae_lib.VAEConfig.sd14())
      )
    ).items()
  }
  assert want == {k: tuple(v.shape) for k, v in tvae.state_dict().items()}
