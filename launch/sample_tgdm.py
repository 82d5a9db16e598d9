"""TGDM inference jobs for the ``facediff`` command (``launch.sample`` dispatches here when
the workdir's ``config.model.name`` is "tgdm"): image-driven reenactment, video- and
audio-driven talking faces and face swapping (TGDM 4.2, 4.4) with
``facediff.pipelines.tgdm.TGDMPipeline``.

Inputs (``source``, ``driver``, ``target``, video frames) are either user photos, exported
through the exporter's own detection, alignment and encoders (``data_pipelines.photos``,
with the encoders that wrote the training set's fields: ``d3dfr`` for the coefficients,
the identity encoder for swap's z_id, the mask encoder for swap's mask), or records of an
exported dataset written ``DATASET_DIR#RECORD_KEY``. A checkpoint trained on a set whose
fields come from no exporter encoder (the synthetic 3DMM set) takes records only.

A driver video is a folder of frames, a video file (OpenCV) or ``DATASET_DIR#KEYS`` with
KEYS a comma-separated key list, a glob over the keys (``g0001/*``) or ``@FILE`` (one key
a line). Frames are driven in chunks of ``chunk`` (all frames share x_T and the key; the
radius-``radius`` window is averaged over the whole sequence first, so chunking changes
nothing for deterministic samplers; with DDPM the per-step noise depends on the chunk).

Audio: a WAV (resampled to the EmoA2E config's rate) -> MFCC clips (facediff.audio) ->
EmoA2E (a trained ``emoa2e_workdir``) with the MiniLM embedding of ``emotion`` (several
comma-separated emotions: their mean, ``emoa2e.compound_emotion``) and intensity eta ->
the expression of every frame on the source's pose.

Every user mistake raises ``inference.SampleError`` with one line naming the input;
outputs are staged and moved into ``out`` only when all exist.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from launch import inference

SampleError = inference.SampleError
TASKS = ("reenact", "video", "audio", "swap")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
# What each role of a task needs from its face: the image, the coefficients, the
# identity embedding (swap's source) and the face mask (swap's target).
ROLE_PARTS = {
  "reenact": {"source": ("image", "coeffs"), "driver": ("coeffs",)},
  "video": {"source": ("image", "coeffs"), "driver_video": ("coeffs",)},
  "audio": {"source": ("image", "coeffs")},
  "swap": {"source": ("image", "coeffs", "identity"), "target": ("image", "coeffs", "mask")},
}


@dataclasses.dataclass
class Face:
  """One input face: ``label`` as the user named it; arrays at the model's size."""

  label: str
  image: np.ndarray | None = None  # (S, S, 3) float32 in [-1, 1]
  coeffs: np.ndarray | None = None  # (D,) in config.data.coeff_layout
  identity: np.ndarray | None = None  # (id_dim,) config.data.id_fields[0]
  mask: np.ndarray | None = None  # (S, S, 1) float32, 1 = face


# ----------------------------------------------------------------------------- inputs


def part_fields(config) -> dict[str, str]:
  """part -> the dataset field holding it (the training config's names)."""
  d = config.data
  return {
    "image": str(d.get("image_field", "image")),
    "coeffs": str(d.coeff_field),
    "identity": str(d.id_fields[0]),
    "mask": str(d.mask_field),
  }


def record_spec(spec: str) -> tuple[str, str] | None:
  """(dataset folder, key part) of ``DATASET_DIR#KEY``, or None for a file path."""
  if "#" not in spec or os.path.isfile(spec):
    return None
  folder, key = spec.split("#", 1)
  return folder, key


