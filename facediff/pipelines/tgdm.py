"""TGDM inference: image-driven reenactment, video and audio driving, face swapping.

Every pipeline is ONE ``jax.jit`` program per (settings, shapes, steps): recombining the
3DMM coefficients (facediff.render.coeffs), rendering I_3d (TGDM Eq. 8), drawing the
initial noise from the key, the whole reverse trajectory (facediff.diffusion.sample,
one ``lax.scan``) and, for audio, EmoA2E. Params, the morphable model and the inputs are
arguments of the program, not constants, so one compilation serves every checkpoint.

* :meth:`TGDMPipeline.reenact` (TGDM 4.2, image driving): rho_hat = {alpha_s, beta_d,
  delta_s, gamma_s, p_d, omega_d}; the denoiser sees the source image (texture encoder),
  I_3d = R(rho_hat) and rho_hat.
* :meth:`TGDMPipeline.drive_video` (TGDM 4.2, video driving): per frame i the source's
  appearance with the driver's expression and pose averaged over the window i-k .. i+k
  (k = 1 in the paper; ``coeffs.drive_video``), every frame of the sequence one example
  of the batch. All frames start from the same x_T, so frame-to-frame differences come
  from the coefficients (facediff's choice; the paper does not say how it draws noise).
* :meth:`TGDMPipeline.drive_audio` (TGDM 4.2, Eq. 9-11): EmoA2E predicts the expression
  sequence from MFCC clips, the source's identity, an emotion text embedding and the
  intensity eta; pose comes from ``driver_pose`` (a coefficient sequence) or stays the
  source's (the paper predicts expression only); then as video.
* :meth:`TGDMPipeline.swap` (TGDM 4.4): rho = the source's identity, everything else of
  the target; the (swap-mode) denoiser sees the target with its face masked out, the
  identity embedding z_id, rho and I_3d.

Images are NHWC in [-1, 1]; coefficients are flat vectors in ``Settings.coeff_layout``
(257 D3DFR by default; rho is fed to the network in TGDM's 261 layout, as in training).
The sampler is DDPM over all T steps by default (TGDM 5.1); ``method="ddim"`` with fewer
``num_steps`` is the fast option.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp

from facediff.diffusion import make_schedule, sample
from facediff.models import emoa2e, tgdm
from facediff.render import bfm, coeffs, renderer

# apply_fn(config, params, x_t, t, cond) -> eps (models.tgdm.apply's signature).
ApplyFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sampler and rendering settings (hashable: part of the compiled program's key).

  ``schedule``/``num_train_timesteps``: the training noise schedule (TGDM: linear,
  1000). ``method``/``num_steps``: "ddpm" over all T steps (None) or "ddim" with fewer.
  ``clip_sample``: x0 predictions clipped to [-c, c] inside the sampler (DDPM's
  clip_denoised for pixel diffusion; None disables). ``render_window``: the rasteriser
  window (facediff.render.raster). ``coeff_layout``: layout of the coefficient inputs.
  """

  schedule: str = "linear"
  num_train_timesteps: int = 1000
  method: str = "ddpm"
  num_steps: int | None = None
  eta: float = 0.0
  clip_sample: float | None = 1.0
  render_window: int = 8
  coeff_layout: str = "d3dfr"

  def replace(self, **kw) -> Settings:
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class Result:
  """What a pipeline returns (a pytree; every field has the batch / frame axis first).

  Attributes:
    image: (B, H, W, 3) the generated image in [-1, 1].
    i3d: (B, H, W, 3) the rendered I_3d handed to the denoiser, in [-1, 1].
    mask: (B, H, W, 1) the rendered face's visibility (1 = face) of ``rho``.
    rho: (B, 261) the recombined coefficients rho_hat, TGDM layout.
    expression: (B, 64) the driving expression (EmoA2E's prediction for audio).
  """

  image: Any
  i3d: Any
  mask: Any
  rho: Any
  expression: Any


