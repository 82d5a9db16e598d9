"""Export face images to embedding shards (``records.py`` format).

    python -m data_pipelines.export --input <image folder | tfds:name[:split]> \
        --output DIR --encoders dlib,fer,mask68 [--weights name=path ...] \
        [--shard-size N] [--image-size 256] [--latents VAE_FOLDER]

For every input image: detect faces (dlib HOG), require exactly one, predict 68
landmarks, cut the crops the encoders need, run the encoders in batches, and write
one record per face: ``key`` (the input's relative path or index), ``image``
(PNG/JPEG bytes of the square face image at ``--image-size``), ``landmarks``
(68, 2) in that image's pixels, one field per encoder output (``id_dlib``,
``exp_fer``, ``mask``, ...), ``latent`` with ``--latents`` (facediff's Flax SD
VAE, posterior mean times the scaling factor, (h, w, C)), and one ``crop_<kind>``
per input crop of the selected encoders (other than ``image`` itself).

``crop_<kind>`` (float32 (2, 3)) is the affine transform from the stored ``image``'s
pixels to that encoder crop's pixels: ``crop_matrix @ inverse(image_matrix)``, both
mapping original-photo pixels (cv2.warpAffine's convention: the matrix maps source
to destination coordinates, pixel centres at integers). Warping the decoded
``image`` at its stored size with it (``cv2.warpAffine(image, crop, (n, n))``, or
``facediff.losses.align.warp_affine``) gives the encoder's crop up to resampling:
this lets a trainer cut the same crops from a generated image. Kinds (``faces.py``):
``dlib150`` (dlib's 150x150 chip, padding 0.25; constant border), ``arcface112``
(five-point similarity; constant border), ``facenet160`` and ``fer64`` (the square
detector box, widened; replicate border; fer64 is grey), and ``d3dfr224`` (D3DFR's
own rescale-and-cut, for ``d3dfr``). The detector box itself is not stored.

Inputs that fail (unreadable/corrupt file, no face, several faces) are logged and
counted in the manifest's ``counters``; they never stop the export.

Shards and resuming: the sorted input list is cut into consecutive shards of
``--shard-size`` inputs, so shard membership depends only on the inputs. A shard is
written under a temporary name, renamed when closed, and then its progress file
``_progress/shard-K.json`` is written; on a re-run a shard with both its final file
and its progress file is skipped, anything else is redone. The manifest is written
(atomically) once every shard is done. A re-run with other settings than the
existing export (``_progress/config.json``) is refused. ``--worker I/N`` lets N
processes (e.g. one per host) share an export: worker I does shards K with
K % N == I, and the last one to finish writes the manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import encoders as enc_lib
from data_pipelines import records
from data_pipelines.faces import FaceAligner, FaceDetector, FaceResult, relative_transform
from facediff import cli
from facediff.convert.common import StateDictMismatchError

log = logging.getLogger("data_pipelines.export")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PROGRESS = "_progress"
CROP_PREFIX = "crop_"
COUNTERS = ("inputs", "written", "corrupt", "no_face", "multiple_faces", "failed")


class ExportError(ValueError):
  """A configuration or input problem that stops the export."""


# A user's mistake, which the CLIs answer with one line (facediff.cli): the export's own
# checks, a missing or unreadable file or folder (OSError, encoders.WeightsError), an
# unknown encoder or field (KeyError), a dataset or weight file in the wrong format.
USER_ERRORS = (ExportError, OSError, KeyError, records.RecordError, StateDictMismatchError)


# --------------------------------------------------------------------- sources


class FolderSource:
  """Image files under a folder (recursive), keyed by sorted relative path."""

  def __init__(self, folder: str):
    if not os.path.isdir(folder):
      raise ExportError(f"--input {folder}: not a folder")
    self.folder = folder
    self.description = f"folder:{os.path.abspath(folder)}"
    keys = []
    for root, _, files in os.walk(folder):
      for f in files:
        if f.lower().endswith(IMAGE_EXTS):
          keys.append(os.path.relpath(os.path.join(root, f), folder))
    self.keys = sorted(keys)

  def load(self, key: str) -> np.ndarray:
    from PIL import Image, ImageOps

    path = os.path.join(self.folder, key)
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      return np.asarray(im.convert("RGB"))


class TfdsSource:
  """A prepared tfds dataset read with ``tfds.data_source`` (no TensorFlow);
  records are keyed by their index in the split."""

  def __init__(self, spec: str, data_dir: str | None = None, image_key: str = "image"):
    import tensorflow_datasets as tfds

    try:  # facediff's own builders register their names on import
      import data_pipelines.tfds  # noqa: F401
    except ImportError:
      pass
    parts = spec.split(":")
    name, split = parts[1], (parts[2] if len(parts) > 2 else "train")
    try:
      self.ds = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:
      # tfds's messages run to pages (every registered name): keep their first line.
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ExportError(
        f"--input {spec}: cannot open tfds dataset {name!r} split {split!r} ({first})"
      ) from e
    self.image_key = image_key
    self.description = f"tfds:{name}:{split}"
    self.keys = [f"{i:09d}" for i in range(len(self.ds))]

  def extras(self, key: str, names: Sequence[str]) -> dict[str, Any]:
    """Other features of the example (labels, ids) to copy into the record."""
    ex = self.ds[int(key)]
    missing = [n for n in names if n not in ex]
    if missing:
      raise ExportError(
        f"--carry {','.join(missing)}: not features of {self.description} (it has {sorted(ex)})"
      )
    return {n: _plain(ex[n]) for n in names}

  def load(self, key: str) -> np.ndarray:
    ex = self.ds[int(key)]
    if self.image_key not in ex:
      raise KeyError(f"{self.description}[{key}]: no feature {self.image_key!r} (has {sorted(ex)})")
    img = ex[self.image_key]
    if isinstance(img, bytes):
      from PIL import Image

      img = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"))
    return np.asarray(img, np.uint8)


def _plain(v: Any) -> Any:
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, str):
    return v
  return np.asarray(v)


def _carry_spec(v: Any) -> records.FieldSpec:
  if isinstance(v, str):
    return records.FieldSpec("str", [], "input", "1")
  return records.FieldSpec(str(v.dtype), list(v.shape), "input", "1")


def open_source(spec: str, **kw) -> FolderSource | TfdsSource:
  if spec.startswith("tfds:"):
    return TfdsSource(spec, **kw)
  return FolderSource(spec)


# --------------------------------------------------------------------- config


@dataclasses.dataclass
class ExportConfig:
  encoders: Sequence[str | enc_lib.Encoder] = ("dlib", "fer", "mask68")
  weights: Mapping[str, str] = dataclasses.field(default_factory=dict)
  shard_size: int = 256
  image_size: int = 256
  image_format: str = "png"  # or "jpeg"
  jpeg_quality: int = 95
  image_scale: float = 1.8
  detector: str = "hog"
  upsample: int = 1
  latents: str | None = None  # diffusers AutoencoderKL folder (or pipeline folder)
  limit: int | None = None
  # Several processes (hosts) may share one export: worker i of n does the shards
  # k with k % n == i; whichever finds every shard done writes the manifest.
  worker_index: int = 0
  num_workers: int = 1
  # tfds inputs: features copied unchanged into each record (e.g. labels, ids).
  carry: Sequence[str] = ()


def _encode_image(img: np.ndarray, fmt: str, quality: int) -> bytes:
  import cv2

  if fmt == "png":
    ok, buf = cv2.imencode(".png", img[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 6])
  elif fmt == "jpeg":
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
  else:
    raise ExportError(f"--image-format {fmt!r}: expected 'png' or 'jpeg'")
  if not ok:
    raise ExportError(f"could not encode an image as {fmt}")
  return buf.tobytes()


def build_encoders(cfg: ExportConfig) -> list[enc_lib.Encoder]:
  out = []
  for e in cfg.encoders:
    if isinstance(e, enc_lib.Encoder):
      e.options.setdefault("image_size", cfg.image_size)
      out.append(e)
    else:
      out.append(enc_lib.create(e, weights=cfg.weights, image_size=cfg.image_size))
  if cfg.latents:
    from data_pipelines.encoders.sd_vae import SDVAE

    out.append(SDVAE(weights={"latents": cfg.latents}, image_size=cfg.image_size))
  seen: dict[str, str] = {}
  for e in out:
    for f in e.output_fields():
      if f.startswith(CROP_PREFIX):
        raise ExportError(f"field {f!r} of {e.name!r}: the prefix {CROP_PREFIX!r} is reserved")
      if f in seen or f in ("key", "image", "landmarks"):
        raise ExportError(
          f"field {f!r} written by both {seen.get(f, 'the exporter')!r} and {e.name!r}"
        )
      seen[f] = e.name
  return out


def manifest_fields(
  cfg: ExportConfig, encs: Sequence[enc_lib.Encoder]
) -> dict[str, records.FieldSpec]:
  s = cfg.image_size
  fields = {
    "key": records.FieldSpec("str", [], "input", "1"),
    "image": records.FieldSpec(
      "bytes", [s, s, 3], cfg.image_format, f"square-crop/scale={cfg.image_scale}"
    ),
    "landmarks": records.FieldSpec("float32", [68, 2], "dlib-shape_predictor_68", "1"),
  }
  for e in encs:
    for name, spec in e.output_fields().items():
      fields[name] = records.FieldSpec(spec.dtype, list(spec.shape), e.name, str(e.version))
  for kind in crop_kinds(encs):
    fields[CROP_PREFIX + kind] = records.FieldSpec(
      "float32", [2, 3], "crop-transform", f"image->{kind} affine/1"
    )
  return fields


def crop_kinds(encs: Sequence[enc_lib.Encoder]) -> list[str]:
  """Sorted crop kinds whose image -> crop transforms the records carry."""
  return sorted({k for e in encs for k in e.crop_kinds()})


def crop_fields(face: FaceResult, encs: Sequence[enc_lib.Encoder]) -> dict[str, np.ndarray]:
  """``crop_<kind>``: float32 (2, 3) transforms from the stored image to each crop."""
  image_matrix = face.crops["image"].matrix
  out = {}
  for e in encs:
    for kind, m in e.crop_transforms(face).items():
      out[CROP_PREFIX + kind] = relative_transform(m, image_matrix).astype(np.float32)
  return out


def _file_digest(path: str) -> str:
  """sha256 of a weight file; of a folder, of its files' names and contents."""
  h = hashlib.sha256()
  paths = (
    [path]
    if os.path.isfile(path)
    else sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
  )
  for p in paths:
    h.update(os.path.relpath(p, path).encode())
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