class Datasets:
  """Exported datasets read by record key (each folder's key table built once)."""

  def __init__(self):
    self._keys: dict[str, dict[str, int]] = {}
    self._sources: dict[str, Any] = {}

  def keys(self, folder: str, label: str) -> dict[str, int]:
    from data_pipelines import records

    if folder not in self._keys:
      if not os.path.isdir(folder):
        raise SampleError(f"{label}: no dataset folder {folder!r}")
      try:
        manifest = records.Manifest.load(folder)
        table = {}
        for i, rec in enumerate(records.iter_records(folder)):
          k = rec["key"].decode() if isinstance(rec["key"], bytes) else str(rec["key"])
          table[k] = i
      except (records.RecordError, OSError) as e:
        raise SampleError(f"{label}: {e}") from None
      import grain

      paths = [os.path.join(folder, s.path) for s in manifest.shards]
      self._sources[folder] = grain.sources.ArrayRecordDataSource(paths)
      self._keys[folder] = table
    return self._keys[folder]

  def record(self, folder: str, key: str, label: str) -> dict[str, Any]:
    from data_pipelines import records

    table = self.keys(folder, label)
    if key not in table:
      some = ", ".join(list(table)[:3])
      raise SampleError(
        f"{label}: no record {key!r} in {folder} ({len(table)} records, e.g. {some})"
      )
    i = table[key]
    return records.decode_record(self._sources[folder][i], source=f"{folder} record {key!r}")

  def expand(self, folder: str, keys: str, label: str) -> list[str]:
    """A key list: comma-separated keys, globs over the keys, or ``@FILE``."""
    if keys.startswith("@"):
      path = keys[1:]
      if not os.path.isfile(path):
        raise SampleError(f"{label}: key list {path}: no such file")
      with open(path) as f:
        items = [line.strip() for line in f if line.strip()]
    else:
      items = [k for k in keys.split(",") if k]
    table = self.keys(folder, label)
    out = []
    for item in items:
      if any(c in item for c in "*?["):
        hits = sorted(k for k in table if fnmatch.fnmatchcase(k, item))
        if not hits:
          raise SampleError(f"{label}: no record key of {folder} matches {item!r}")
        out += hits
      else:
        out.append(item)
    if not out:
      raise SampleError(f"{label}: no record keys given")
    return out


def face_from_record(config, rec: dict, parts: Sequence[str], label: str) -> Face:
  """The ``parts`` of one decoded record, at the model's image size."""
  from data_pipelines import loaders

  fields = part_fields(config)
  size = int(config.data.image_size)
  face = Face(label)
  for part in parts:
    name = fields[part]
    if name not in rec:
      raise SampleError(f"{label}: the record has no field {name!r} (it has {sorted(rec)})")
    v = rec[name]
    try:
      if part == "image":
        face.image = loaders.decode_image(v, size, source=label)
      elif part == "mask":
        face.mask = loaders.decode_mask(v, size, source=label).astype(np.float32)
      else:
        setattr(face, part, np.asarray(v, np.float32).reshape(-1))
    except ValueError as e:
      raise SampleError(f"{label}: field {name!r}: {e}") from None
  want = {"coeffs": config.data.get("coeff_dim"), "identity": config.data.id_dims[0]}
  for part, dim in want.items():
    v = getattr(face, part)
    if v is not None and dim is not None and v.shape != (int(dim),):
      raise SampleError(
        f"{label}: field {fields[part]!r} has {v.shape[0]} values, the checkpoint expects {dim}"
      )
  return face


def training_manifest(config, label: str):
  """The manifest of the checkpoint's training set (photos are exported like it)."""
  from data_pipelines import records

  try:
    return records.Manifest.load(config.data.path)
  except records.RecordError as e:
    raise SampleError(
      f"{label}: a photo is exported with the encoders of the checkpoint's training set, "
      f"which is unreadable ({e}); give records instead (DATASET_DIR#RECORD_KEY)"
    ) from None


def photo_encoders(config, parts: Sequence[str], label: str) -> list[str]:
  """The exporter encoders that wrote ``parts`` into the training set (from its
  manifest); a one-line error when one of them is no exporter encoder."""
  from data_pipelines import encoders

  manifest = training_manifest(config, label)
  fields = part_fields(config)
  names = []
  for part in parts:
    if part == "image":
      continue
    spec = manifest.fields.get(fields[part])
    if spec is None:
      raise SampleError(f"{config.data.path}: the training set has no field {fields[part]!r}")
    if spec.encoder not in encoders.names():
      raise SampleError(
        f"{label}: a photo needs the encoder that wrote {fields[part]!r}, but this checkpoint's "
        f"training set ({config.data.path}) got it from {spec.encoder!r}, not an exporter "
        f"encoder: give records instead (DATASET_DIR#RECORD_KEY)"
      )
    if spec.encoder not in names:
      names.append(spec.encoder)
  return names


