"""Tiny random Stable Diffusion model sets built with diffusers / transformers (torch),
shared by test_checkpoints.py and test_text_to_image.py."""

import json
import os

import diffusers
import numpy as np
import torch
import transformers

WORDS = ("a", "photo", "of", "cat", "dog", "face", "smiling", "old", "man")

UNET_KW = dict(
  sample_size=8,
  in_channels=4,
  out_channels=4,
  block_out_channels=(32, 64),
  layers_per_block=2,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  cross_attention_dim=32,
  attention_head_dim=2,
  norm_num_groups=8,
)
VAE_KW = dict(
  block_out_channels=(32, 64),
  layers_per_block=1,
  norm_num_groups=8,
  latent_channels=4,
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
  sample_size=16,
)


def write_tiny_tokenizer(path, words=WORDS):
  """A tiny byte-level BPE vocabulary in CLIP's format (vocab.json + merges.txt):
  the 26 letters, their end-of-word forms, a few whole words built by explicit merges,
  and the two special tokens."""
  os.makedirs(path, exist_ok=True)
  chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
  vocab = {}
  for c in chars:
    vocab[c] = len(vocab)
  for c in chars:
    vocab[c + "</w>"] = len(vocab)
  merges = []
  for w in words:
    if len(w) == 1:
      continue
    cur = w[0]
    for i, c in enumerate(w[1:], start=1):
      nxt = c + "</w>" if i == len(w) - 1 else c
      merges.append(f"{cur} {nxt}")
      cur = cur + nxt
      vocab.setdefault(cur, len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
  tok = transformers.CLIPTokenizer(
    os.path.join(path, "vocab.json"),
    os.path.join(path, "merges.txt"),
    pad_token="<|endoftext|>",
    model_max_length=77,
  )
  tok.save_pretrained(path)
  return vocab, tok


def _perturb(module, seed):
  """Random non-trivial norms/biases (fresh torch inits leave them at 1/0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in module.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn(p.shape, generator=g))


def tiny_components(tmp_dir, seed=0):
  """(unet, vae, text_encoder, tokenizer, scheduler): tiny random torch models."""
  vocab, tok = write_tiny_tokenizer(os.path.join(tmp_dir, "_tok"))
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**UNET_KW).eval()
  vae = diffusers.AutoencoderKL(**VAE_KW).eval()
  text = transformers.CLIPTextModel(
    transformers.CLIPTextConfig(
      vocab_size=len(vocab),
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=77,
      hidden_act="quick_gelu",
      bos_token_id=vocab["<|startoftext|>"],
      eos_token_id=2,
      pad_token_id=1,
    )
  ).eval()
  for i, m in enumerate((unet, vae, text)):
    _perturb(m, seed * 10 + i)
  sched = diffusers.PNDMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
  )
  return unet, vae, text, tok, sched


def make_tiny_sd_folder(folder, seed=0, safe_serialization=True):
  """Writes a tiny SD pipeline folder with save_pretrained; returns the torch pipeline."""
  # Tiny models: torch's thread pool only costs time on a shared CPU (5 s -> 0.2 s a run).
  torch.set_num_threads(1)
  unet, vae, text, tok, sched = tiny_components(os.path.dirname(os.fspath(folder)), seed)
  pipe = diffusers.StableDiffusionPipeline(
    vae=vae,
    text_encoder=text,
    tokenizer=tok,
    unet=unet,
    scheduler=sched,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(folder, safe_serialization=safe_serialization)
  return pipe


def state_dict_np(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))