def weight_digests(encs: Sequence[enc_lib.Encoder]) -> dict[str, str]:
  """``--weights`` key -> sha256 of the files the encoders use (provenance, resume check)."""
  out = {}
  for e in encs:
    for k in e.weight_keys:
      out[k] = _file_digest(e.weights[k])
  return out


def _fingerprint(cfg: ExportConfig, source, fields, digests) -> dict[str, Any]:
  h = hashlib.sha256("\n".join(source.keys).encode()).hexdigest()
  return {
    "source": source.description,
    "num_inputs": len(source.keys),
    "inputs_sha256": h,
    "weights_sha256": digests,
    "shard_size": cfg.shard_size,
    "image_size": cfg.image_size,
    "image_format": cfg.image_format,
    "jpeg_quality": cfg.jpeg_quality,
    "image_scale": cfg.image_scale,
    "detector": cfg.detector,
    "upsample": cfg.upsample,
    "fields": {k: dataclasses.asdict(v) for k, v in fields.items()},
  }


def _write_json_atomic(obj, path: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


# --------------------------------------------------------------------- export


def shard_name(k: int, n: int) -> str:
  return f"shard-{k:05d}-of-{n:05d}.array_record"


def export(
  input: str | Any,
  output: str,
  cfg: ExportConfig | None = None,
  *,
  tfds_data_dir: str | None = None,
  after_shard: Callable[[int], None] | None = None,
) -> records.Manifest | None:
  """Runs the export; returns the manifest (None for a worker that finished its
  shards while others are still running). ``input`` is a folder, ``tfds:...``,
  or a source object with ``keys``, ``load(key)`` and ``description``.
  ``after_shard(k)`` is called after shard k is final (tests use it to simulate a
  crash)."""
  from array_record.python.array_record_module import ArrayRecordWriter

  cfg = cfg or ExportConfig()
  for flag, value in (("--shard-size", cfg.shard_size), ("--image-size", cfg.image_size)):
    if value < 1:
      raise ExportError(f"{flag} {value}: must be >= 1")
  if os.path.exists(output) and not os.path.isdir(output):
    raise ExportError(f"--output {output}: exists and is not a folder")
  if not 0 <= cfg.worker_index < cfg.num_workers:
    raise ExportError(
      f"--worker {cfg.worker_index}/{cfg.num_workers}: expected I/N with 0 <= I < N"
    )
  source = open_source(input, data_dir=tfds_data_dir) if isinstance(input, str) else input
  keys = list(source.keys)[: cfg.limit] if cfg.limit else list(source.keys)
  if not keys:
    raise ExportError(f"--input {source.description}: no images found")
  if len(keys) != len(source.keys):
    source = _Limited(source, keys)

  encs = build_encoders(cfg)
  fields = manifest_fields(cfg, encs)
  if cfg.carry:
    if not hasattr(source, "extras"):
      raise ExportError(f"--carry {','.join(cfg.carry)}: only tfds inputs carry features")
    first = source.extras(keys[0], cfg.carry)
    for n, v in first.items():
      if n in fields:
        raise ExportError(f"--carry {n}: the export already writes a field {n!r}")
      fields[n] = _carry_spec(v)
  fp = _fingerprint(cfg, source, fields, weight_digests(encs))

  os.makedirs(os.path.join(output, PROGRESS), exist_ok=True)
  cfg_path = os.path.join(output, PROGRESS, "config.json")
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      old = json.load(f)
    diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
    if diff:
      raise ExportError(
        f"{output}: holds an export with other settings ({', '.join(diff)} "
        f"differ); use a new --output folder"
      )
  elif os.path.exists(os.path.join(output, records.MANIFEST)):
    raise ExportError(
      f"{output}: has a manifest but no {PROGRESS}/config.json; refusing to "
      f"overwrite a dataset this exporter did not write"
    )
  else:
    _write_json_atomic(fp, cfg_path)
  for stale in glob.glob(os.path.join(output, "*.tmp-*")):
    os.remove(stale)

  crops = sorted({e.crop for e in encs if e.crop} | {"image"})
  aligner = FaceAligner(
    crops=crops,
    image_size=cfg.image_size,
    image_scale=cfg.image_scale,
    detector=FaceDetector(cfg.detector, cfg.upsample),
  )

  n_shards = -(-len(keys) // cfg.shard_size)
  t0 = time.time()
  for k in range(cfg.worker_index, n_shards, cfg.num_workers):
    name = shard_name(k, n_shards)
    final = os.path.join(output, name)
    prog = os.path.join(output, PROGRESS, f"shard-{k:05d}.json")
    if _shard_done(prog, final):
      log.info("shard %d/%d already done, skipped", k + 1, n_shards)
      continue
    shard_keys = keys[k * cfg.shard_size : (k + 1) * cfg.shard_size]
    counters, recs = _process_shard(source, shard_keys, aligner, encs, cfg)
    if recs:
      tmp = f"{final}.tmp-{os.getpid()}"
      w = ArrayRecordWriter(tmp, "group_size:1")
      for r in recs:
        w.write(records.encode_record(r))
      w.close()
      os.replace(tmp, final)
    elif os.path.exists(final):
      os.remove(final)
    _write_json_atomic(
      {"path": name if recs else None, "count": len(recs), "counters": counters}, prog
    )
    log.info(
      "shard %d/%d: %d records (%s), %.1fs elapsed",
      k + 1,
      n_shards,
      len(recs),
      counters,
      time.time() - t0,
    )
    if after_shard is not None:
      after_shard(k)

  missing = [
    k
    for k in range(n_shards)
    if not _shard_done(
      os.path.join(output, PROGRESS, f"shard-{k:05d}.json"),
      os.path.join(output, shard_name(k, n_shards)),
    )
  ]
  if missing:
    log.info(
      "worker %d/%d finished; %d shard(s) left to other workers (%s...)",
      cfg.worker_index,
      cfg.num_workers,
      len(missing),
      missing[:5],
    )
    return None
  return _finish(output, n_shards, fields, fp, source, cfg)


def _shard_done(prog: str, final: str) -> bool:
  if not os.path.exists(prog):
    return False
  try:
    with open(prog) as f:
      p = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  return p.get("count") == 0 or os.path.exists(final)


class _Limited:
  def __init__(self, source, keys):
    self.keys, self.load = keys, source.load
    self.description = f"{source.description}[:{len(keys)}]"


def _process_shard(source, keys, aligner, encs, cfg):
  counters = dict.fromkeys(COUNTERS, 0)
  kept: list[tuple[str, FaceResult]] = []
  extras: dict[str, dict[str, Any]] = {}
  for key in keys:
    counters["inputs"] += 1
    try:
      img = source.load(key)
      if cfg.carry:
        extras[key] = source.extras(key, cfg.carry)
    except ExportError:
      raise
    except Exception as e:  # PIL raises many types on bad files
      counters["corrupt"] += 1
      log.warning("%s: unreadable image, skipped (%s: %s)", key, type(e).__name__, e)
      continue
    try:
      res = aligner(img)
    except Exception as e:
      counters["failed"] += 1
      log.warning("%s: face alignment failed, skipped (%s: %s)", key, type(e).__name__, e)
      continue
    if res.num_faces == 0:
      counters["no_face"] += 1
      log.warning("%s: no face found, skipped", key)
    elif res.num_faces > 1:
      counters["multiple_faces"] += 1
      log.warning("%s: %d faces found (exactly one needed), skipped", key, res.num_faces)
    else:
      kept.append((key, res))
  if not kept:
    return counters, []
  outputs = {}
  for e in encs:
    batch = np.stack([e.prepare(r) for _, r in kept])
    outputs.update(e.encode(batch))
  recs = []
  for i, (key, r) in enumerate(kept):
    crop = r.crops["image"]
    rec = {
      "key": key,
      "image": _encode_image(crop.image, cfg.image_format, cfg.jpeg_quality),
      "landmarks": crop.landmarks.astype(np.float32),
    }
    rec.update(crop_fields(r, encs))
    for f, v in outputs.items():
      rec[f] = v[i]
    rec.update(extras.get(key, {}))
    recs.append(rec)
  counters["written"] = len(recs)
  return counters, recs


def _finish(output, n_shards, fields, fp, source, cfg) -> records.Manifest:
  shards, counters = [], dict.fromkeys(COUNTERS, 0)
  for k in range(n_shards):
    with open(os.path.join(output, PROGRESS, f"shard-{k:05d}.json")) as f:
      p = json.load(f)
    for c, v in p["counters"].items():
      counters[c] = counters.get(c, 0) + int(v)
    if p["count"]:
      shards.append(records.ShardInfo(p["path"], int(p["count"])))
  if not shards:
    raise ExportError(f"{output}: no input gave exactly one face ({counters}); nothing to write")
  extra = {
    "image_scale": cfg.image_scale,
    "image_format": cfg.image_format,
    "detector": cfg.detector,
    "landmarks": "68-point iBUG, pixels of 'image'",
    "mask": "1 = face region",
    "inputs_sha256": fp["inputs_sha256"],
    "weights_sha256": fp["weights_sha256"],
  }
  kinds = [f[len(CROP_PREFIX) :] for f in fields if f.startswith(CROP_PREFIX)]
  if kinds:
    extra["crop_transforms"] = (
      "crop_<kind>: 2x3 affine, pixels of 'image' -> pixels of the encoder crop "
      "<kind> (cv2.warpAffine convention, pixel centres at integers)"
    )
  if "latent" in fields:
    extra["latent"] = "VAE posterior mean * scaling_factor, (h, w, C)"
  manifest = records.Manifest(
    fields=fields, shards=shards, source=source.description, counters=counters, extra=extra
  )
  manifest.save(output)
  log.info(
    "wrote %s: %d records in %d shards, counters %s",
    output,
    manifest.num_records,
    len(shards),
    counters,
  )
  return manifest


# --------------------------------------------------------------------- CLI


def _parse_weights(items: Sequence[str]) -> dict[str, str]:
  out = {}
  for it in items:
    if "=" not in it:
      raise ExportError(f"--weights {it!r}: expected NAME=PATH")
    k, v = it.split("=", 1)
    out[k.strip()] = v
  return out


def main(argv: Sequence[str] | None = None) -> int:
  p = cli.ArgumentParser(
    prog="python -m data_pipelines.export",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--input", required=True, help="image folder or tfds:name[:split]")
  p.add_argument("--output", required=True)
  p.add_argument(
    "--encoders",
    default="dlib,fer,mask68",
    help=f"comma-separated, from: {', '.join(enc_lib.names())}",
  )
  p.add_argument(
    "--weights",
    action="append",
    default=[],
    metavar="NAME=PATH",
    help="weight file for an encoder that needs one (repeatable)",
  )
  p.add_argument("--shard-size", type=int, default=256)
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--image-format", choices=("png", "jpeg"), default="png")
  p.add_argument(
    "--image-scale",
    type=float,
    default=1.8,
    help="side of the face image / extent of the 68 landmarks",
  )
  p.add_argument("--detector", choices=("hog", "cnn"), default="hog")
  p.add_argument("--upsample", type=int, default=1)
  p.add_argument("--latents", default=None, help="diffusers AutoencoderKL folder")
  p.add_argument("--limit", type=int, default=None)
  p.add_argument("--tfds-data-dir", default=None)
  p.add_argument(
    "--carry",
    default="",
    help="tfds features to copy into the records, comma-separated (e.g. subject,emotion)",
  )
  p.add_argument(
    "--worker",
    default="0/1",
    metavar="I/N",
    help="this process is worker I of N sharing the export (default 0/1)",
  )
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  try:
    try:
      wi, wn = (int(v) for v in a.worker.split("/"))
    except ValueError:
      raise ExportError(f"--worker {a.worker!r}: expected I/N, e.g. 0/4") from None
    cfg = ExportConfig(
      encoders=[e for e in a.encoders.split(",") if e],
      weights=_parse_weights(a.weights),
      shard_size=a.shard_size,
      image_size=a.image_size,
      image_format=a.image_format,
      image_scale=a.image_scale,
      detector=a.detector,
      upsample=a.upsample,
      latents=a.latents,
      limit=a.limit,
      worker_index=wi,
      num_workers=wn,
      carry=tuple(c for c in a.carry.split(",") if c),
    )
    m = export(a.input, a.output, cfg, tfds_data_dir=a.tfds_data_dir)
  except USER_ERRORS as e:
    return cli.fail("export", e)
  if m is None:
    print(json.dumps({"worker": a.worker, "manifest": "not yet: other workers' shards remain"}))
    return 0
  print(json.dumps({"records": m.num_records, "shards": len(m.shards), "counters": m.counters}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
