"""3DMM coefficient vectors: the D3DFR (257) and TGDM (261) layouts and their recombinations.

Layouts (FACTS.md "Deep3DFaceRecon (D3DFR) conventions"; TGDM Eq. 6):

* D3DFR, 257: identity 80 | expression 64 | texture 80 | angle 3 | gamma 27 | translation 3.
* TGDM, 261: identity 80 | expression 64 | texture 80 | gamma (illumination) 27 |
  pose 6 | gaze 4. TGDM does not spell out the order inside the 6 pose values; we take
  D3DFR's: angle 3 then translation 3.

:class:`Coeffs` holds the named parts (a pytree, with any leading batch/time axes);
``split``/``join`` convert to and from flat vectors of either layout. A D3DFR vector has
no gaze: ``split(x, D3DFR)`` gives zeros, and ``join(c, D3DFR)`` drops it.

The recombinations of TGDM section 4.2 and 4.4: :func:`reenact` (image/video driving),
:func:`swap` (face swapping), :func:`window_mean` (the video window of radius k) and
:func:`drive_video` (the two together for a driving video).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# (field, size) in vector order.
D3DFR = (
  ("identity", 80),
  ("expression", 64),
  ("texture", 80),
  ("angle", 3),
  ("gamma", 27),
  ("translation", 3),
)
TGDM = (
  ("identity", 80),
  ("expression", 64),
  ("texture", 80),
  ("gamma", 27),
  ("angle", 3),
  ("translation", 3),
  ("gaze", 4),
)
LAYOUTS = {"d3dfr": D3DFR, "tgdm": TGDM}

# TGDM 4.2: appearance comes from the source, motion from the driver.
APPEARANCE_FIELDS = ("identity", "texture", "gamma")
MOTION_FIELDS = ("expression", "angle", "translation", "gaze")
# TGDM 4.2 (video): the fields averaged over the window (expression and pose).
WINDOW_FIELDS = ("expression", "angle", "translation")


@dataclasses.dataclass(frozen=True)
class Coeffs:
  """Named 3DMM coefficients; every field has the same leading axes ``(...)``.

  Attributes:
    identity: (..., 80) alpha.
    expression: (..., 64) beta.
    texture: (..., 80) delta.
    gamma: (..., 27) SH illumination, 3 colours x 9 bands (reshaped (3, 9)).
    angle: (..., 3) rotation angles (x, y, z) in radians.
    translation: (..., 3).
    gaze: (..., 4) TGDM's gaze directions (zeros for a D3DFR vector).
  """

  identity: Any
  expression: Any
  texture: Any
  gamma: Any
  angle: Any
  translation: Any
  gaze: Any

  def replace(self, **fields) -> Coeffs:
    return dataclasses.replace(self, **fields)


jax.tree_util.register_dataclass(
  Coeffs, data_fields=[f.name for f in dataclasses.fields(Coeffs)], meta_fields=[]
)


def _layout(layout) -> tuple[tuple[str, int], ...]:
  if isinstance(layout, str):
    if layout not in LAYOUTS:
      raise ValueError(f"layout: unknown {layout!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout]
  return tuple(layout)


def layout_size(layout) -> int:
  return sum(size for _, size in _layout(layout))


def _xp(x):
  """numpy for host arrays (data pipelines stay off the accelerator), else jax.numpy."""
  return np if isinstance(x, (np.ndarray, np.generic)) else jnp


def split(x: jax.Array | np.ndarray, layout="d3dfr") -> Coeffs:
  """Splits (..., 257) D3DFR or (..., 261) TGDM vectors into named parts (views of
  ``x``: numpy in, numpy out; jax in, jax out)."""
  fields = _layout(layout)
  total = layout_size(fields)
  if x.shape[-1:] != (total,):
    raise ValueError(
      f"coefficients: last axis is {x.shape[-1:]} for layout {layout!r}, expected {total}"
    )
  parts, start = {}, 0
  for name, size in fields:
    parts[name] = x[..., start : start + size]
    start += size
  parts.setdefault("gaze", _xp(x).zeros(x.shape[:-1] + (4,), x.dtype))
  return Coeffs(**parts)


def join(c: Coeffs, layout="d3dfr") -> jax.Array | np.ndarray:
  """Concatenates named parts into the (..., 257) or (..., 261) vector of ``layout``."""
  parts = [getattr(c, name) for name, _ in _layout(layout)]
  xp = np if all(isinstance(p, (np.ndarray, np.generic)) for p in parts) else jnp
  return xp.concatenate(parts, axis=-1)


def reenact(source: Coeffs, driver: Coeffs) -> Coeffs:
  """TGDM 4.2 image driving: rho_hat = {alpha_s, beta_d, delta_s, gamma_s, p_d, omega_d}.

  Identity, texture and illumination from the source; expression, pose and gaze from
  the driver.
  """
  return Coeffs(
    identity=source.identity,
    expression=driver.expression,
    texture=source.texture,
    gamma=source.gamma,
    angle=driver.angle,
    translation=driver.translation,
    gaze=driver.gaze,
  )


def swap(source: Coeffs, target: Coeffs) -> Coeffs:
  """TGDM 4.4 face swapping: the identity of the source, everything else of the target."""
  return target.replace(identity=source.identity)


def window_weights(num_frames: int, radius: int) -> np.ndarray:
  """(F, F) row-stochastic matrix: row i averages frames max(0, i-k) .. min(F-1, i+k).

  At the sequence edges only the available neighbours are averaged (a window of
  radius 1 at frame 0 is the mean of frames 0 and 1).
  """
  if radius < 0:
    raise ValueError(f"radius: must be >= 0, got {radius}")
  idx = np.arange(num_frames)
  inside = np.abs(idx[:, None] - idx[None, :]) <= radius
  return inside / inside.sum(axis=1, keepdims=True)


def window_mean(
  frames: Coeffs, radius: int = 1, axis: int = 0, fields: tuple[str, ...] = WINDOW_FIELDS
) -> Coeffs:
  """TGDM 4.2 video driving: each frame's ``fields`` become the mean over the window
  rho_{i-k : i+k} of radius k (k = 1 in the paper) along the time ``axis``; other fields
  are kept per frame. Edges use the available neighbours (:func:`window_weights`)."""
  unknown = set(fields) - {f.name for f in dataclasses.fields(Coeffs)}
  if unknown:
    raise ValueError(f"fields: unknown coefficient field(s) {sorted(unknown)}")

  def smooth(x):
    w = window_weights(x.shape[axis], radius).astype(x.dtype)
    if _xp(x) is np:
      return np.moveaxis(np.tensordot(w, np.moveaxis(x, axis, 0), axes=1), 0, axis)
    frames = jnp.moveaxis(x, axis, 0)
    mean = jnp.tensordot(w, frames, axes=1, precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(mean, 0, axis)

  return frames.replace(**{name: smooth(getattr(frames, name)) for name in fields})


def drive_video(source: Coeffs, drivers: Coeffs, radius: int = 1, axis: int = 0) -> Coeffs:
  """TGDM 4.2 video driving: per frame i, the source's appearance (identity, texture,
  illumination) with the drivers' motion, expression and pose averaged over the window
  i-k .. i+k (:func:`window_mean`, k = ``radius``, 1 in the paper; edges use the
  available neighbours) and gaze of frame i.

  ``drivers`` has the time ``axis`` (e.g. (F, ...) or (B, F, ...)); ``source`` has the
  same leading axes without it ((), or (B,)) and is broadcast over the frames.
  """
  smoothed = window_mean(drivers, radius=radius, axis=axis)

  def over_frames(src, drv):
    xp = _xp(src) if _xp(drv) is np else jnp
    return xp.broadcast_to(xp.expand_dims(src, axis), drv.shape[:-1] + src.shape[-1:])

  source = jax.tree.map(over_frames, source, drivers)
  return reenact(source, smoothed)
