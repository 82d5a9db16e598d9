"""The Stable Diffusion 1.x model set: three networks' configs and params, plus the
scheduler settings SD was trained and sampled with.

A leaf module: both checkpoint readers (``facediff.convert.pipeline`` for diffusers
folders, ``facediff.convert.compvis`` for single files) produce an ``SDModels``, and
``facediff.pipelines`` consumes one, without either reader importing the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from facediff.models.clip import CLIPTextConfig
from facediff.models.unet import UNetConfig
from facediff.models.vae import VAEConfig

# SD-1.x's scheduler/scheduler_config.json (PNDM, scaled_linear betas).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
  "_class_name": "PNDMScheduler",
  "beta_start": 0.00085,
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "num_train_timesteps": 1000,
  "set_alpha_to_one": False,
  "skip_prk_steps": True,
  "steps_offset": 1,
  "prediction_type": "epsilon",
  "timestep_spacing": "leading",
  "trained_betas": None,
  "clip_sample": False,
}


@dataclasses.dataclass
class SDModels:
  """A Stable Diffusion model set in facediff form.

  ``params`` = {"unet": ..., "vae": ..., "text_encoder": ...}, each a nested dict of
  float32 arrays. ``tokenizer_path``: folder with CLIP's vocab.json/merges.txt, or
  None (a CompVis single file carries no tokenizer). ``scheduler``: the diffusers
  scheduler config (SD's PNDM one when the source has none).
  """

  unet_config: UNetConfig
  vae_config: VAEConfig
  text_config: CLIPTextConfig
  params: dict[str, Any]
  tokenizer_path: str | None = None
  scheduler: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(SD_SCHEDULER_CONFIG))
