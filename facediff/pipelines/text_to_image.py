"""Stable Diffusion text-to-image: prompts -> CLIP -> PNDM with classifier-free guidance
-> VAE decode -> uint8 images -> PNG files.

Everything after tokenisation is ONE ``jax.jit`` program per (batch, height, width,
steps) shape: text encoding of the prompts and of the empty prompt, drawing the
initial latent from the key, the whole PNDM trajectory (one ``lax.scan``, the
conditional and unconditional UNet calls batched together) and the VAE decode.
Parameters and the guidance scale are arguments of that program, not constants, so
one compilation serves every checkpoint of the same shapes and every guidance scale.

CLI::

    python -m facediff.pipelines.text_to_image --model DIR_OR_CKPT --prompt "a photo of a face" \\
        --out OUT_DIR [--steps 50] [--guidance 7.5] [--seed 0] [--height 512] [--width 512]
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from facediff import cli
from facediff.diffusion import samplers, schedules
from facediff.models import clip as clip_lib
from facediff.models import unet as unet_lib
from facediff.models import vae as vae_lib
from facediff.models.clip import CLIPTextModel, CLIPTokenizer
from facediff.models.stable_diffusion import SDModels
from facediff.models.unet import UNet2DConditionModel
from facediff.models.vae import AutoencoderKL


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """PNDM settings taken from the model's scheduler config (diffusers field names)."""

  beta_schedule: str = "scaled_linear"
  beta_start: float = 0.00085
  beta_end: float = 0.012
  num_train_timesteps: int = 1000
  steps_offset: int = 1
  set_alpha_to_one: bool = False
  skip_prk_steps: bool = True
  timestep_spacing: str = "leading"

  @classmethod
  def from_scheduler_config(cls, d: dict[str, Any]) -> "SamplerSettings":
    if d.get("prediction_type", "epsilon") != "epsilon":
      raise ValueError(
        f"scheduler config: prediction_type {d['prediction_type']!r} is not supported "
        "(only 'epsilon')"
      )
    if d.get("trained_betas") is not None:
      raise ValueError("scheduler config: trained_betas is not supported")
    kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
    return cls(**kw)

  def schedule(self) -> schedules.NoiseSchedule:
    return schedules.make_schedule(
      self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end
    )