def export_faces(
  config, photos: dict[str, tuple[str, str]], parts: dict[str, Sequence[str]], tmp, weights
) -> dict[str, Face]:
  """Exports ``role -> (path, label)`` photos in one go and reads each role's face."""
  from data_pipelines import encoders as enc_lib
  from data_pipelines import export, records
  from data_pipelines import photos as photos_lib

  needed: list[str] = []
  for role, (path, label) in photos.items():
    if not os.path.isfile(path):
      raise SampleError(f"{label}: no such file")
    for e in photo_encoders(config, parts[role], label):
      if e not in needed:
        needed.append(e)
  size = int(training_manifest(config, label).fields["image"].shape[0])
  out = os.path.join(tmp, "photos")
  weight_map = dict(w.split("=", 1) for w in weights)
  try:
    photos_lib.export_photos({r: p for r, (p, _) in photos.items()}, out, needed, size, weight_map)
  except photos_lib.PhotoError as e:
    msg = str(e)
    for path, label in photos.values():  # name the input as the user did (video frames)
      if msg.startswith(path + ":") and path != label:
        msg = label + msg[len(path) :]
    raise SampleError(msg) from None
  except (enc_lib.WeightsError, export.ExportError) as e:
    raise SampleError(str(e)) from None
  recs = {}
  for rec in records.iter_records(out):
    k = rec["key"].decode() if isinstance(rec["key"], bytes) else str(rec["key"])
    recs[k.split(".", 1)[0]] = rec
  return {r: face_from_record(config, recs[r], parts[r], label) for r, (_, label) in photos.items()}


def frame_sources(spec: str, tmp: str) -> tuple[list[tuple[str, str]], float | None]:
  """``[(path, label)]`` of a driver video's frames (a folder of images or a video file,
  decoded into ``tmp``) and the video's frame rate (None for a folder)."""
  import cv2

  from data_pipelines import export

  if os.path.isdir(spec):
    names = sorted(n for n in os.listdir(spec) if n.lower().endswith(export.IMAGE_EXTS))
    if not names:
      raise SampleError(f"{spec}: no image frames in this folder")
    return [(os.path.join(spec, n), os.path.join(spec, n)) for n in names], None
  if not os.path.isfile(spec):
    raise SampleError(f"{spec}: no such file or folder")
  cap = cv2.VideoCapture(spec)
  fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) if cap.isOpened() else 0.0
  out = []
  os.makedirs(tmp, exist_ok=True)
  while cap.isOpened():
    ok, frame = cap.read()
    if not ok:
      break
    path = os.path.join(tmp, f"frame{len(out):05d}.png")
    cv2.imwrite(path, frame)
    out.append((path, f"{spec} frame {len(out)}"))
  cap.release()
  if not out:
    raise SampleError(f"{spec}: not a readable video file (OpenCV decoded no frames)")
  return out, (fps if fps > 0 else None)


def resolve_inputs(config, job: dict, tmp: str, weights, data: Datasets) -> dict[str, Any]:
  """role -> Face (``driver_video``: a list of Faces) for one job."""
  task = job["task"]
  parts = ROLE_PARTS[task]
  faces: dict[str, Any] = {}
  photos: dict[str, tuple[str, str]] = {}
  photo_parts: dict[str, Sequence[str]] = {}
  for role, need in parts.items():
    spec = job.get(role)
    if not spec:
      raise SampleError(f"--task {task} needs --{role}")
    spec = str(spec)
    rec = record_spec(spec)
    if role == "driver_video":
      if rec is not None:
        folder, keys = rec
        faces[role] = [
          face_from_record(config, data.record(folder, k, spec), need, f"{folder}#{k}")
          for k in data.expand(folder, keys, spec)
        ]
      else:
        frames, fps = frame_sources(spec, os.path.join(tmp, "frames"))
        job["_video_fps"] = fps
        for i, (path, label) in enumerate(frames):
          photos[f"frame{i:05d}"] = (path, label)
          photo_parts[f"frame{i:05d}"] = need
      continue
    if rec is not None:
      folder, key = rec
      faces[role] = face_from_record(config, data.record(folder, key, spec), need, spec)
    else:
      photos[role], photo_parts[role] = (spec, spec), need
  if photos:
    exported = export_faces(config, photos, photo_parts, os.path.join(tmp, "export"), weights)
    frames = sorted(k for k in exported if k.startswith("frame"))
    if frames:
      faces["driver_video"] = [exported[k] for k in frames]
    faces.update({k: v for k, v in exported.items() if not k.startswith("frame")})
  return faces


# ----------------------------------------------------------------------------- audio


