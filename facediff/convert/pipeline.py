"""Whole Stable Diffusion model sets: diffusers folders in and out.

A diffusers pipeline folder holds ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/`` (and ``scheduler/``, ``model_index.json``). ``load_pretrained`` reads
every component's config.json and weights (``.safetensors`` or ``.bin``, sharded or
not, optional ``variant`` such as ``fp16``) into facediff configs + params;
``save_pretrained`` writes a facediff model set back in that layout so that
``diffusers.StableDiffusionPipeline.from_pretrained`` (and each component's
``from_pretrained``) load it. ``load_models`` also accepts a CompVis single file
(see ``facediff.convert.compvis``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from facediff.convert import clip as clip_convert
from facediff.convert import common, compvis
from facediff.convert import unet as unet_convert
from facediff.convert import vae as vae_convert
from facediff.models.clip import CLIPTextConfig
from facediff.models.stable_diffusion import SD_SCHEDULER_CONFIG, SDModels
from facediff.models.vae import VAEConfig

TOKENIZER_FILES = (
  "vocab.json",
  "merges.txt",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.json",
  "added_tokens.json",
)


def _read_json(path: str, what: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: {path} does not exist")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{what}: cannot read {path}: {e}") from e


def _read_component(
  folder: str, stems: tuple[str, ...], variant: str | None
) -> tuple[dict[str, np.ndarray], str]:
  files = common.find_weights(folder, stems, variant)
  state: dict[str, np.ndarray] = {}
  for fn in files:
    state.update(common.read_state_dict(fn))
  return state, files[0] if len(files) == 1 else f"{folder} ({len(files)} shards)"


def load_vae(
  folder: str, variant: str | None = None, dtype: str = "float32"
) -> tuple[VAEConfig, dict]:
  """(config, params) from a diffusers ``AutoencoderKL`` folder."""
  cfg_path = os.path.join(folder, "config.json")
  cfg = vae_convert.config_from_diffusers(_read_json(cfg_path, "VAE config"), source=cfg_path)
  cfg = dataclasses.replace(cfg, dtype=dtype)
  state, source = _read_component(folder, ("diffusion_pytorch_model",), variant)
  return cfg, vae_convert.torch_to_flax(state, cfg, source)


def load_text_encoder(
  folder: str, variant: str | None = None, dtype: str = "float32"
) -> tuple[CLIPTextConfig, dict]:
  """(config, params) from a transformers ``CLIPTextModel`` folder."""
  cfg_path = os.path.join(folder, "config.json")
  cfg = clip_convert.config_from_transformers(
    _read_json(cfg_path, "text encoder config"), source=cfg_path
  )
  cfg = dataclasses.replace(cfg, dtype=dtype)
  state, source = _read_component(folder, ("model", "pytorch_model"), variant)
  return cfg, clip_convert.torch_to_flax(state, cfg, source)


def load_pretrained(
  path: str | os.PathLike, *, variant: str | None = None, dtype: str = "float32"
) -> SDModels:
  """Loads a diffusers Stable Diffusion folder into facediff configs + params.

  ``dtype`` is the compute dtype of all three models (params stay float32).
  Errors name the file and, for weights, every missing / unexpected / mis-shaped key.
  """
  path = os.fspath(path)
  check_source(path)
  unet_cfg, unet_params = unet_convert.load_unet(
    os.path.join(path, "unet"), variant=variant, dtype=dtype
  )
  vae_cfg, vae_params = load_vae(os.path.join(path, "vae"), variant, dtype)
  text_cfg, text_params = load_text_encoder(os.path.join(path, "text_encoder"), variant, dtype)
  if unet_cfg.cross_attention_dim != text_cfg.hidden_size:
    raise ValueError(
      f"{path}: unet cross_attention_dim {unet_cfg.cross_attention_dim} != "
      f"text_encoder hidden_size {text_cfg.hidden_size}"
    )
  if unet_cfg.in_channels < vae_cfg.latent_channels:
    raise ValueError(
      f"{path}: unet in_channels {unet_cfg.in_channels} < vae latent_channels "
      f"{vae_cfg.latent_channels}"
    )
  tok = os.path.join(path, "tokenizer")
  sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
  sched = dict(SD_SCHEDULER_CONFIG)
  if os.path.isfile(sched_path):
    sched.update(_read_json(sched_path, "scheduler config"))
  return SDModels(
    unet_cfg,
    vae_cfg,
    text_cfg,
    {"unet": unet_params, "vae": vae_params, "text_encoder": text_params},
    tokenizer_path=tok if os.path.isdir(tok) else None,
    scheduler=sched,
  )


def check_source(path: str | os.PathLike) -> None:
  """Raises FileNotFoundError naming ``path`` unless it is a CompVis single file or a
  diffusers folder with unet/, vae/ and text_encoder/ (what ``load_models`` checks
  first, without reading any weights)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return
  if not os.path.isdir(path):
    raise FileNotFoundError(f"diffusers model folder {path} does not exist")
  for sub in ("unet", "vae", "text_encoder"):
    if not os.path.isdir(os.path.join(path, sub)):
      raise FileNotFoundError(f"{path} is not a Stable Diffusion folder: it lacks {sub}/")


