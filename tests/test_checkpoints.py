"""Whole-checkpoint loading: diffusers folders, CompVis single files, export round trip."""

import json
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import _tiny_sd as tiny_sd  # noqa: E402

from facediff.convert import common, compvis  # noqa: E402
from facediff.convert import pipeline as diffusers_io  # noqa: E402
from facediff.models import clip as clip_lib  # noqa: E402
from facediff.models import unet as unet_lib  # noqa: E402
from facediff.models import vae as vae_lib  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd")
  pipe = tiny_sd.make_tiny_sd_folder(root / "sd")
  return root / "sd", pipe


def _check_outputs(models, pipe, seed=0):
  """facediff models with ``models.params`` give the torch pipeline's outputs."""
  rng = np.random.default_rng(seed)
  # text encoder
  ids = (
    np.asarray(
      clip_lib.CLIPTokenizer(models.tokenizer_path)(["a photo of a cat", "old man smiling"])
    )
    if models.tokenizer_path
    else rng.integers(0, 70, (2, 77))
  )
  with torch.no_grad():
    t_out = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64)))
  hidden, pooled = jax.jit(clip_lib.CLIPTextModel(models.text_config).apply)(
    {"params": models.params["text_encoder"]}, jnp.asarray(ids)
  )
  np.testing.assert_allclose(hidden, t_out.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(pooled, t_out.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
  # unet
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t = np.array([10, 700], np.int32)
  with torch.no_grad():
    t_torch = torch.from_numpy(t.astype(np.int64))
    ref = pipe.unet(tiny_sd.nchw(x), t_torch, t_out.last_hidden_state).sample
  eps = jax.jit(lambda p, x, t, c: unet_lib.apply_unet(models.unet_config, p, x, t, c))(
    models.params["unet"], jnp.asarray(x), jnp.asarray(t), hidden
  )
  np.testing.assert_allclose(eps, tiny_sd.nhwc(ref), atol=1e-4, rtol=1e-4)
  # vae decode
  vae = vae_lib.AutoencoderKL(models.vae_config)
  with torch.no_grad():
    img = pipe.vae.decode(tiny_sd.nchw(x)).sample
  ours = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(
    models.params["vae"], jnp.asarray(x)
  )
  np.testing.assert_allclose(ours, tiny_sd.nhwc(img), atol=1e-4, rtol=1e-4)


def _assert_same_params(a, b):
  fa, fb = common.flatten_params(a), common.flatten_params(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# ----------------------------------------------------------------------------- diffusers folders


def test_load_diffusers_folder_matches_torch(tiny):
  folder, pipe = tiny
  models = diffusers_io.load_pretrained(folder)
  assert models.vae_config.block_out_channels == (32, 64)
  assert models.text_config.hidden_size == 32 and models.text_config.eos_token_id == 2
  assert models.unet_config.cross_attention_dim == 32
  assert (
    models.scheduler["_class_name"] == "PNDMScheduler" and models.scheduler["steps_offset"] == 1
  )
  _check_outputs(models, pipe)


def test_load_bin_folder(tmp_path, tiny):
  _, pipe = tiny
  pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
  # transformers 5 always writes safetensors: write the text encoder as SD-1.4's hub
  # folder has it (pytorch_model.bin, legacy "text_model." keys with position_ids).
  te = tmp_path / "bin" / "text_encoder"
  os.remove(te / "model.safetensors")
  sd = {"text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()}
  sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
  torch.save(sd, te / "pytorch_model.bin")
  files = {f for _, _, fs in os.walk(tmp_path / "bin") for f in fs}
  assert "diffusion_pytorch_model.bin" in files and not any(
    f.endswith(".safetensors") for f in files
  )
  models = diffusers_io.load_pretrained(tmp_path / "bin")
  _assert_same_params(models.params, diffusers_io.load_pretrained(tiny[0]).params)


def test_export_roundtrip_from_pretrained(tmp_path, tiny):
  folder, pipe = tiny
  models = diffusers_io.load_pretrained(folder)
  out = diffusers_io.save_pretrained(models, tmp_path / "export")
  again = diffusers.StableDiffusionPipeline.from_pretrained(
    out, safety_checker=None, feature_extractor=None, requires_safety_checker=False
  )
  for name in ("unet", "vae", "text_encoder"):
    ref = tiny_sd.state_dict_np(getattr(pipe, name))
    got = tiny_sd.state_dict_np(getattr(again, name))
    ref.pop("text_model.embeddings.position_ids", None)
    got.pop("text_model.embeddings.position_ids", None)
    assert ref.keys() == got.keys(), name
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name}.{k}")
  assert (
    again.tokenizer("a photo of a cat").input_ids == pipe.tokenizer("a photo of a cat").input_ids
  )
  assert dict(again.scheduler.config)["steps_offset"] == 1
  # and facediff reads its own export back identically
  _assert_same_params(diffusers_io.load_pretrained(out).params, models.params)


def test_missing_component_and_bad_weights_are_named(tmp_path, tiny):
  folder, _ = tiny
  bad = tmp_path / "bad"
  shutil.copytree(folder, bad)
  # a VAE checkpoint with one key missing and one extra key
  path = bad / "vae" / "diffusion_pytorch_model.safetensors"
  sd = common.read_state_dict(path)
  del sd["decoder.conv_out.bias"]
  sd["decoder.conv_extra.weight"] = np.zeros((3, 3, 3, 3), np.float32)
  common.write_safetensors(sd, path)
  with pytest.raises(common.StateDictMismatchError) as e:
    diffusers_io.load_pretrained(bad)
  msg = str(e.value)
  assert str(path) in msg and "decoder/conv_out/bias" in msg and "decoder/conv_extra/kernel" in msg
  # a corrupt text encoder file
  te = bad / "text_encoder" / "model.safetensors"
  te.write_bytes(b"not a safetensors file at all")
  shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", path)
  with pytest.raises(ValueError, match="model.safetensors"):
    diffusers_io.load_pretrained(bad)
  # a missing component folder
  shutil.rmtree(bad / "text_encoder")
  with pytest.raises(FileNotFoundError, match="text_encoder"):
    diffusers_io.load_pretrained(bad)
  # weights of the wrong shape for the config
  with open(folder / "vae" / "config.json") as f:
    cfg = json.load(f)
  cfg["latent_channels"] = 8
  shutil.copytree(folder / "vae", tmp_path / "vae8")
  with open(tmp_path / "vae8" / "config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(common.StateDictMismatchError, match="mis-shaped") as e:
    diffusers_io.load_vae(str(tmp_path / "vae8"))
  assert "quant_conv/kernel" in str(e.value)


# ----------------------------------------------------------------------------- CompVis single file
#
# The test's own diffusers -> CompVis renaming for the tiny configuration (UNet: 2 levels,
# 2 resnets per level, cross-attention in the first down / last up level; VAE: 2 levels,
# 1 resnet per level), written out block by block from ldm's module layout, independently
# of facediff.convert.compvis's tables.

UNET_BLOCKS = {
  "time_embedding.linear_1": "time_embed.0",
  "time_embedding.linear_2": "time_embed.2",
  "conv_in": "input_blocks.0.0",
  "down_blocks.0.resnets.0": "input_blocks.1.0",
  "down_blocks.0.attentions.0": "input_blocks.1.1",
  "down_blocks.0.resnets.1": "input_blocks.2.0",
  "down_blocks.0.attentions.1": "input_blocks.2.1",
  "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
  "down_blocks.1.resnets.0": "input_blocks.4.0",
  "down_blocks.1.resnets.1": "input_blocks.5.0",
  "mid_block.resnets.0": "middle_block.0",
  "mid_block.attentions.0": "middle_block.1",
  "mid_block.resnets.1": "middle_block.2",
  "up_blocks.0.resnets.0": "output_blocks.0.0",
  "up_blocks.0.resnets.1": "output_blocks.1.0",
  "up_blocks.0.resnets.2": "output_blocks.2.0",
  "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
  "up_blocks.1.resnets.0": "output_blocks.3.0",
  "up_blocks.1.attentions.0": "output_blocks.3.1",
  "up_blocks.1.resnets.1": "output_blocks.4.0",
  "up_blocks.1.attentions.1": "output_blocks.4.1",
  "up_blocks.1.resnets.2": "output_blocks.5.0",
  "up_blocks.1.attentions.2": "output_blocks.5.1",
  "conv_norm_out": "out.0",
  "conv_out": "out.2",
}
UNET_RESNET_INNER = {
  "norm1": "in_layers.0",
  "conv1": "in_layers.2",
  "time_emb_proj": "emb_layers.1",
  "norm2": "out_layers.0",
  "conv2": "out_layers.3",
  "conv_shortcut": "skip_connection",
}
VAE_BLOCKS = {
  "encoder.conv_in": "encoder.conv_in",
  "encoder.down_blocks.0.resnets.0": "encoder.down.0.block.0",
  "encoder.down_blocks.0.downsamplers.0.conv": "encoder.down.0.downsample.conv",
  "encoder.down_blocks.1.resnets.0": "encoder.down.1.block.0",
  "encoder.mid_block.resnets.0": "encoder.mid.block_1",
  "encoder.mid_block.attentions.0": "encoder.mid.attn_1",
  "encoder.mid_block.resnets.1": "encoder.mid.block_2",
  "encoder.conv_norm_out": "encoder.norm_out",
  "encoder.conv_out": "encoder.conv_out",
  "decoder.conv_in": "decoder.conv_in",
  "decoder.mid_block.resnets.0": "decoder.mid.block_1",
  "decoder.mid_block.attentions.0": "decoder.mid.attn_1",
  "decoder.mid_block.resnets.1": "decoder.mid.block_2",
  "decoder.up_blocks.0.resnets.0": "decoder.up.1.block.0",
  "decoder.up_blocks.0.resnets.1": "decoder.up.1.block.1",
  "decoder.up_blocks.0.upsamplers.0.conv": "decoder.up.1.upsample.conv",
  "decoder.up_blocks.1.resnets.0": "decoder.up.0.block.0",
  "decoder.up_blocks.1.resnets.1": "decoder.up.0.block.1",
  "decoder.conv_norm_out": "decoder.norm_out",
  "decoder.conv_out": "decoder.conv_out",
  "quant_conv": "quant_conv",
  "post_quant_conv": "post_quant_conv",
}
VAE_RESNET_INNER = {
  "norm1": "norm1",
  "conv1": "conv1",
  "norm2": "norm2",
  "conv2": "conv2",
  "conv_shortcut": "nin_shortcut",
}
VAE_ATTN_INNER = {
  "group_norm": "norm",
  "to_q": "q",
  "to_k": "k",
  "to_v": "v",
  "to_out.0": "proj_out",
}


def _to_compvis(sd, blocks, inner_for):
  out = {}
  for k, v in sd.items():
    prefix = max((b for b in blocks if k.startswith(b + ".")), key=len)
    rest = k[len(prefix) + 1 :]
    inner = inner_for(prefix)
    if inner is not None:
      head, param = rest.rsplit(".", 1)
      rest = f"{inner[head]}.{param}"
    out[f"{blocks[prefix]}.{rest}"] = v
  return out


def compvis_state_dict(pipe, ema_unet=None):
  """The tiny pipeline's weights under CompVis names, plus the extras real files carry."""
  unet = _to_compvis(
    tiny_sd.state_dict_np(pipe.unet),
    UNET_BLOCKS,
    lambda p: UNET_RESNET_INNER if ".resnets." in p else None,
  )
  vae = _to_compvis(
    tiny_sd.state_dict_np(pipe.vae),
    VAE_BLOCKS,
    lambda p: (
      VAE_RESNET_INNER if ".resnets." in p else (VAE_ATTN_INNER if ".attentions." in p else None)
    ),
  )
  for k in list(vae):  # ldm's VAE attention projections are 1x1 convolutions
    if ".mid.attn_1." in k and k.endswith("weight") and vae[k].ndim == 2:
      vae[k] = vae[k][:, :, None, None]
  sd = {"model.diffusion_model." + k: v for k, v in unet.items()}
  sd.update({"first_stage_model." + k: v for k, v in vae.items()})
  text = tiny_sd.state_dict_np(pipe.text_encoder)
  sd.update({"cond_stage_model.transformer.text_model." + k: v for k, v in text.items()})
  sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[
    None
  ].astype(np.int64)
  sd["betas"] = np.linspace(1e-4, 2e-2, 1000).astype(np.float32)
  sd["alphas_cumprod"] = np.cumprod(1 - sd["betas"]).astype(np.float32)
  sd["model_ema.decay"] = np.array(0.9999, np.float32)
  sd["model_ema.num_updates"] = np.array(10, np.int64)
  if ema_unet is not None:
    for k, v in _to_compvis(
      tiny_sd.state_dict_np(ema_unet),
      UNET_BLOCKS,
      lambda p: UNET_RESNET_INNER if ".resnets." in p else None,
    ).items():
      sd["model_ema." + ("diffusion_model." + k).replace(".", "")] = v
  return sd


def _tiny_configs(folder):
  m = diffusers_io.load_pretrained(folder)
  return m, dict(unet_config=m.unet_config, vae_config=m.vae_config, text_config=m.text_config)


def test_compvis_safetensors_and_ckpt_load(tmp_path, tiny):
  folder, pipe = tiny
  ref, cfgs = _tiny_configs(folder)
  sd = compvis_state_dict(pipe)
  common.write_safetensors(sd, tmp_path / "sd.safetensors")
  torch.save(
    {
      "state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
      "global_step": 470000,
    },
    tmp_path / "sd.ckpt",
  )
  for name in ("sd.safetensors", "sd.ckpt"):
    models = diffusers_io.load_models(tmp_path / name, tokenizer_path=folder / "tokenizer", **cfgs)
    _assert_same_params(models.params, ref.params)
  _check_outputs(models, pipe)


def test_compvis_ema_weights(tmp_path, tiny):
  folder, pipe = tiny
  ref, cfgs = _tiny_configs(folder)
  torch.manual_seed(123)
  ema = diffusers.UNet2DConditionModel(**tiny_sd.UNET_KW).eval()
  sd = compvis_state_dict(pipe, ema_unet=ema)
  params = compvis.compvis_to_params(sd, use_ema=True, **cfgs)
  from facediff.convert import unet as unet_convert

  _assert_same_params(
    params["unet"],
    unet_convert.convert_unet_state_dict(tiny_sd.state_dict_np(ema), cfgs["unet_config"]),
  )
  _assert_same_params(params["vae"], ref.params["vae"])
  with pytest.raises(common.StateDictMismatchError, match="EMA"):
    compvis.compvis_to_params(compvis_state_dict(pipe), use_ema=True, **cfgs)


def test_compvis_bad_keys_are_listed(tmp_path, tiny):
  folder, pipe = tiny
  _, cfgs = _tiny_configs(folder)
  sd = compvis_state_dict(pipe)
  sd["model.diffusion_model.input_blocks.1.0.in_layers.9.weight"] = sd.pop(
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
  )
  sd["model.diffusion_model.input_blocks.77.0.op.weight"] = np.zeros((1,), np.float32)
  common.write_safetensors(sd, tmp_path / "bad.safetensors")
  with pytest.raises(common.StateDictMismatchError) as e:
    compvis.load_compvis_checkpoint(tmp_path / "bad.safetensors", **cfgs)
  msg = str(e.value)
  assert "bad.safetensors" in msg and "model.diffusion_model" in msg
  assert "down_blocks_0/resnets_0/norm1/scale" in msg  # missing
  assert "model.diffusion_model.input_blocks.1.0.in_layers.9.weight" in msg  # unexpected
  assert "model.diffusion_model.input_blocks.77.0.op.weight" in msg
  # a VAE tensor of the wrong shape
  sd = compvis_state_dict(pipe)
  sd["first_stage_model.decoder.conv_in.weight"] = np.zeros((64, 4, 1, 1), np.float32)
  with pytest.raises(common.StateDictMismatchError, match="decoder/conv_in/kernel"):
    compvis.compvis_to_params(sd, source="x.ckpt", **cfgs)
  # not an SD checkpoint at all
  with pytest.raises(ValueError, match="first_stage_model"):
    compvis.compvis_to_params(
      {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, **cfgs
    )


def test_compvis_tables_cover_sd14_shapes():
  """The renaming tables for SD-1.4's own configs map onto every facediff parameter:
  build the SD-1.4-sized param trees abstractly, export them to diffusers names, rename
  those to CompVis names with the inverse of the loader's tables, and check the counts
  against ldm's layout (12 input blocks, 12 output blocks, 3 middle blocks)."""
  from facediff.convert import unet as unet_convert

  ucfg = unet_lib.UNetConfig.sd14()
  table = compvis.unet_block_table(ucfg)
  assert (
    sum(k.startswith("input_blocks.") and k.endswith(".0") for k in table) == 9
  )  # resnets + conv_in
  assert sum(k.startswith("input_blocks.") and k.endswith(".op") for k in table) == 3
  assert sum(k.startswith("output_blocks.") and k.endswith(".0") for k in table) == 12
  assert {table[k][0] for k in table if k.endswith(".conv")} == {
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.upsamplers.0.conv",
    "up_blocks.2.upsamplers.0.conv",
  }
  assert (
    table["output_blocks.2.1.conv"][0] == "up_blocks.0.upsamplers.0.conv"
  )  # UpBlock2D: no attention
  assert table["output_blocks.5.2.conv"][0] == "up_blocks.1.upsamplers.0.conv"
  shapes = unet_lib.abstract_params(ucfg, sample_hw=(8, 8))
  diff_keys = unet_convert.unet_params_to_diffusers(
    jax.tree.map(lambda s: np.zeros((1,) * len(s.shape), np.float32), shapes)
  )
  inverse = {v[0]: k for k, v in table.items()}
  resnet_inv = {v: k for k, v in compvis._UNET_RESNET.items()}
  for k in diff_keys:
    prefix = max((p for p in inverse if k.startswith(p + ".")), key=len)
    assert prefix, k
    if ".resnets." in prefix:
      head = k[len(prefix) + 1 :].rsplit(".", 1)[0]
      assert head in resnet_inv, k


class _LightningLikeCallback:
  """Stands for the PyTorch Lightning objects a training .ckpt pickles next to the weights."""

  def __init__(self):
    self.best_model_path = "/somewhere/last.ckpt"


class _Payload:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_compvis_training_ckpt_with_foreign_objects(tmp_path, tiny):
  """A .ckpt that torch.load(weights_only=True) refuses (foreign classes in the pickle)
  still loads through the tolerant reader, which runs none of the pickled code, and
  bfloat16 tensors widen to float32."""
  folder, pipe = tiny
  ref, cfgs = _tiny_configs(folder)
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in compvis_state_dict(pipe).items()}
  half_key = "first_stage_model.decoder.conv_out.bias"
  sd[half_key] = sd[half_key].to(torch.bfloat16)
  marker = tmp_path / "payload_ran"
  torch.save(
    {
      "state_dict": sd,
      "callbacks": {"ModelCheckpoint": _LightningLikeCallback()},
      "payload": _Payload(str(marker)),
      "global_step": 1,
    },
    tmp_path / "train.ckpt",
  )
  with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
    torch.load(tmp_path / "train.ckpt", weights_only=True)
  models = compvis.load_compvis_checkpoint(tmp_path / "train.ckpt", **cfgs)
  assert not marker.exists()
  got = common.flatten_params(models.params)
  want = common.flatten_params(ref.params)
  assert got.keys() == want.keys()
  for k in got:
    if k == "vae/decoder/conv_out/bias":
      np.testing.assert_array_equal(got[k], sd[half_key].float().numpy())
    else:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
