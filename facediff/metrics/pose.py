"""Head pose from 68 landmarks and the pose error of DiffSFSR Tab. 1 ("Pose.") and TGDM
Tab. 1 ("Angle"). Runs on the host (numpy + OpenCV), not under jit.

Pose estimation: OpenCV ``solvePnP`` fits a rigid 3D landmark template to the 2D
landmarks through a pinhole camera (SQPnP for a global solution, then Levenberg-Marquardt
refinement). The template is the 68 keypoints of a 3D morphable model's mean shape
(``template_from_model``): the real BFM's when the user has it (the right template for
real faces), otherwise ``default_template``, the synthetic stand-in model of
``facediff.render.bfm`` (exact for the synthetic heads of the data pipeline, a rough
generic face for real photos). The papers themselves use learned estimators (DiffSFSR
ref. [37], TGDM the 3DMM angle coefficients); this is a documented, dependency-free
substitute, and ``pose_error`` accepts angles from any estimator.

Angles follow the 3DMM convention of ``facediff.render`` (D3DFR, FACTS.md): the head's
rotation R = Rz(roll) Ry(yaw) Rx(pitch) maps model points (y up, face towards +z, camera
on +z) to the camera's frame, so recovered angles can be compared with the 3DMM
coefficients' angles (x, y, z) = (pitch, yaw, roll). Seen in the image: yaw > 0 turns
the face towards the image's right (the subject's left), pitch > 0 tilts it down,
roll > 0 turns it counter-clockwise. Results are in degrees, ordered (yaw, pitch, roll).
"""

from __future__ import annotations

import functools

import numpy as np

from facediff.render import bfm as bfm_lib
from facediff.render import mesh

# OpenCV's camera frame is the 3DMM camera frame flipped: x right, y down, z forward.
_FLIP = np.diag([1.0, -1.0, -1.0])
DEFAULT_TEMPLATE_VERTICES = 2000


def template_from_model(model: bfm_lib.MorphableModel) -> np.ndarray:
  """(68, 3) float64: the model's mean shape at its 68 keypoints (model units, y up)."""
  shape = np.asarray(model.mean_shape, np.float64)
  return shape[np.asarray(model.keypoints)]


@functools.lru_cache(maxsize=1)
def default_template() -> np.ndarray:
  """The 68 keypoints of ``facediff.render.synthetic_bfm``'s mean shape at 2000 vertices
  (the mean shape does not depend on the seed), (68, 3) float64."""
  t = template_from_model(bfm_lib.synthetic_bfm(DEFAULT_TEMPLATE_VERTICES))
  t.setflags(write=False)
  return t


def camera_matrix(camera: mesh.Camera) -> np.ndarray:
  """OpenCV intrinsics (3, 3) of a ``facediff.render`` camera in pixel coordinates
  (col, row): fx = fy = focal, cx = center, cy = S - 1 - center (rows run down, v up)."""
  f, c, s = float(camera.focal), float(camera.center), float(camera.image_size)
  return np.array([[f, 0.0, c], [0.0, f, s - 1.0 - c], [0.0, 0.0, 1.0]])


def generic_camera_matrix(height: int, width: int) -> np.ndarray:
  """Intrinsics for a photo of unknown camera: focal length = image width (about a 53
  degree horizontal field of view), principal point at the image centre."""
  return np.array(
    [[float(width), 0.0, (width - 1) / 2], [0.0, float(width), (height - 1) / 2], [0, 0, 1.0]]
  )


def rotation_to_angles(rotation: np.ndarray) -> np.ndarray:
  """R = Rz(roll) Ry(yaw) Rx(pitch) (``facediff.render.mesh.rotation_matrix``) ->
  (yaw, pitch, roll) in degrees, yaw in [-90, 90]. From the product written out:
  R[2, 0] = -sin(yaw), R[2, 1:] = cos(yaw) (sin, cos)(pitch),
  R[:2, 0] = cos(yaw) (cos, sin)(roll)."""
  r = np.asarray(rotation, np.float64)
  yaw = np.arcsin(np.clip(-r[..., 2, 0], -1.0, 1.0))
  pitch = np.arctan2(r[..., 2, 1], r[..., 2, 2])
  roll = np.arctan2(r[..., 1, 0], r[..., 0, 0])
  return np.degrees(np.stack([yaw, pitch, roll], axis=-1))


def head_pose(
  landmarks: np.ndarray, intrinsics: np.ndarray, template: np.ndarray | None = None
) -> np.ndarray:
  """(yaw, pitch, roll) in degrees per face from 68 landmarks.

  ``landmarks``: (B, 68, 2) or (68, 2) pixel coordinates (col, row). ``intrinsics``: the
  (3, 3) pinhole matrix (``camera_matrix`` for a ``facediff.render`` camera,
  ``generic_camera_matrix`` for photos); no lens distortion. ``template``: (68, 3) model
  points (default ``default_template()``). Returns (B, 3) or (3,).
  """
  import cv2  # host-only dependency, imported where it is used

  lm = np.asarray(landmarks, np.float64)
  single = lm.ndim == 2
  lm = lm[None] if single else lm
  obj = np.asarray(default_template() if template is None else template, np.float64)
  if lm.shape[1:] != (obj.shape[0], 2) or obj.shape[1:] != (3,):
    raise ValueError(f"head_pose: landmarks {lm.shape} do not match the template {obj.shape}")
  k = np.asarray(intrinsics, np.float64)
  out = np.empty((lm.shape[0], 3))
  for i, pts in enumerate(lm):
    ok, rvec, tvec = cv2.solvePnP(obj, pts, k, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
      raise ValueError(f"head_pose: solvePnP found no pose for face {i}")
    rvec, tvec = cv2.solvePnPRefineLM(obj, pts, k, None, rvec, tvec)
    out[i] = rotation_to_angles(_FLIP @ cv2.Rodrigues(rvec)[0])
  return out[0] if single else out


def angle_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a - b in degrees wrapped to [-180, 180)."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return (d + 180.0) % 360.0 - 180.0


def pose_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Mean absolute difference of (yaw, pitch, roll) in degrees, (B, 3) x2 -> (B,)."""
  return np.mean(np.abs(angle_difference(a, b)), axis=-1)


def pose_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Euclidean distance of the angle vectors in degrees (DiffSFSR's "Pose.": "the
  Euclidean distance" of estimated head poses; TGDM's "Angle"), (B, 3) x2 -> (B,)."""
  return np.linalg.norm(angle_difference(a, b), axis=-1)
