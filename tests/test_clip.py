"""CLIP text encoder: parity with transformers' CLIPTextModel (torch, float32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tiny_sd import write_tiny_tokenizer  # noqa: E402

from facediff.convert import clip as clip_convert  # noqa: E402
from facediff.convert import common  # noqa: E402
from facediff.models import clip as clip_lib  # noqa: E402

# Two configurations: SD-1.x-like legacy pooling (eos_token_id=2, argmax of the ids)
# with quick_gelu, and the newer eos-id pooling with exact gelu and odd widths.
CONFIGS = [
  dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    eos_token_id=2,
    bos_token_id=0,
    pad_token_id=1,
  ),
  dict(
    vocab_size=120,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=3,
    max_position_embeddings=16,
    hidden_act="gelu",
    eos_token_id=119,
    bos_token_id=118,
    pad_token_id=0,
    layer_norm_eps=1e-6,
  ),
]


def _torch_model(kw, seed=0):
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kw)).eval()
  # Non-trivial LayerNorm params so the converter's scale/bias mapping is exercised.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _ids(kw, batch=3, seed=1):
  rng = np.random.default_rng(seed)
  n = kw["max_position_embeddings"]
  ids = np.full((batch, n), kw["pad_token_id"], np.int64)
  for b in range(batch):
    length = rng.integers(3, n - 1)
    body = rng.integers(3, kw["vocab_size"] - 3, size=length)
    ids[b, 0] = kw["bos_token_id"]
    ids[b, 1 : length + 1] = body
    eos = kw["eos_token_id"] if kw["eos_token_id"] != 2 else kw["vocab_size"] - 1
    ids[b, length + 1] = eos
  return ids


@pytest.mark.parametrize("kw", CONFIGS, ids=["legacy_quick_gelu", "eos_gelu"])
def test_clip_matches_transformers(kw):
  tmodel = _torch_model(kw)
  ids = _ids(kw)
  with torch.no_grad():
    out = tmodel(input_ids=torch.from_numpy(ids))
  cfg = clip_convert.config_from_transformers(tmodel.config.to_dict())
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  params = clip_convert.torch_to_flax(sd, cfg, source="tiny")
  hidden, pooled = jax.jit(clip_lib.CLIPTextModel(cfg).apply)({"params": params}, jnp.asarray(ids))
  np.testing.assert_allclose(
    np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4
  )
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


def test_clip_attention_mask_matches_transformers():
  kw = CONFIGS[1]
  tmodel = _torch_model(kw, seed=3)
  ids = _ids(kw, batch=2, seed=4)
  mask = (np.arange(ids.shape[1])[None] < np.array([[9], [12]])).astype(np.int64)
  with torch.no_grad():
    out = tmodel(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  cfg = clip_convert.config_from_transformers(tmodel.config.to_dict())
  params = clip_convert.torch_to_flax({k: v.numpy() for k, v in tmodel.state_dict().items()}, cfg)
  hidden, _ = clip_lib.CLIPTextModel(cfg).apply(
    {"params": params}, jnp.asarray(ids), jnp.asarray(mask)
  )
  # Rows of padded positions are garbage in both; compare the attended ones.
  keep = mask.astype(bool)
  np.testing.assert_allclose(
    np.asarray(hidden)[keep], out.last_hidden_state.numpy()[keep], atol=1e-4, rtol=1e-4
  )


def test_clip_export_roundtrip_from_pretrained(tmp_path):
  kw = CONFIGS[0]
  cfg = clip_convert.config_from_transformers(kw)
  params = clip_lib.CLIPTextModel(cfg).init(jax.random.key(5), jnp.zeros((1, 77), jnp.int32))[
    "params"
  ]
  sd = clip_convert.flax_to_torch(params)
  assert all(k.startswith("text_model.") for k in sd)
  common.write_safetensors(sd, tmp_path / "model.safetensors")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(clip_convert.config_to_transformers(cfg), f)
  tmodel = transformers.CLIPTextModel.from_pretrained(tmp_path, local_files_only=True).eval()
  ids = _ids(kw, batch=2, seed=7)
  with torch.no_grad():
    out = tmodel(input_ids=torch.from_numpy(ids))
  hidden, pooled = clip_lib.CLIPTextModel(cfg).apply({"params": params}, jnp.asarray(ids))
  np.testing.assert_allclose(
    np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4
  )
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
  # And back: import(export(params)) is the identity.
  back = clip_convert.torch_to_flax(sd, cfg)
  for k, v in common.flatten_params(params).items():
    np.testing.assert_array_equal(common.flatten_params(back)[k], np.asarray(v))


def test_clip_bad_state_dict_lists_keys():
  kw = CONFIGS[0]
  tmodel = _torch_model(kw)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  cfg = clip_convert.config_from_transformers(kw)
  del sd["encoder.layers.1.mlp.fc2.bias"]
  sd["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
  sd["encoder.layers.0.extra.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(common.StateDictMismatchError) as e:
    clip_convert.torch_to_flax(sd, cfg, source="broken.safetensors")
  msg = str(e.value)
  assert "broken.safetensors" in msg
  assert "layers_1/mlp/fc2/bias" in msg
  assert "layers_0/self_attn/q_proj/kernel" in msg
  assert "layers_0/extra/scale" in msg


def test_tokenizer_pads_and_truncates(tmp_path):
  vocab, _ = write_tiny_tokenizer(tmp_path / "tok")
  tok = clip_lib.CLIPTokenizer(tmp_path / "tok")
  ids = tok(["a photo of a cat", "dog " * 100, ""])
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  np.testing.assert_array_equal(
    ids[0, :7],
    [
      bos,
      vocab["a</w>"],
      vocab["photo</w>"],
      vocab["of</w>"],
      vocab["a</w>"],
      vocab["cat</w>"],
      eos,
    ],
  )
  assert (ids[0, 7:] == eos).all()  # padded with the pad token (= end of text)
  assert ids[1, 0] == bos and ids[1, -1] == eos and (ids[1, 1:-1] == vocab["dog</w>"]).all()
  assert ids[2, 0] == bos and (ids[2, 1:] == eos).all()


def test_tokenizer_missing_folder_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    clip_lib.CLIPTokenizer(tmp_path / "nowhere")


@pytest.mark.slow
def test_sd14_clip_shapes_match_transformers():
  """CLIPTextConfig.sd14() has exactly the parameters of ViT-L/14's text tower."""
  tcfg = transformers.CLIPTextConfig(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
  )
  tmodel = transformers.CLIPTextModel(tcfg)
  shapes = clip_lib.abstract_params(clip_lib.CLIPTextConfig.sd14())
  want = {
    k: tuple(v.shape)
    for k, v in clip_convert.flax_to_torch(
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes), prefix=""
    ).items()
  }
  got = {
    k: tuple(v.shape) for k, v in tmodel.state_dict().items() if k != "embeddings.position_ids"
  }
  assert want == got