jax.tree_util.register_dataclass(
  Result, data_fields=[f.name for f in dataclasses.fields(Result)], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one program (hashable)."""

  model: tgdm.TGDMConfig
  settings: Settings
  apply_fn: ApplyFn | None = None

  def eps(self, params):
    f = self.apply_fn or tgdm.apply
    return lambda x, t, c: f(self.model, params, x, t, c)


def render_i3d(
  model: bfm.MorphableModel, c: coeffs.Coeffs, image_size: int, window: int
) -> tuple[jax.Array, jax.Array]:
  """TGDM Eq. 8: (I_3d in [-1, 1], face mask) of (B, ...) coefficients. I_3d is the
  renderer's lit albedo clipped to [0, 1] and mapped to [-1, 1] (-1 off the face),
  exactly as facediff.train.tgdm_task renders it for training."""
  out = renderer.render(model, c, image_size=image_size, window=window)
  return jnp.clip(out.image, 0.0, 1.0) * 2.0 - 1.0, out.mask


def _split(spec: _Spec, x: jax.Array) -> coeffs.Coeffs:
  return coeffs.split(jnp.asarray(x, jnp.float32), spec.settings.coeff_layout)


def _denoise(spec: _Spec, params, rho_hat: coeffs.Coeffs, morph, cond: dict, key, x_T=None):
  """Renders I_3d of ``rho_hat``, completes ``cond`` and runs the sampler from x_T
  (drawn from ``key`` when not given)."""
  s = spec.settings
  i3d, mask = render_i3d(morph, rho_hat, spec.model.image_size, s.render_window)
  cond = dict(cond, i3d=i3d, rho=coeffs.join(rho_hat, "tgdm"))
  k_noise, k_steps = jax.random.split(key)
  if x_T is None:
    x_T = jax.random.normal(k_noise, i3d.shape, jnp.float32)
  out = sample(
    spec.eps(params),
    make_schedule(s.schedule, s.num_train_timesteps),
    x_T,
    method=s.method,
    num_steps=s.num_steps,
    key=k_steps,
    eta=s.eta,
    clip_sample=s.clip_sample,
    cond=cond,
  )
  return Result(
    image=jnp.clip(out, -1.0, 1.0),
    i3d=i3d,
    mask=mask,
    rho=cond["rho"],
    expression=rho_hat.expression,
  )


@partial(jax.jit, static_argnames=("spec",))
def _reenact_program(spec: _Spec, params, morph, source_image, source_coeffs, driver_coeffs, key):
  rho_hat = coeffs.reenact(_split(spec, source_coeffs), _split(spec, driver_coeffs))
  return _denoise(spec, params, rho_hat, morph, {"source": source_image}, key)


def _video(spec: _Spec, params, morph, source, source_coeffs, drivers: coeffs.Coeffs, key, radius):
  """Frames of ``drivers`` (F, ...) with the source (H, W, 3) / (D,): one batch of F."""
  rho_hat = coeffs.drive_video(_split(spec, source_coeffs), drivers, radius=radius)
  frames = drivers.expression.shape[0]
  images = jnp.broadcast_to(source[None], (frames,) + source.shape)
  k_noise, k_rest = jax.random.split(key)
  x_T = jax.random.normal(k_noise, source.shape, jnp.float32)  # shared by every frame
  x_T = jnp.broadcast_to(x_T[None], images.shape)
  return _denoise(spec, params, rho_hat, morph, {"source": images}, k_rest, x_T)


@partial(jax.jit, static_argnames=("spec", "radius"))
def _video_program(spec: _Spec, params, morph, source, source_coeffs, driver_seq, key, radius):
  return _video(spec, params, morph, source, source_coeffs, _split(spec, driver_seq), key, radius)


@partial(jax.jit, static_argnames=("spec", "a2e", "radius"))
def _audio_program(
  spec: _Spec,
  a2e: emoa2e.EmoA2EConfig,
  params,
  a2e_params,
  morph,
  source,
  source_coeffs,
  mfcc_clips,
  emotion,
  intensity,
  driver_pose,
  key,
  radius,
):
  src = _split(spec, source_coeffs)
  extra = {}
  if a2e.emotion:
    extra = {
      "emotion": jnp.asarray(emotion, jnp.float32)[None],
      "intensity": jnp.asarray(intensity, jnp.float32).reshape(1),
    }
  beta = emoa2e.apply(a2e, a2e_params, mfcc_clips[None], src.identity[None], **extra)[0]
  frames = beta.shape[0]
  if driver_pose is None:  # the source's pose on every frame
    drivers = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (frames,) + x.shape), src)
  else:
    drivers = _split(spec, driver_pose)
  drivers = drivers.replace(expression=beta.astype(jnp.float32))
  return _video(spec, params, morph, source, source_coeffs, drivers, key, radius)


@partial(jax.jit, static_argnames=("spec",))
def _swap_program(
  spec: _Spec, params, morph, source_coeffs, target_image, target_coeffs, z_id, target_mask, key
):
  tgt = _split(spec, target_coeffs)
  rho = coeffs.swap(_split(spec, source_coeffs), tgt)
  if target_mask is None:  # the target's rendered face
    _, target_mask = render_i3d(morph, tgt, spec.model.image_size, spec.settings.render_window)
  cond = {"source": target_image, "source_mask": target_mask, "id": z_id}
  return _denoise(spec, params, rho, morph, cond, key)


class TGDMPipeline:
  """TGDM inference over one denoiser config and one morphable model.

  ``params``: the denoiser's params (``models.tgdm``; reenact mode for reenact / video /
  audio, swap mode for swap). ``morphable_model``: the BFM (or the synthetic model) the
  training rendered I_3d with. ``apply_fn``: replaces ``models.tgdm.apply`` (same
  signature), e.g. for tests. Per call, ``method`` / ``num_steps`` override the settings
  (each combination is its own compiled program, cached by jax.jit).
  """

  def __init__(
    self,
    config: tgdm.TGDMConfig,
    morphable_model: bfm.MorphableModel,
    settings: Settings = Settings(),
    *,
    emoa2e_config: emoa2e.EmoA2EConfig | None = None,
    apply_fn: ApplyFn | None = None,
  ):
    self.config = config
    self.morphable_model = morphable_model
    self.settings = settings
    self.emoa2e_config = emoa2e_config
    self.apply_fn = apply_fn

  def _spec(self, mode: str, method: str | None, num_steps: int | None, **kw) -> _Spec:
    if self.config.mode != mode:
      raise ValueError(
        f"TGDMPipeline: this pipeline's model is in {self.config.mode!r} mode; "
        f"this call needs a {mode!r} model (TGDMConfig.mode)"
      )
    s = self.settings
    if method is not None:
      s = s.replace(method=method, num_steps=num_steps)
    elif num_steps is not None:
      s = s.replace(num_steps=num_steps)
    return _Spec(self.config, s, self.apply_fn)

  def _check_image(self, name: str, x, batched: bool = True):
    size, ch = self.config.image_size, self.config.image_channels
    want = (size, size, ch)
    if tuple(x.shape[-3:]) != want or x.ndim != (4 if batched else 3):
      lead = "(B, " if batched else "("
      raise ValueError(f"{name}: shape {tuple(x.shape)}, expected {lead}{size}, {size}, {ch})")

  def reenact(
    self, params, source_image, source_coeffs, driver_coeffs, key, *, method=None, num_steps=None
  ) -> Result:
    """TGDM 4.2 image driving: (B, H, W, 3) sources, (B, D) source and driver
    coefficients -> the source's face with the driver's expression and pose."""
    self._check_image("source_image", source_image)
    spec = self._spec("reenact", method, num_steps)
    return _reenact_program(
      spec, params, self.morphable_model, source_image, source_coeffs, driver_coeffs, key
    )

  def drive_video(
    self,
    params,
    source,
    source_coeffs,
    driver_coeff_sequence,
    key,
    radius: int = 1,
    *,
    method=None,
    num_steps=None,
  ) -> Result:
    """TGDM 4.2 video driving: one source (H, W, 3) with its (D,) coefficients, a driver
    sequence (F, D) -> F frames, frame i driven by the window i-radius .. i+radius."""
    self._check_image("source", source, batched=False)
    spec = self._spec("reenact", method, num_steps)
    return _video_program(
      spec, params, self.morphable_model, source, source_coeffs, driver_coeff_sequence, key, radius
    )

  def drive_audio(
    self,
    params,
    emoa2e_params,
    source,
    source_coeffs,
    mfcc_clips,
    key,
    *,
    emotion=None,
    intensity: float = 1.0,
    driver_pose=None,
    radius: int = 1,
    method=None,
    num_steps=None,
  ) -> Result:
    """TGDM 4.2 audio driving: MFCC clips (F, clip_frames, n_mfcc) (facediff.audio),
    the emotion text embedding (text_dim,) and intensity eta (Eq. 9) -> EmoA2E's
    expression sequence (F, 64) -> F frames as :meth:`drive_video`. ``driver_pose``
    (F, D): coefficients whose pose and gaze drive the frames (default: the source's)."""
    if self.emoa2e_config is None:
      raise ValueError("TGDMPipeline.drive_audio: construct the pipeline with emoa2e_config")
    self._check_image("source", source, batched=False)
    a2e = self.emoa2e_config
    if a2e.emotion and emotion is None:
      raise ValueError("drive_audio: the emotional EmoA2E needs an emotion embedding")
    spec = self._spec("reenact", method, num_steps)
    return _audio_program(
      spec,
      a2e,
      params,
      emoa2e_params,
      self.morphable_model,
      source,
      source_coeffs,
      mfcc_clips,
      emotion,
      intensity,
      driver_pose,
      key,
      radius,
    )

  def swap(
    self,
    params,
    source_image,
    source_coeffs,
    target_image,
    target_coeffs,
    identity_embedding,
    key,
    *,
    target_mask=None,
    method=None,
    num_steps=None,
  ) -> Result:
    """TGDM 4.4 face swap: the source's identity on the target. ``identity_embedding``
    (B, id_dim) is the source's z_id (CurricularFace in the paper); the source image
    enters only through it and ``source_coeffs`` (it is checked, not fed to the
    denoiser). ``target_mask`` (B, H, W, 1), 1 = face to regenerate (TGDM's "Small"
    mask); default: the target's rendered face."""
    self._check_image("source_image", source_image)
    self._check_image("target_image", target_image)
    spec = self._spec("swap", method, num_steps)
    return _swap_program(
      spec,
      params,
      self.morphable_model,
      source_coeffs,
      target_image,
      target_coeffs,
      identity_embedding,
      target_mask,
      key,
    )
