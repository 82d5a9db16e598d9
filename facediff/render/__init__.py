"""TGDM's differentiable 3DMM renderer in plain JAX (no Flax, no parameters).

I_3d = R(S, T, gamma, p) (TGDM Eq. 8) in Deep3DFaceRecon's conventions (FACTS.md):

* :mod:`~facediff.render.bfm`: ``BFM_model_front.mat`` loader/writer and a synthetic
  stand-in model in the same format.
* :mod:`~facediff.render.coeffs`: the 257 (D3DFR) and 261 (TGDM) coefficient layouts,
  and the reenactment / swap / video-window recombinations.
* :mod:`~facediff.render.mesh`: shape, albedo, normals, pose, SH lighting, camera,
  landmarks.
* :mod:`~facediff.render.raster`: the rasteriser (binned z-buffer, differentiable
  perspective-correct interpolation).
* :mod:`~facediff.render.renderer`: coefficients -> image, mask and landmarks.
"""

from facediff.render.bfm import MorphableModel, load_bfm, save_bfm_mat, synthetic_bfm
from facediff.render.coeffs import Coeffs, drive_video, join, reenact, split, swap, window_mean
from facediff.render.mesh import Camera, camera_for_size
from facediff.render.raster import Fragments, interpolate, rasterize
from facediff.render.renderer import (
  Reconstruction,
  Rendering,
  reconstruct,
  render,
  render_reconstruction,
)

__all__ = [
  "Camera",
  "Coeffs",
  "Fragments",
  "MorphableModel",
  "Reconstruction",
  "Rendering",
  "camera_for_size",
  "drive_video",
  "interpolate",
  "join",
  "load_bfm",
  "rasterize",
  "reconstruct",
  "reenact",
  "render",
  "render_reconstruction",
  "save_bfm_mat",
  "split",
  "swap",
  "synthetic_bfm",
  "window_mean",
]