def to_uint8(images: jax.Array) -> jax.Array:
  """VAE output in [-1, 1] -> uint8 in [0, 255]: round(clip(x / 2 + 0.5, 0, 1) * 255),
  as diffusers' image post-processing does."""
  return jnp.round(jnp.clip(images / 2 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about the program: model shapes and sampler settings (hashable)."""

  text: Any
  unet: Any
  vae: Any
  settings: SamplerSettings


def _denoise_and_decode(
  spec: _Spec, params, ids, uncond_ids, latents, guidance_scale, num_steps: int, guided: bool
):
  """ids (B, 77), uncond_ids (1, 77), latents x_T (B, h, w, C) -> float images (B, H, W, 3)."""
  text, unet, vae = (
    CLIPTextModel(spec.text),
    UNet2DConditionModel(spec.unet),
    AutoencoderKL(spec.vae),
  )
  ctx, _ = text.apply({"params": params["text_encoder"]}, ids)
  uctx = text.apply({"params": params["text_encoder"]}, uncond_ids)[0] if guided else None

  def eps_fn(x, t, c):
    return unet.apply({"params": params["unet"]}, x, t, c)

  s = spec.settings
  z0 = samplers.sample(
    eps_fn,
    s.schedule(),
    latents,
    method="pndm",
    num_steps=num_steps,
    steps_offset=s.steps_offset,
    timestep_spacing=s.timestep_spacing,
    set_alpha_to_one=s.set_alpha_to_one,
    skip_prk_steps=s.skip_prk_steps,
    cond=ctx,
    uncond=uctx,
    guidance_scale=guidance_scale if guided else None,
  )
  return vae.apply({"params": params["vae"]}, z0, method=vae.decode_latents)


def latent_shape(spec: _Spec, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
  f = spec.vae.downsample_factor
  if height % f or width % f:
    raise ValueError(f"height/width ({height}, {width}) must be multiples of the VAE factor {f}")
  return (batch, height // f, width // f, spec.unet.out_channels)


@partial(jax.jit, static_argnames=("spec", "num_steps", "guided"))
def _from_latents(spec, params, ids, uncond_ids, latents, guidance_scale, *, num_steps, guided):
  return _denoise_and_decode(
    spec, params, ids, uncond_ids, latents, guidance_scale, num_steps, guided
  )


@partial(jax.jit, static_argnames=("spec", "height", "width", "num_steps", "guided"))
def _from_key(
  spec, params, ids, uncond_ids, key, guidance_scale, *, height, width, num_steps, guided
):
  """The whole text-to-image program after tokenisation: noise from ``key``, CLIP,
  guided PNDM, VAE decode, uint8."""
  latents = jax.random.normal(key, latent_shape(spec, ids.shape[0], height, width), jnp.float32)
  images = _denoise_and_decode(
    spec, params, ids, uncond_ids, latents, guidance_scale, num_steps, guided
  )
  return to_uint8(images)


def abstract_params(spec: _Spec) -> dict[str, Any]:
  """Shapes of the three models' params, boxed with their logical axes (no memory)."""
  return {
    "unet": unet_lib.abstract_params(spec.unet),
    "vae": vae_lib.abstract_params(spec.vae),
    "text_encoder": clip_lib.abstract_params(spec.text),
  }


def lower(
  spec: _Spec,
  params: Any,
  batch: int,
  *,
  height: int = 512,
  width: int = 512,
  num_steps: int = 50,
  guided: bool = True,
):
  """The text-to-image program lowered for one shape, ahead of time. ``params`` may be
  abstract (``abstract_params(spec)``, unboxed) so that SD-sized programs can be
  lowered and compiled (``.compile()``: memory / FLOPs) before any weights are loaded."""
  n = spec.text.max_position_embeddings
  ids = jax.ShapeDtypeStruct((batch, n), jnp.int32)
  uids = jax.ShapeDtypeStruct((1, n), jnp.int32)
  return _from_key.lower(
    spec,
    params,
    ids,
    uids,
    jax.random.key(0),
    jnp.float32(7.5),
    height=height,
    width=width,
    num_steps=num_steps,
    guided=guided,
  )


class TextToImage:
  """Text-to-image sampler over a facediff Stable Diffusion model set.

  ``pipe(prompts, key)`` returns uint8 images (B, H, W, 3). The same key gives the
  same images; the initial latent is ``normal(key, (B, H/f, W/f, C))``. Compiled
  programs are cached per (model shapes, sampler settings, batch, H, W, steps), so
  a second TextToImage over the same shapes reuses them.

  With a ``mesh`` (``facediff.partitioning.make_mesh``) the params are placed by the
  logical-axis rules (FSDP over ``fsdp``) and the prompt batch is split over the
  batch axes when it divides; the program is the same single jit.
  """

  def __init__(self, models: SDModels, tokenizer: CLIPTokenizer | None = None, mesh=None):
    self.models = models
    if tokenizer is None:
      if models.tokenizer_path is None:
        raise ValueError(
          "TextToImage: the model set has no tokenizer folder (a CompVis file has none); "
          "pass tokenizer= (CLI: --tokenizer DIR)"
        )
      tokenizer = CLIPTokenizer(
        models.tokenizer_path, max_length=models.text_config.max_position_embeddings
      )
    self.tokenizer = tokenizer
    self.spec = _Spec(
      models.text_config,
      models.unet_config,
      models.vae_config,
      SamplerSettings.from_scheduler_config(models.scheduler),
    )
    self.mesh = mesh
    if mesh is None:
      self.params = jax.tree.map(jnp.asarray, models.params)
    else:
      from facediff import partitioning  # noqa: PLC0415

      self.params = partitioning.shard_params(models.params, abstract_params(self.spec), mesh)

  def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    return latent_shape(self.spec, batch, height, width)

  # -------------------------------------------------------------------- placement

  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    from facediff import partitioning  # noqa: PLC0415

    return partitioning.activation_rules(self.mesh)

  def _put_batch(self, x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if self.mesh is None:
      return x
    from facediff import partitioning  # noqa: PLC0415

    sh = partitioning.batch_sharding(self.mesh, x.ndim)
    spec0 = sh.spec[0]
    axes = () if spec0 is None else ((spec0,) if isinstance(spec0, str) else tuple(spec0))
    size = int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1
    if x.shape[0] % size:
      sh = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(x, sh)

  # -------------------------------------------------------------------- user API

  def tokenize(
    self, prompts: str | Sequence[str], negative_prompt: str = ""
  ) -> tuple[np.ndarray, np.ndarray]:
    ids = self.tokenizer(prompts)
    return ids, self.tokenizer([negative_prompt])

  def __call__(
    self,
    prompts: str | Sequence[str],
    key: jax.Array,
    *,
    height: int = 512,
    width: int = 512,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
  ) -> np.ndarray:
    """Prompts -> uint8 images (B, H, W, 3). Guidance is off when guidance_scale <= 1
    (as in diffusers); the unconditional prompt is ``negative_prompt`` (empty)."""
    self.latent_shape(1, height, width)
    ids, uids = self.tokenize(prompts, negative_prompt)
    with self._context():
      out = _from_key(
        self.spec,
        self.params,
        self._put_batch(ids),
        jnp.asarray(uids),
        key,
        jnp.float32(guidance_scale),
        height=height,
        width=width,
        num_steps=int(num_steps),
        guided=guidance_scale > 1.0,
      )
    return np.asarray(out)

  def from_latents(
    self,
    prompts: str | Sequence[str],
    latents: jax.Array,
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
  ) -> np.ndarray:
    """Like ``__call__`` with a given initial latent x_T (B, h, w, C); returns the
    float images in [0, 1] (before uint8 rounding), for comparisons."""
    ids, uids = self.tokenize(prompts, negative_prompt)
    with self._context():
      images = _from_latents(
        self.spec,
        self.params,
        self._put_batch(ids),
        jnp.asarray(uids),
        self._put_batch(latents),
        jnp.float32(guidance_scale),
        num_steps=int(num_steps),
        guided=guidance_scale > 1.0,
      )
    return np.asarray(jnp.clip(images / 2 + 0.5, 0.0, 1.0))

  def lowered(
    self,
    batch: int,
    *,
    height: int = 512,
    width: int = 512,
    num_steps: int = 50,
    guided: bool = True,
  ):
    """The jitted program lowered for one shape (``.compile()`` it to inspect memory/FLOPs)."""
    with self._context():
      return lower(
        self.spec,
        self.params,
        batch,
        height=height,
        width=width,
        num_steps=num_steps,
        guided=guided,
      )


def save_png(images: np.ndarray, out_dir: str | os.PathLike, prefix: str = "image") -> list[str]:
  """Writes uint8 (B, H, W, 3) images as ``<out_dir>/<prefix>_<i>.png``; returns the paths."""
  from PIL import Image  # noqa: PLC0415

  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(
      f"save_png: expected uint8 (B, H, W, 3) images, got {images.dtype} {images.shape}"
    )
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, im in enumerate(images):
    p = os.path.join(out_dir, f"{prefix}_{i:04d}.png")
    Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(p)
    paths.append(p)
  return paths


PROG = "python -m facediff.pipelines.text_to_image"


def main(argv: Sequence[str] | None = None) -> list[str]:
  """The CLI; returns the written paths. A user's mistake (a --model that is not an
  SD-1.x folder or file, a missing tokenizer, a bad size, an --out that is a file)
  exits with status 2 and one line naming it (``facediff.cli``); nothing is written."""
  ap = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  ap.add_argument(
    "--model", required=True, help="diffusers SD folder, or a CompVis .ckpt/.safetensors file"
  )
  ap.add_argument(
    "--tokenizer", default=None, help="CLIP tokenizer folder (needed with a CompVis file)"
  )
  ap.add_argument("--prompt", required=True, action="append", help="prompt; repeat for a batch")
  ap.add_argument("--out", required=True, help="output folder for PNG files")
  ap.add_argument("--num-images", type=int, default=1, help="images per prompt")
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--guidance", type=float, default=7.5)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--height", type=int, default=512)
  ap.add_argument("--width", type=int, default=512)
  ap.add_argument("--negative-prompt", default="")
  ap.add_argument(
    "--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype"
  )
  args = ap.parse_args(argv)

  from facediff.convert.pipeline import load_models  # noqa: PLC0415

  prompts = [p for p in args.prompt for _ in range(args.num_images)]
  try:  # the inputs, read and checked before anything is compiled or written
    cli.check_output_dir(args.out, "--out")
    for flag, value in (("--num-images", args.num_images), ("--steps", args.steps)):
      if value < 1:
        raise ValueError(f"{flag} {value}: must be >= 1")
    kwargs: dict[str, Any] = {"dtype": args.dtype}
    if os.path.isfile(args.model) and args.tokenizer:
      kwargs["tokenizer_path"] = args.tokenizer
    try:
      models = load_models(args.model, **kwargs)
    except cli.INPUT_ERRORS as e:
      sys.exit(cli.fail(PROG, f"--model {args.model}: {cli.one_line(e)}"))
    tok = CLIPTokenizer(args.tokenizer) if args.tokenizer else None
    pipe = TextToImage(models, tokenizer=tok)
    pipe.latent_shape(1, args.height, args.width)
    pipe.tokenize(prompts, args.negative_prompt)
  except cli.INPUT_ERRORS as e:
    sys.exit(cli.fail(PROG, e))
  images = pipe(
    prompts,
    jax.random.key(args.seed),
    height=args.height,
    width=args.width,
    num_steps=args.steps,
    guidance_scale=args.guidance,
    negative_prompt=args.negative_prompt,
  )
  try:
    paths = save_png(images, args.out)
  except OSError as e:
    sys.exit(cli.fail(PROG, e))
  for p in paths:
    print(p)
  return paths


if __name__ == "__main__":
  main()