def emotion_embedding(text: str, dim: int) -> tuple[np.ndarray, list[str]]:
  """The MiniLM embedding of an emotion, or of several comma-separated ones: their mean
  (a compound emotion, TGDM Fig. 9 a, ``emoa2e.compound_emotion``)."""
  from data_pipelines import text_embed
  from facediff.models import emoa2e

  parts = [p.strip() for p in text.split(",") if p.strip()]
  if not parts:
    raise SampleError(f"--emotion {text!r}: no emotion given")
  try:
    z = text_embed.MiniLMEncoder()([text_embed.emotion_prompt(p) for p in parts])
  except FileNotFoundError as e:
    raise SampleError(f"--emotion: {e}") from None
  if z.shape[1] != dim:
    raise SampleError(f"--emotion: MiniLM gives {z.shape[1]}-D embeddings, EmoA2E takes {dim}")
  return np.asarray(emoa2e.compound_emotion(z), np.float32), parts


def audio_clips(path: str, a2e_config) -> tuple[np.ndarray, float]:
  """(F, clip_frames, n_mfcc) MFCC clips of a WAV file (resampled to the EmoA2E config's
  rate) and the video frame rate they are cut for."""
  from facediff import audio

  if not os.path.isfile(path):
    raise SampleError(f"{path}: no such file")
  mcfg = audio.MFCCConfig(**dict(a2e_config.audio))
  try:
    wav = audio.load_wav(path, mcfg.sample_rate)
  except ValueError as e:
    raise SampleError(str(e).split("\n")[0]) from None
  clips = audio.audio_clips(wav, mcfg)
  if clips.shape[0] == 0:
    raise SampleError(f"{path}: shorter than one video frame (1 / {mcfg.fps:g} s)")
  return np.asarray(clips, np.float32), float(mcfg.fps)


class EmoA2E:
  """A trained EmoA2E workdir: its config at once, its params on first use."""

  def __init__(self, workdir: str, use_ema: bool):
    from facediff.train import emoa2e_task

    self.workdir, self.use_ema = workdir, use_ema
    self.config = inference.read_config(workdir, "emoa2e")
    self.model_config = emoa2e_task.model_config(self.config)
    self.params_kind = "ema" if use_ema and float(self.config.ema.decay) > 0 else "trained"
    self._loaded = None

  def load(self):
    """(params, step) of the latest checkpoint, and a jitted ``emoa2e.apply``."""
    import jax

    from facediff.models import emoa2e

    if self._loaded is None:
      _, _, params, step = inference.load_emoa2e(self.workdir, use_ema=self.use_ema)
      cfg = self.model_config
      self._loaded = (params, int(step), jax.jit(lambda p, *a: emoa2e.apply(cfg, p, *a)))
    return self._loaded

  @property
  def params(self):
    return self.load()[0]

  @property
  def step(self) -> int:
    return self.load()[1]

  def expression(self, clips, identity, emotion, intensity) -> np.ndarray:
    """beta_hat (F, 64) of one clip sequence (TGDM Eq. 9-11)."""
    args = [clips[None], identity[None]]
    if self.model_config.emotion:
      args += [emotion[None], np.asarray([intensity], np.float32)]
    return np.asarray(self.load()[2](self.params, *args))[0]


# ----------------------------------------------------------------------------- driving


