"""A small real-face demo dataset built offline, with no download.

    python -m data_pipelines.demo --out DIR [--num 300] [--seed 0]

Sources: real photos that ship inside installed packages: scikit-image's
``astronaut()`` (Eileen Collins) and insightface's sample images ``t1.jpg`` (six
people, each cut out on its own) and ``Tom_Hanks_54745.png`` — eight identities.
scikit-image's ``lfw_subset`` is not used: its faces are 25x25 grey, and dlib finds
a face in only about half of them even after an 8x upscale.

Each example is a seeded augmentation of one source face (horizontal flip, rotation
of up to 12 degrees, scale 0.85-1.2, shift, brightness/contrast/saturation jitter)
rendered at 320x320 into ``DIR/_source_images/<identity>/NNNNN.png``; the folder is
then exported with ``data_pipelines.export`` and the real offline encoders (dlib
ResNet 128-D ``id_dlib``, fer ``exp_fer``/``exp_fer_feat``, the 68-landmark masks
``mask`` and ``mask_small``) into ``DIR`` itself (``DIR/manifest.json`` + shards).
The record ``key`` starts with the identity folder. Re-running resumes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np

from data_pipelines import export
from data_pipelines.faces import FaceDetector
from facediff import cli

log = logging.getLogger("data_pipelines.demo")

ENCODERS = ("dlib", "fer", "mask68", "mask68_small")
CANVAS = 320


def _insightface_image(name: str) -> np.ndarray:
  from PIL import Image

  spec = importlib.util.find_spec("insightface")
  if spec is None or not spec.origin:
    raise FileNotFoundError(
      "package insightface is not installed (pip install --no-deps "
      "insightface); the demo uses its sample photos"
    )
  path = os.path.join(os.path.dirname(spec.origin), "data", "images", name)
  return np.asarray(Image.open(path).convert("RGB"))


def _cut(image: np.ndarray, rect, margin: float = 1.0) -> np.ndarray:
  """Square window around a detector box, ``margin`` box widths on each side,
  edge-padded where it leaves the image."""
  left, top, right, bottom = rect
  side = max(right - left, bottom - top)
  cx, cy = (left + right) / 2, (top + bottom) / 2
  half = int(round(side * (0.5 + margin)))
  x0, y0 = int(round(cx)) - half, int(round(cy)) - half
  pad = max(0, -x0, -y0, x0 + 2 * half - image.shape[1], y0 + 2 * half - image.shape[0])
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  return padded[y0 + pad : y0 + pad + 2 * half, x0 + pad : x0 + pad + 2 * half]


def source_faces() -> dict[str, np.ndarray]:
  """identity -> square RGB crop holding that one face (face ~1/3 of the side)."""
  import cv2
  from skimage import data as skdata

  det = FaceDetector(upsample=1)
  out = {}
  astro = skdata.astronaut()
  best = det(astro)[0]  # highest score: the face (a weak second hit is on the suit)
  out["astronaut"] = _cut(astro, best.rect)
  t1 = _insightface_image("t1.jpg")
  for i, d in enumerate(sorted(det(t1), key=lambda d: d.rect[0])):
    out[f"t1_person{i}"] = _cut(t1, d.rect)
  hanks = _insightface_image("Tom_Hanks_54745.png")
  hanks = cv2.resize(hanks, (224, 224), interpolation=cv2.INTER_CUBIC)
  out["tom_hanks"] = _cut(hanks, det(hanks)[0].rect)
  return out


def augment(face: np.ndarray, rng: np.random.Generator, size: int = CANVAS) -> np.ndarray:
  """One seeded augmentation of a source crop, rendered at size x size."""
  import cv2

  img = face[:, ::-1] if rng.random() < 0.5 else face
  h, w = img.shape[:2]
  angle = rng.uniform(-12, 12)
  scale = rng.uniform(0.85, 1.2) * size / w
  shift = rng.uniform(-0.06, 0.06, 2) * size
  m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
  m[:, 2] += np.array([size / 2 - w / 2, size / 2 - h / 2]) + shift
  out = cv2.warpAffine(
    np.ascontiguousarray(img),
    m,
    (size, size),
    flags=cv2.INTER_LINEAR,
    borderMode=cv2.BORDER_REFLECT_101,
  ).astype(np.float32)
  grey = out.mean(-1, keepdims=True)
  out = grey + (out - grey) * rng.uniform(0.75, 1.25)  # saturation
  out = (out - out.mean()) * rng.uniform(0.8, 1.2) + out.mean()  # contrast
  out = out * rng.uniform(0.8, 1.2) + rng.uniform(-12, 12, 3)  # brightness, colour cast
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def write_sources(folder: str, num: int, seed: int) -> int:
  """Writes ``num`` augmented images (skips files already there); returns the count."""
  from PIL import Image

  faces = source_faces()
  ids = sorted(faces)
  rng = np.random.default_rng(seed)
  for i in range(num):
    ident = ids[i % len(ids)]
    img = augment(faces[ident], rng)  # always drawn, so the stream does not depend on skips
    path = os.path.join(folder, ident, f"{i:05d}.png")
    if os.path.exists(path):
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)
  return num


def build(out: str, num: int = 300, seed: int = 0, image_size: int = 256, shard_size: int = 64):
  """Writes the demo source images and exports them into ``out``; returns the manifest."""
  if num < 1:
    raise export.ExportError(f"--num {num}: the demo needs at least 1 image")
  for flag, value in (("--image-size", image_size), ("--shard-size", shard_size)):
    if value < 1:
      raise export.ExportError(f"{flag} {value}: must be >= 1")
  cli.check_output_dir(out, "--out")
  src = os.path.join(out, "_source_images")
  recorded = os.path.join(out, "_source_images.json")
  if os.path.exists(recorded):
    with open(recorded) as f:
      prev = json.load(f)
    if prev != {"num": num, "seed": seed}:
      raise export.ExportError(f"{out}: holds a demo built with {prev}; use another --out")
  os.makedirs(out, exist_ok=True)
  with open(recorded, "w") as f:
    json.dump({"num": num, "seed": seed}, f)
  write_sources(src, num, seed)
  cfg = export.ExportConfig(encoders=ENCODERS, shard_size=shard_size, image_size=image_size)
  return export.export(src, out, cfg)


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(
    prog="python -m data_pipelines.demo",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--out", required=True)
  p.add_argument("--num", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--shard-size", type=int, default=64)
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  try:
    m = build(a.out, a.num, a.seed, a.image_size, a.shard_size)
  except export.USER_ERRORS as e:
    return cli.fail("demo", e)
  print(
    json.dumps(
      {"out": a.out, "records": m.num_records, "shards": len(m.shards), "counters": m.counters}
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
