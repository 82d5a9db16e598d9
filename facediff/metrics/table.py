"""Results as a Markdown table laid out like the papers' tables: one row per method, one
column per metric, an arrow in each header saying whether higher (↑) or lower (↓) is
better, and the best value of each column in bold."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Metric:
  """A table column: ``name`` (the header and the key in each row's mapping),
  ``higher_is_better`` (the arrow and which value is best), ``digits`` after the point."""

  name: str
  higher_is_better: bool
  digits: int = 3

  @property
  def header(self) -> str:
    return f"{self.name} {'↑' if self.higher_is_better else '↓'}"


def _metrics(*specs: tuple[str, bool, int]) -> dict[str, Metric]:
  return {name: Metric(name, up, digits) for name, up, digits in specs}


# The columns of DiffSFSR Tab. 1-3 and TGDM Tab. 1-4, by the names the papers print.
METRICS = _metrics(
  ("PSNR", True, 2),
  ("SSIM", True, 3),
  ("LPIPS", False, 3),
  ("MSE", False, 4),
  ("ID", True, 3),  # DiffSFSR: identity retrieval accuracy
  ("ID-A", True, 3),  # TGDM: ArcFace cosine
  ("ID-C", True, 3),  # TGDM: CurricularFace cosine
  ("Exp", False, 3),
  ("Pose", False, 3),
  ("Angle", False, 3),
  ("Gaze", False, 3),
  ("LMD", False, 3),
  ("EFD", False, 3),
  ("Sync", True, 3),
  ("FID", False, 2),
)


def _metric(column: str | Metric) -> Metric:
  if isinstance(column, Metric):
    return column
  if column not in METRICS:
    raise ValueError(f"unknown metric column {column!r}: pass a Metric or one of {list(METRICS)}")
  return METRICS[column]


def _value(row: Mapping[str, float], name: str) -> float | None:
  v = row.get(name)
  if v is None:
    return None
  v = float(v)
  return None if math.isnan(v) else v


def format_table(
  rows: Mapping[str, Mapping[str, float]] | Sequence[tuple[str, Mapping[str, float]]],
  columns: Sequence[str | Metric],
  bold_best: bool = True,
  method_header: str = "Method",
) -> str:
  """A Markdown table of ``rows`` (method name -> {metric name: value}, in order) over
  ``columns`` (names from ``METRICS`` or ``Metric``s). Values are rounded to the
  column's digits; a missing or NaN value prints "-", as the papers do. With
  ``bold_best`` every value that rounds to the column's best is bold. Returns the table
  text, lines joined by newlines, no trailing newline."""
  items = list(rows.items()) if isinstance(rows, Mapping) else [(m, r) for m, r in rows]
  metrics = [_metric(c) for c in columns]
  header = [method_header] + [m.header for m in metrics]
  lines = ["| " + " | ".join(header) + " |", "|:--|" + "--:|" * len(metrics)]
  cells = [[method] for method, _ in items]
  for m in metrics:
    values = [_value(row, m.name) for _, row in items]
    rounded = [None if v is None else round(v, m.digits) for v in values]
    present = [v for v in rounded if v is not None]
    best = (max(present) if m.higher_is_better else min(present)) if present else None
    for cell, v in zip(cells, rounded, strict=True):
      text = "-" if v is None else f"{v:.{m.digits}f}"
      cell.append(f"**{text}**" if bold_best and v is not None and v == best else text)
  lines += ["| " + " | ".join(c) + " |" for c in cells]
  return "\n".join(lines)