def drive_frames(pipe, params, source: Face, drivers, key, job, sampler, progress, a2e=None):
  """(F, H, W, 3) frames of the source driven by ``drivers`` (F, D) coefficients, or by
  audio (``a2e``: (EmoA2E, clips, emotion, intensity)), chunk by chunk.

  One chunk: the pipeline's own ``drive_video`` / ``drive_audio`` with the window.
  Several: the drivers (for audio: the source's coefficients with EmoA2E's expression
  sequence) are averaged over the window on the host (``coeffs.window_mean``, as
  ``drive_video`` does), then each chunk (padded to the same length: one compiled
  program) runs ``drive_video`` with radius 0."""
  import jax

  from facediff.render import coeffs

  radius, chunk = int(job["radius"]), int(job["chunk"])
  num = len(drivers) if a2e is None else len(a2e[1])
  kw = dict(method=sampler[0], num_steps=sampler[1])
  if chunk <= 0 or num <= chunk:
    if a2e is None:
      out = pipe.drive_video(params, source.image, source.coeffs, drivers, key, radius, **kw)
    else:
      from facediff.pipelines import tgdm as pipe_lib

      model, clips, emotion, intensity = a2e
      with_a2e = pipe_lib.TGDMPipeline(
        pipe.config,
        pipe.morphable_model,
        pipe.settings,
        emoa2e_config=model.model_config,
        apply_fn=pipe.apply_fn,
      )
      out = with_a2e.drive_audio(
        params,
        model.params,
        source.image,
        source.coeffs,
        clips,
        key,
        emotion=emotion,
        intensity=intensity,
        radius=radius,
        **kw,
      )
    return np.asarray(jax.device_get(out.image))
  layout = pipe.settings.coeff_layout
  if a2e is not None:
    model, clips, emotion, intensity = a2e
    src = coeffs.split(source.coeffs, layout)
    beta = model.expression(clips, src.identity, emotion, intensity)
    drivers = np.repeat(source.coeffs[None], num, axis=0)
    drivers = coeffs.join(coeffs.split(drivers, layout).replace(expression=beta), layout)
  smooth = coeffs.join(coeffs.window_mean(coeffs.split(drivers, layout), radius), layout)
  frames = []
  for s in range(0, num, chunk):
    part = smooth[s : s + chunk]
    pad = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
    if progress:
      print(f"  frames {s + 1}-{s + len(part)} of {num}", file=sys.stderr, flush=True)
    out = pipe.drive_video(params, source.image, source.coeffs, pad, key, 0, **kw)
    frames.append(np.asarray(jax.device_get(out.image))[: len(part)])
  return np.concatenate(frames)


# ----------------------------------------------------------------------------- outputs


def _u8(images) -> np.ndarray:
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_png(image, path: str) -> None:
  from facediff.train import writers

  writers.save_png(writers.image_grid(np.asarray(image)[None]), path)


def write_mp4(frames_u8: np.ndarray, path: str, fps: float) -> str | None:
  """An MPEG-4 (``mp4v``) file with OpenCV; returns None on success, else the reason
  (the frames and the GIF are written anyway)."""
  import cv2

  h, w = frames_u8.shape[1:3]
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
  if not writer.isOpened():
    return "OpenCV has no MPEG-4 writer here (cv2.VideoWriter did not open)"
  for f in frames_u8:
    writer.write(np.ascontiguousarray(f[..., ::-1]))
  writer.release()
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    return "OpenCV's MPEG-4 writer wrote nothing"
  return None


def write_video(frames, stage: str, name: str, fps: float) -> tuple[list[str], str | None]:
  """``name/frame_NNN.png``, ``name.mp4`` and ``name.gif`` under ``stage``."""
  from PIL import Image

  u8 = _u8(frames)
  files = []
  os.makedirs(os.path.join(stage, name), exist_ok=True)
  for i, f in enumerate(u8):
    rel = os.path.join(name, f"frame_{i:03d}.png")
    Image.fromarray(f).save(os.path.join(stage, rel))
    files.append(rel)
  why = write_mp4(u8, os.path.join(stage, f"{name}.mp4"), fps)
  if why is None:
    files.append(f"{name}.mp4")
  else:
    print(f"launch.sample: {name}.mp4 not written: {why}; see {name}.gif", file=sys.stderr)
  imgs = [Image.fromarray(f) for f in u8]
  imgs[0].save(
    os.path.join(stage, f"{name}.gif"),
    save_all=True,
    append_images=imgs[1:],
    duration=max(20, round(1000.0 / fps)),
    loop=0,
  )
  files.append(f"{name}.gif")
  return files, why


# ----------------------------------------------------------------------------- jobs


def check_job(config, job: dict, workdir: str) -> None:
  """The job's task fits the checkpoint's mode and its inputs are given."""
  task, mode = job.get("task"), str(config.model.mode)
  if task not in TASKS:
    raise SampleError(f"--task {task}: a TGDM checkpoint has the tasks {', '.join(TASKS)}")
  need = "swap" if task == "swap" else "reenact"
  if mode != need:
    raise SampleError(
      f"--task {task}: {workdir} is a {mode!r}-mode TGDM checkpoint (config.model.mode); "
      f"{task} needs a {need!r}-mode one"
    )
  for role in ROLE_PARTS[task]:
    if not job.get(role):
      raise SampleError(f"--task {task} needs --{role}")
  if task == "audio":
    if not job.get("audio"):
      raise SampleError("--task audio needs --audio WAV")
    if not job.get("emoa2e_workdir"):
      raise SampleError("--task audio needs --emoa2e_workdir (a trained EmoA2E workdir)")
  if int(job.get("radius") or 0) < 0:
    raise SampleError(f"--radius {job['radius']}: must be >= 0")