def load_models(path: str | os.PathLike, **kwargs) -> SDModels:
  """A diffusers folder (``load_pretrained``) or a CompVis single file
  (``facediff.convert.compvis.load_compvis_checkpoint``)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return compvis.load_compvis_checkpoint(path, **kwargs)
  return load_pretrained(path, **kwargs)


def _write_json(obj: Mapping[str, Any], path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def save_pretrained(
  models: SDModels, folder: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None
) -> str:
  """Writes ``models`` as a diffusers Stable Diffusion folder (float32 safetensors).

  The tokenizer files are copied from ``tokenizer_path`` (default: the model set's
  own). The result loads with ``StableDiffusionPipeline.from_pretrained(folder)``
  (no safety checker / feature extractor) and per component with
  ``UNet2DConditionModel`` / ``AutoencoderKL`` / ``CLIPTextModel.from_pretrained``.
  """
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  p = models.params
  for k in ("unet", "vae", "text_encoder"):
    if k not in p:
      raise KeyError(f"save_pretrained: models.params lacks {k!r} (has {sorted(p)})")
  unet_convert.save_unet_pretrained(p["unet"], models.unet_config, os.path.join(folder, "unet"))

  vae_dir = os.path.join(folder, "vae")
  os.makedirs(vae_dir, exist_ok=True)
  vae_cfg = vae_convert.config_to_diffusers(models.vae_config)
  vae_cfg["_diffusers_version"] = unet_convert.DIFFUSERS_VERSION
  _write_json(vae_cfg, os.path.join(vae_dir, "config.json"))
  common.write_safetensors(
    vae_convert.flax_to_torch(p["vae"]),
    os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"),
  )

  te_dir = os.path.join(folder, "text_encoder")
  os.makedirs(te_dir, exist_ok=True)
  text_config = clip_convert.config_to_transformers(models.text_config)
  _write_json(text_config, os.path.join(te_dir, "config.json"))
  common.write_safetensors(
    clip_convert.flax_to_torch(p["text_encoder"]), os.path.join(te_dir, "model.safetensors")
  )

  sched_dir = os.path.join(folder, "scheduler")
  os.makedirs(sched_dir, exist_ok=True)
  sched = dict(models.scheduler)
  sched.setdefault("_class_name", "PNDMScheduler")
  _write_json(sched, os.path.join(sched_dir, "scheduler_config.json"))

  index = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": unet_convert.DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "requires_safety_checker": False,
    "scheduler": ["diffusers", sched["_class_name"]],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
  }
  tok_src = os.fspath(tokenizer_path) if tokenizer_path is not None else models.tokenizer_path
  if tok_src is not None:
    tok_dir = os.path.join(folder, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
      src = os.path.join(tok_src, name)
      if os.path.isfile(src):
        if os.path.abspath(src) != os.path.abspath(os.path.join(tok_dir, name)):
          shutil.copyfile(src, os.path.join(tok_dir, name))
    has = lambda f: os.path.isfile(os.path.join(tok_dir, f))  # noqa: E731
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
      raise FileNotFoundError(
        f"save_pretrained: tokenizer folder {tok_src} has neither "
        "tokenizer.json nor vocab.json + merges.txt"
      )
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
  else:
    index["tokenizer"] = [None, None]
  _write_json(index, os.path.join(folder, "model_index.json"))
  return folder
