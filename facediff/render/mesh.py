"""3DMM geometry, lighting and camera in D3DFR's conventions (plain jnp, batched).

Every formula follows FACTS.md "Deep3DFaceRecon (D3DFR) conventions", i.e. D3DFR's
``models/bfm.py:ParametricFaceModel`` (TGDM Eq. 7-8). Leading axes ``(B,)`` are batch;
vertex arrays are (B, N, 3).

Coordinates: the model lives in a right-handed frame with y up and the face looking
towards +z. After the pose, the camera sits at z = 10 looking down -z, so a point's
camera depth is Z = 10 - z'. The image coordinates (u, v) of D3DFR have v up; pixel
coordinates here are (col, row) = (u, S - 1 - v) for an S x S image, with pixel
centres at integers (FACTS.md: row = 223 - v at 224).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from facediff.render.bfm import MorphableModel

# D3DFR's camera at its 224 x 224 crop.
D3DFR_IMAGE_SIZE = 224
D3DFR_FOCAL = 1015.0
D3DFR_CENTER = 112.0
D3DFR_CAMERA_DISTANCE = 10.0
# D3DFR's nvdiffrast renderer clips to these camera depths (its z_near, z_far options).
D3DFR_Z_NEAR = 5.0
D3DFR_Z_FAR = 15.0
# D3DFR's default illumination, added to gamma's 9 bands of each colour.
INIT_LIGHT = (0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's eps, as in D3DFR
# Full float32 products even where the backend defaults to lower-precision matmuls
# (TF32 on GPUs): a 1e-3 relative error in the shape would move pixels.
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Camera:
  """A pinhole camera in D3DFR's form: u = focal X / Z + center, v likewise (v up).

  A pytree of numbers, so one compiled function serves every image size; the
  rasteriser takes the size (and the clip planes) separately, as static values.
  """

  image_size: int = D3DFR_IMAGE_SIZE
  focal: float = D3DFR_FOCAL
  center: float = D3DFR_CENTER
  distance: float = D3DFR_CAMERA_DISTANCE
  z_near: float = D3DFR_Z_NEAR
  z_far: float = D3DFR_Z_FAR


jax.tree_util.register_dataclass(
  Camera, data_fields=[f.name for f in dataclasses.fields(Camera)], meta_fields=[]
)


def camera_for_size(image_size: int) -> Camera:
  """D3DFR's 224-px camera scaled to an ``image_size`` crop (TGDM renders at 256).

  Scaling focal and centre by S / 224 scales every projected point by the same factor,
  so a 256-px render is the 224-px one resampled.
  """
  s = image_size / D3DFR_IMAGE_SIZE
  return Camera(image_size=image_size, focal=D3DFR_FOCAL * s, center=D3DFR_CENTER * s)


def face_shape(model: MorphableModel, identity: jax.Array, expression: jax.Array) -> jax.Array:
  """TGDM Eq. 7 / D3DFR ``compute_shape``: S = mean + B_id alpha + B_exp beta, (B, N, 3)."""
  offsets = jnp.matmul(identity, model.id_base.T, precision=_HIGHEST) + jnp.matmul(
    expression, model.exp_base.T, precision=_HIGHEST
  )
  return model.mean_shape + offsets.reshape(offsets.shape[:-1] + (-1, 3))


def face_albedo(model: MorphableModel, texture: jax.Array) -> jax.Array:
  """TGDM Eq. 7 / D3DFR ``compute_texture``: T = (mean + B_t delta) / 255, (B, N, 3)."""
  tex = jnp.matmul(texture, model.tex_base.T, precision=_HIGHEST)
  return (model.mean_tex + tex.reshape(tex.shape[:-1] + (-1, 3))) / 255.0


def _normalize(v: jax.Array) -> jax.Array:
  """v / max(|v|, eps), as torch.nn.functional.normalize (a zero vector stays zero)."""
  norm = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))
  return v / jnp.maximum(norm, _NORMALIZE_EPS)


def face_normals(vertices: jax.Array, triangles: jax.Array) -> jax.Array:
  """D3DFR ``compute_norm``: normalize(cross(v1 - v2, v2 - v3)) per triangle, (B, T, 3)."""
  v1, v2, v3 = (vertices[..., triangles[:, i], :] for i in range(3))
  return _normalize(jnp.cross(v1 - v2, v2 - v3))


def vertex_normals(face_normal: jax.Array, point_buf: jax.Array) -> jax.Array:
  """D3DFR ``compute_norm``: the normalised sum of the normals of the faces in
  ``point_buf``; the padding index T selects an appended zero normal. (B, N, 3)."""
  zero = jnp.zeros(face_normal.shape[:-2] + (1, 3), face_normal.dtype)
  padded = jnp.concatenate([face_normal, zero], axis=-2)
  return _normalize(jnp.sum(padded[..., point_buf, :], axis=-2))


def normals(model: MorphableModel, vertices: jax.Array) -> jax.Array:
  """Unrotated unit vertex normals of a (B, N, 3) shape."""
  return vertex_normals(face_normals(vertices, model.triangles), model.point_buf)


def rotation_matrix(angle: jax.Array) -> jax.Array:
  """D3DFR ``compute_rotation``: R = Rz Ry Rx for angles (x, y, z) in radians, (B, 3, 3).

  Rx = [[1, 0, 0], [0, cx, -sx], [0, sx, cx]], Ry = [[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]],
  Rz = [[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]; points rotate as p' = R p.
  """
  c, s = jnp.cos(angle), jnp.sin(angle)
  one, zero = jnp.ones_like(c[..., 0]), jnp.zeros_like(c[..., 0])

  def mat(rows):
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)

  cx, cy, cz = c[..., 0], c[..., 1], c[..., 2]
  sx, sy, sz = s[..., 0], s[..., 1], s[..., 2]
  rx = mat([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
  ry = mat([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
  rz = mat([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
  return jnp.matmul(jnp.matmul(rz, ry, precision=_HIGHEST), rx, precision=_HIGHEST)


def rigid_transform(points: jax.Array, rotation: jax.Array, translation: jax.Array):
  """D3DFR ``transform``: p' = R p + t for (B, N, 3) points."""
  return rotate(points, rotation) + translation[..., None, :]


def rotate(vectors: jax.Array, rotation: jax.Array) -> jax.Array:
  """R v for (B, N, 3) vectors and (B, 3, 3) rotations."""
  return jnp.einsum("...ij,...nj->...ni", rotation, vectors, precision=_HIGHEST)


def sh_basis(normal: jax.Array) -> jax.Array:
  """D3DFR ``compute_color``'s 9 SH basis values Y of unit normals, (..., 9).

  a = [pi, 2 pi / sqrt(3), 2 pi / sqrt(8)],
  c = [1 / sqrt(4 pi), sqrt(3) / sqrt(4 pi), 3 sqrt(5) / sqrt(12 pi)],
  Y = [a0 c0, -a1 c1 ny, a1 c1 nz, -a1 c1 nx, a2 c2 nx ny, -a2 c2 ny nz,
       0.5 a2 c2 / sqrt(3) (3 nz^2 - 1), -a2 c2 nx nz, 0.5 a2 c2 (nx^2 - ny^2)].
  """
  a = (np.pi, 2 * np.pi / np.sqrt(3.0), 2 * np.pi / np.sqrt(8.0))
  c = (
    1 / np.sqrt(4 * np.pi),
    np.sqrt(3.0) / np.sqrt(4 * np.pi),
    3 * np.sqrt(5.0) / np.sqrt(12 * np.pi),
  )
  nx, ny, nz = normal[..., 0], normal[..., 1], normal[..., 2]
  return jnp.stack(
    [
      a[0] * c[0] * jnp.ones_like(nx),
      -a[1] * c[1] * ny,
      a[1] * c[1] * nz,
      -a[1] * c[1] * nx,
      a[2] * c[2] * nx * ny,
      -a[2] * c[2] * ny * nz,
      0.5 * a[2] * c[2] / np.sqrt(3.0) * (3 * nz**2 - 1),
      -a[2] * c[2] * nx * nz,
      0.5 * a[2] * c[2] * (nx**2 - ny**2),
    ],
    axis=-1,
  )


def shade(albedo: jax.Array, normal: jax.Array, gamma: jax.Array) -> jax.Array:
  """D3DFR ``compute_color``: colour_c = (Y . (gamma_c + init_lit)) * albedo_c.

  ``gamma`` (B, 27) is reshaped (B, 3, 9): colour-major, 9 SH bands per colour;
  ``normal`` are the rotated unit vertex normals (B, N, 3).
  """
  lights = gamma.reshape(gamma.shape[:-1] + (3, 9)) + jnp.asarray(INIT_LIGHT, gamma.dtype)
  irradiance = jnp.einsum("...nk,...ck->...nc", sh_basis(normal), lights, precision=_HIGHEST)
  return irradiance * albedo


def project(points: jax.Array, camera: Camera) -> jax.Array:
  """D3DFR ``to_camera`` + ``to_image``: (u, v) = focal (X, Y) / Z + center with
  Z = distance - z. (..., 3) -> (..., 2), v up."""
  depth = camera.distance - points[..., 2:3]
  return camera.focal * points[..., :2] / depth + camera.center


def to_pixels(uv: jax.Array, camera: Camera) -> jax.Array:
  """D3DFR image coordinates (u, v up) to pixel coordinates (col, row down):
  (u, S - 1 - v), the frame of the rendered image (FACTS.md: row = 223 - v at 224)."""
  return jnp.stack([uv[..., 0], camera.image_size - 1 - uv[..., 1]], axis=-1)


def landmarks(model: MorphableModel, posed_vertices: jax.Array, camera: Camera) -> jax.Array:
  """D3DFR ``get_landmarks``: the 68 projected keypoints, in pixel coordinates
  (col, row) of the rendered image, (B, 68, 2)."""
  return to_pixels(project(posed_vertices[..., model.keypoints, :], camera), camera)