def sampler_of(config, job: dict) -> tuple[str, int | None]:
  """(method, num_steps): the job's ``--method``/``--steps``, else the config's
  (``model.sample_method`` / ``model.sample_steps``; None = all T steps)."""
  from facediff.diffusion import METHODS

  method = job.get("method") or str(config.model.sample_method)
  if method not in METHODS:
    raise SampleError(f"--method {method}: one of {', '.join(METHODS)}")
  steps = job.get("steps") or config.model.sample_steps
  if method == "pndm" and not steps:
    raise SampleError("--method pndm needs --steps N")
  return str(method), None if steps is None else int(steps)


def load_emoa2e(job: dict, cache: dict, use_ema: bool) -> EmoA2E:
  path = job["emoa2e_workdir"]
  if path not in cache:
    cache[path] = EmoA2E(path, use_ema)
  model = cache[path]
  if model.model_config.emotion and not job.get("emotion"):
    raise SampleError(
      f"--task audio: {path} is the emotional EmoA2E; pass --emotion TEXT "
      f"(e.g. happy, or happy,surprised for a compound emotion)"
    )
  if not model.model_config.emotion and job.get("emotion"):
    raise SampleError(
      f"--emotion {job['emotion']!r}: {path} is the emotion-free EmoA2E "
      f"(config.model.emotion = False); it takes no emotion"
    )
  return model


def prepare_job(ctx: dict, job: dict, tmp: str) -> dict:
  """Everything a job needs before sampling (its inputs, EmoA2E and the audio, the
  sampler): every user mistake surfaces here, before the TGDM checkpoint is loaded."""
  config = ctx["config"]
  task = job["task"]
  prep: dict[str, Any] = {"sampler": sampler_of(config, job)}
  if task == "audio":  # cheap checks first: the EmoA2E config, the WAV
    model = load_emoa2e(job, ctx["emoa2e"], ctx["use_ema"])
    clips, fps = audio_clips(str(job["audio"]), model.config)
  prep["faces"] = resolve_inputs(config, job, tmp, ctx["weights"], ctx["data"])
  if task == "audio":
    z, parts = None, []
    if model.model_config.emotion:
      text = str(job["emotion"])
      trained_with = str(model.config.data.get("text_encoder", "minilm"))
      if trained_with != "minilm" and not ctx.get("warned"):
        ctx["warned"] = True
        print(
          f"launch.sample: warning: {model.workdir} was trained with {trained_with!r} emotion "
          f"embeddings (config.data.text_encoder); --emotion is embedded with MiniLM",
          file=sys.stderr,
        )
      if text not in ctx["emotions"]:
        ctx["emotions"][text] = emotion_embedding(text, model.model_config.text_dim)
      z, parts = ctx["emotions"][text]
    intensity = 1.0 if job.get("intensity") is None else float(job["intensity"])
    model.load()
    prep.update(a2e=(model, clips, z, intensity), fps=fps, emotion=parts)
  return prep


