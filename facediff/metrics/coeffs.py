"""TGDM's 3DMM-coefficient metrics (TGDM Sec. 5 "Metrics": "Exp, Angle, and Gaze are used
to calculate the average Euclidean Distances of corresponding coefficients between the
generated and target faces"; Tab. 1, 2 and 4).

The coefficients of both faces come from one estimator (D3DFR in the paper, run on the
generated and on the target image); this module only compares them. Host numpy.
"""

from __future__ import annotations

import numpy as np

from facediff.render import coeffs as coeffs_lib

# Column name -> the coefficient group it compares (facediff.render.coeffs field names).
GROUPS = {"Exp": "expression", "Angle": "angle", "Gaze": "gaze"}


def has_gaze(layout: str) -> bool:
  """Whether vectors of ``layout`` carry TGDM's gaze (D3DFR's 257 do not)."""
  return any(name == "gaze" for name, _ in coeffs_lib.LAYOUTS[layout])


def coefficient_distances(
  pred: np.ndarray, target: np.ndarray, layout: str = "d3dfr"
) -> dict[str, np.ndarray]:
  """Per-face Euclidean distances between the coefficient groups of ``pred`` (the
  generated faces) and ``target``, both (B, D) flat vectors of ``layout``:
  {"Exp": |beta_p - beta_t| (64), "Angle": |angle_p - angle_t| (3, radians), and
  "Gaze": |omega_p - omega_t| (4) when the layout has gaze}, each (B,) float64. TGDM's
  table values are their means over the evaluation pairs."""
  p = np.asarray(pred, np.float64)
  t = np.asarray(target, np.float64)
  if p.shape != t.shape or p.ndim != 2:
    raise ValueError(f"coefficient_distances needs (B, D) pairs, got {p.shape} and {t.shape}")
  cp, ct = coeffs_lib.split(p, layout), coeffs_lib.split(t, layout)
  out = {}
  for column, group in GROUPS.items():
    if group == "gaze" and not has_gaze(layout):
      continue
    out[column] = np.linalg.norm(getattr(cp, group) - getattr(ct, group), axis=-1)
  return out
