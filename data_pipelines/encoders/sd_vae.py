"""Stable Diffusion VAE latents of the dataset image, computed in JAX.

Uses facediff's Flax ``AutoencoderKL`` (``facediff.models.vae``) with weights read
from a diffusers folder by ``facediff.convert.pipeline.load_vae``: either the VAE
folder itself (``config.json`` + ``diffusion_pytorch_model.*``) or a pipeline folder
with a ``vae/`` subfolder. The stored latent is the posterior mean times the
scaling factor (the UNet's latent), (h, w, C) with h = image_size / 2^(levels-1).
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines.encoders import Encoder, Field, WeightsError, register


def _vae_folder(path: str) -> str:
  if os.path.exists(os.path.join(path, "config.json")):
    return path
  if os.path.exists(os.path.join(path, "vae", "config.json")):
    return os.path.join(path, "vae")
  raise WeightsError(f"--latents {path}: no config.json there or in its vae/ subfolder")


@register("sd_vae")
class SDVAE(Encoder):
  version = "facediff-vae/mean*scaling"
  crop = "image"
  weight_keys = ("latents",)
  batch_size = 8

  def __init__(self, weights=None, **options):
    super().__init__(weights, **options)
    import jax

    from facediff.convert.pipeline import load_vae
    from facediff.models.vae import AutoencoderKL

    folder = _vae_folder(self.weights["latents"])
    self.weights["latents"] = folder  # what is read (and hashed for provenance)
    self.config, params = load_vae(folder)
    self.folder = folder
    self.model = AutoencoderKL(self.config)
    self.params = jax.device_put(params)
    model = self.model

    @jax.jit
    def enc(p, x):
      return model.apply({"params": p}, x, method=model.encode_latents)

    self._enc = enc
    size = int(self.options.get("image_size", 256))
    down = self.config.downsample_factor
    if size % down:
      raise WeightsError(
        f"--image-size {size} is not divisible by the VAE's downsampling {down} ({folder})"
      )
    self._shape = (size // down, size // down, self.config.latent_channels)

  def output_fields(self):
    return {"latent": Field("float32", self._shape)}

  def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
    x = np.asarray(batch, np.float32) / 127.5 - 1.0
    return {"latent": np.asarray(self._enc(self.params, x), np.float32)}