def run_job(ctx: dict, job: dict, prep: dict, stage: str, n: int, progress: bool) -> dict:
  """Samples one prepared job into ``stage``; returns its record entry."""
  import jax

  pipe, params = ctx["pipe"], ctx["params"]
  task, faces, sampler = job["task"], prep["faces"], prep["sampler"]
  name = job.get("name") or f"{n:03d}_{task}"
  key = jax.random.key(int(job["seed"]))
  kw = dict(method=sampler[0], num_steps=sampler[1])
  entry: dict[str, Any] = {
    "job": {k: v for k, v in job.items() if not k.startswith("_")},
    "inputs": {r: f.label for r, f in faces.items() if isinstance(f, Face)},
    "sampler": {"method": sampler[0], "num_steps": sampler[1] or "all"},
    "seed": int(job["seed"]),
  }
  if task in ("reenact", "swap"):
    src = faces["source"]
    if task == "reenact":
      drv = faces["driver"]
      out = pipe.reenact(params, src.image[None], src.coeffs[None], drv.coeffs[None], key, **kw)
    else:
      tgt = faces["target"]
      out = pipe.swap(
        params,
        src.image[None],
        src.coeffs[None],
        tgt.image[None],
        tgt.coeffs[None],
        src.identity[None],
        key,
        target_mask=tgt.mask[None],
        **kw,
      )
    write_png(np.asarray(jax.device_get(out.image))[0], os.path.join(stage, f"{name}.png"))
    entry["outputs"] = [f"{name}.png"]
    return entry
  src = faces["source"]
  if task == "video":
    drivers = np.stack([f.coeffs for f in faces["driver_video"]])
    entry["inputs"]["driver_video"] = [f.label for f in faces["driver_video"]]
    fps = float(job.get("fps") or job.get("_video_fps") or 25.0)
    frames = drive_frames(pipe, params, src, drivers, key, job, sampler, progress)
  else:
    model, clips, _, intensity = prep["a2e"]
    entry["emoa2e"] = {
      "workdir": os.path.abspath(model.workdir),
      "checkpoint_step": model.step,
      "params": model.params_kind,
      "variant": model.config.get("variant"),
      "emotion": prep["emotion"],
      "intensity": intensity if model.model_config.emotion else None,
      "clips": int(len(clips)),
    }
    fps = float(job.get("fps") or prep["fps"])
    frames = drive_frames(pipe, params, src, None, key, job, sampler, progress, a2e=prep["a2e"])
  files, why = write_video(frames, stage, name, fps)
  entry.update(outputs=files, frames=int(len(frames)), fps=fps, radius=int(job["radius"]))
  entry["chunk"] = int(job["chunk"])
  if why:
    entry["mp4"] = why
  return entry


def run_jobs(
  jobs: list[dict],
  workdir: str,
  out: str,
  *,
  weights: Sequence[str] = (),
  use_ema: bool = True,
  progress: bool = True,
) -> dict:
  """Runs TGDM ``jobs`` (dicts of the flags' names: task, source, driver, driver_video,
  target, audio, emotion, intensity, emoa2e_workdir, radius, chunk, fps, seed, steps,
  method, name) on the checkpoint of ``workdir`` and moves their outputs into ``out``
  once all of them exist."""
  config = inference.read_config(workdir, "tgdm")
  jobs = [dict(j) for j in jobs]
  for job in jobs:
    job.setdefault("radius", 1)
    job.setdefault("chunk", 16)
    job.setdefault("seed", 0)
    check_job(config, job, workdir)
  tmp = tempfile.mkdtemp(prefix="facediff_tgdm_")
  stage = os.path.join(tmp, "out")
  os.makedirs(stage)
  ctx: dict[str, Any] = dict(
    config=config, weights=tuple(weights), data=Datasets(), emoa2e={}, emotions={}, use_ema=use_ema
  )
  try:
    preps = []
    for n, job in enumerate(jobs):
      if progress:
        print(f"[{n + 1}/{len(jobs)}] {job['task']}: inputs", file=sys.stderr, flush=True)
      preps.append(prepare_job(ctx, job, os.path.join(tmp, f"job{n}")))
    if progress:
      print(f"loading {workdir}", file=sys.stderr, flush=True)
    config, ctx["pipe"], ctx["params"], step = inference.load_tgdm(workdir, use_ema=use_ema)
    entries = []
    for n, (job, prep) in enumerate(zip(jobs, preps, strict=True)):
      t0 = time.time()
      if progress:
        print(f"[{n + 1}/{len(jobs)}] {job['task']}: sampling", file=sys.stderr, flush=True)
      entries.append(run_job(ctx, job, prep, stage, n, progress))
      if progress:
        print(f"[{n + 1}/{len(jobs)}] done in {time.time() - t0:.1f} s", file=sys.stderr)
    record = {
      "workdir": os.path.abspath(workdir),
      "model": "tgdm",
      "mode": str(config.model.mode),
      "variant": config.get("variant"),
      "checkpoint_step": int(step),
      "params": "ema" if use_ema and float(config.ema.decay) > 0 else "trained",
      "jobs": entries,
    }
    with open(os.path.join(stage, "record.json"), "w") as f:
      json.dump(record, f, indent=2, default=str)
    os.makedirs(out, exist_ok=True)
    for entry in os.listdir(stage):
      dst = os.path.join(out, entry)
      if os.path.isdir(dst):
        shutil.rmtree(dst)
      shutil.move(os.path.join(stage, entry), dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return record
