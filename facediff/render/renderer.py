"""TGDM Eq. 8: I_3d = R(S, T, gamma, p), the rendered 3DMM face, from coefficients.

:func:`reconstruct` runs D3DFR's ``compute_for_render`` (shape, pose, camera, albedo,
normals, SH lighting, landmarks); :func:`render` adds the rasteriser and returns the
rendered image, its face mask and the 68 landmarks. Both are pure, batched and jitted;
the morphable model is an argument (a pytree), not a compile-time constant.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from facediff.render import mesh, raster
from facediff.render.bfm import MorphableModel
from facediff.render.coeffs import Coeffs


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """The posed, lit mesh of a batch of coefficients.

  Attributes:
    vertices: (B, N, 3) posed vertices in the model frame (p' = R S + t).
    xy: (B, N, 2) pixel coordinates (col, row) of the vertices.
    depth: (B, N) camera depth Z = distance - z'.
    albedo: (B, N, 3) albedo in [0, 1]-ish units.
    colors: (B, N, 3) SH-lit vertex colours (D3DFR's ``face_color``).
    landmarks: (B, 68, 2) projected keypoints, pixel coordinates (col, row).
  """

  vertices: Any
  xy: Any
  depth: Any
  albedo: Any
  colors: Any
  landmarks: Any


@dataclasses.dataclass(frozen=True)
class Rendering:
  """The rendered face.

  Attributes:
    image: (B, H, W, 3) I_3d, the lit albedo; 0 outside the face.
    mask: (B, H, W, 1) float, 1 where the face is visible.
    landmarks: (B, 68, 2) projected keypoints in the image's pixel coordinates (col, row).
    triangle_id: (B, H, W) int32 visible triangle per pixel, -1 for background.
    overflow: (B,) triangles larger than the rasteriser window (0: image complete).
  """

  image: Any
  mask: Any
  landmarks: Any
  triangle_id: Any
  overflow: Any


for _cls in (Reconstruction, Rendering):
  jax.tree_util.register_dataclass(
    _cls, data_fields=[f.name for f in dataclasses.fields(_cls)], meta_fields=[]
  )


def reconstruct(model: MorphableModel, coeffs: Coeffs, camera: mesh.Camera) -> Reconstruction:
  """D3DFR ``compute_for_render`` for (B, ...) coefficients (gaze is not rendered)."""
  shape = mesh.face_shape(model, coeffs.identity, coeffs.expression)
  rotation = mesh.rotation_matrix(coeffs.angle)
  posed = mesh.rigid_transform(shape, rotation, coeffs.translation)
  albedo = mesh.face_albedo(model, coeffs.texture)
  # D3DFR lights the unposed shape's normals after rotating them with the pose.
  normal = mesh.rotate(mesh.normals(model, shape), rotation)
  uv = mesh.project(posed, camera)
  return Reconstruction(
    vertices=posed,
    xy=mesh.to_pixels(uv, camera),
    depth=camera.distance - posed[..., 2],
    albedo=albedo,
    colors=mesh.shade(albedo, normal, coeffs.gamma),
    landmarks=mesh.landmarks(model, posed, camera),
  )


@functools.partial(jax.jit, static_argnames=("image_size", "window", "nvdiffrast_centres"))
def render(
  model: MorphableModel,
  coeffs: Coeffs,
  image_size: int = mesh.D3DFR_IMAGE_SIZE,
  window: int = raster.DEFAULT_WINDOW,
  nvdiffrast_centres: bool = False,
) -> Rendering:
  """I_3d (TGDM Eq. 8) at ``image_size`` (224: D3DFR's camera; 256: scaled for TGDM).

  ``window``: the rasteriser's per-triangle block (see facediff.render.raster); the
  default suits a BFM-size mesh at 224-256 px; check ``Rendering.overflow``.
  ``nvdiffrast_centres`` samples pixel (r, c) at u = c + 0.5, v = S - 0.5 - r, as
  D3DFR's nvdiffrast renderer does, instead of at the landmarks' integer centres
  (u = c, v = S - 1 - r); the image then sits half a pixel off its landmarks, as in D3DFR.
  """
  camera = mesh.camera_for_size(image_size)
  rec = reconstruct(model, coeffs, camera)
  return render_reconstruction(
    rec, model.triangles, image_size, window, nvdiffrast_centres, camera.z_near, camera.z_far
  )


def render_reconstruction(
  rec: Reconstruction,
  triangles: jax.Array,
  image_size: int,
  window: int = raster.DEFAULT_WINDOW,
  nvdiffrast_centres: bool = False,
  z_near: float = mesh.D3DFR_Z_NEAR,
  z_far: float = mesh.D3DFR_Z_FAR,
) -> Rendering:
  """Rasterises and shades a :class:`Reconstruction` made for an ``image_size`` camera
  (the second half of :func:`render`; the size and planes are static)."""
  xy = rec.xy
  if nvdiffrast_centres:
    xy = xy + jnp.asarray([-0.5, 0.5], xy.dtype)
  fragments = raster.rasterize(xy, rec.depth, triangles, image_size, window, z_near, z_far)
  image, mask = raster.interpolate(fragments, xy, rec.depth, triangles, rec.colors)
  return Rendering(
    image=image,
    mask=mask,
    landmarks=rec.landmarks,
    triangle_id=fragments.triangle_id,
    overflow=fragments.overflow,
  )
