"""Metric writers (process 0 only): JSONL, TensorBoard event files (tensorboardX, no
TensorFlow), a console progress line, and PNG image grids."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger("facediff.train")


def image_grid(images: np.ndarray, columns: int | None = None, gap: int = 0) -> np.ndarray:
  """(B, H, W, C) float in [-1, 1] -> one uint8 grid, row-major, ``columns`` wide
  (default: square), with ``gap`` white pixels between cells."""
  images = np.asarray(images, np.float32)
  b, h, w, c = images.shape
  cols = columns or int(math.ceil(math.sqrt(b)))
  rows = int(math.ceil(b / cols))
  fill = 255 if gap else 0
  grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, c), fill, np.uint8)
  u8 = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
  for i in range(b):
    r, k = divmod(i, cols)
    y, x = r * (h + gap), k * (w + gap)
    grid[y : y + h, x : x + w] = u8[i]
  return grid


def save_png(array: np.ndarray, path: str) -> str:
  from PIL import Image  # noqa: PLC0415

  os.makedirs(os.path.dirname(path), exist_ok=True)
  arr = array[..., 0] if array.shape[-1] == 1 else array
  tmp = path + ".tmp"
  Image.fromarray(arr).save(tmp, format="PNG")
  os.replace(tmp, path)
  return path


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``),
  images to ``workdir/samples/`` and TensorBoard. Does nothing off process 0."""

  def __init__(self, workdir: str, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415

      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))

  def text(self, step: int, key: str, value: str) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), key: value}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.add_text(key, value, int(step))

  def images(self, step: int, key: str, images: np.ndarray) -> str | None:
    if not self.enabled:
      return None
    grid = image_grid(images)
    path = save_png(grid, os.path.join(self.workdir, "samples", f"{key}_{int(step):07d}.png"))
    if self._tb is not None:
      self._tb.add_image(key, grid, int(step), dataformats="HWC")
    return path

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """steps/s, examples/s and ETA over the last reporting window."""

  def __init__(self, total_steps: int, global_batch: int, start_step: int):
    self.total = int(total_steps)
    self.batch = int(global_batch)
    self.last_step = int(start_step)
    self.last_time = time.perf_counter()

  def rates(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(int(step) - self.last_step, 1)
    dt = max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = int(step), now
    sps = steps / dt
    return {
      "steps_per_sec": sps,
      "examples_per_sec": sps * self.batch,
      "eta_sec": max(self.total - int(step), 0) / sps,
    }

  @staticmethod
  def line(step: int, total: int, metrics: Mapping[str, float]) -> str:
    eta = metrics.get("eta_sec", float("nan"))
    terms = " ".join(
      f"{k}={v:.4g}"
      for k, v in metrics.items()
      if k not in ("steps_per_sec", "examples_per_sec", "eta_sec", "finite")
    )
    return (
      f"step {step}/{total} {terms} | {metrics.get('steps_per_sec', 0):.2f} steps/s "
      f"{metrics.get('examples_per_sec', 0):.1f} ex/s ETA {eta / 60:.1f} min"
    )
