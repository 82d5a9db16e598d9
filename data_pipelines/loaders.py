"""Grain input pipeline over facediff embedding shards (see ``records.py``).

Public entry points (``config`` is an ``ml_collections.ConfigDict``):

* ``make_train_iterator(config, mesh)``: endless, shuffled, per-host sharded
  self-reconstruction batches (DiffSFSR training: background, identity and
  expression all from the same image), placed on ``mesh`` as global ``jax.Array``s
  sharded over the batch axis by ``P(('data', 'fsdp'))``. The iterator is a grain
  ``DatasetIterator``: save and restore it with orbax next to the train state::

      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=save_args(it)))
      mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=restore_args(it)))

* ``make_eval_triplets(config, task, seed, mesh=None)``: one pass over the evaluation
  triplets of ``task`` in {"reconstruct", "swap", "reenact", "sfsr"}, deterministic
  in ``seed``, padded to whole global batches (``valid`` marks the real ones).

Config fields read (``config.data.*``; optional ones have the default shown):

* ``path``: dataset folder holding ``manifest.json`` and the ArrayRecord shards.
* ``global_batch_size``: examples per step over all hosts; must divide by
  ``jax.process_count()`` (each host loads ``global_batch_size / process_count``).
* ``image_size``: side of the square image/mask after decoding and resizing.
* ``id_fields``: embedding fields that form the identity compound, in order.
* ``exp_field``: the expression embedding field.
* ``seed``: shuffle seed of the training stream.
* ``num_workers``: grain worker processes (0 = decode in the main process).
* ``id_dims`` (None): expected last dimension of each ``id_fields`` entry.
* ``exp_dim`` (None): expected last dimension of ``exp_field``.
* ``image_field`` ("image"), ``mask_field`` ("mask"): encoded image (PNG/JPEG bytes)
  and face mask (uint8 HxW array or encoded bytes; nonzero = face).
* ``latent_field`` (""): cached VAE latent (h, w, C) of the image, "" for none;
  ``latent_channels`` (None) and ``latent_downsample`` (8) are checked against the
  manifest (h = image_size / latent_downsample).
* ``crop_fields`` ([]): encoder crop kinds (``dlib150``, ``arcface112``,
  ``facenet160``, ``fer64``, ...) whose stored ``crop_<kind>`` transforms the batches
  carry, rescaled to ``image_size`` (see below).
* ``coeff_field`` (""): 3DMM coefficient vector of each record (e.g. ``coeffs``, D3DFR's
  257), "" for none; batches then carry ``"coeffs"`` (B, d) of the target (background)
  record; ``coeff_dim`` (None) is checked against the manifest.
* ``pair_field`` (""): training only. When set, each training example also carries a
  *source* record drawn from the same group (records with equal ``pair_field``, e.g. a
  video or an identity; another record of the group when it has one): ``"source_image"``
  (B,S,S,3), with ``coeff_field`` also ``"source_coeffs"``, and ``src["source"]``. TGDM's
  reenactment samples source and target from the same video (TGDM 5.1). The group of
  every record is read from the manifest's ``extra["groups"][pair_field]`` (one value per
  record, as data_pipelines.synthetic_3dmm writes it) or, without it, from the records
  themselves once at start (a pass over the dataset).
* ``num_epochs`` (None = repeat forever), ``read_threads`` (2),
  ``prefetch_buffer_size`` (2 * read_threads batches), ``num_eval`` (None = every
  record), ``eval_source_images`` (True: eval batches also carry the id/exp images).

``id_dims`` / ``exp_dim`` / ``latent_channels`` / ``crop_fields`` are what makes a
dataset exported with other encoders fail at start (``Manifest.check_fields``,
naming the field, the manifest's dimension and the config's); without them any
dimension is accepted.

A batch of the iterators is ``{"bkg_image": (B,S,S,3) float32 in [-1,1],
"bkg_mask": (B,S,S,1) float32 in {0,1} (1 = face), "latent": (B,h,w,C) if
configured, "id": {field: (B,d)}, "exp": (B,d), "src": {"bkg", "id", "exp"}: int32
record indices, "crops": {kind: (B,2,3) float32} if ``crop_fields``, "coeffs": (B,d)
if ``coeff_field``, "source_image" / "source_coeffs" with ``pair_field``}``; eval batches
add ``"valid"`` (and ``"id_image"``, ``"exp_image"``, with ``crop_fields`` also
``"id_crops"``, ``"exp_crops"``). B is the global batch with a mesh, else the host
batch. The host-level datasets (``make_train_dataset``, ``make_eval_dataset``) keep
images and masks uint8; ``to_model_inputs`` converts (on the devices when a mesh is
given).

``crops[kind]`` maps pixels of the batch's (resized) image to pixels of that
encoder's input crop, in cv2.warpAffine's convention (pixel centres at integers):
the stored ``crop_<kind>`` (from the stored n x n image) composed with the resize
n -> ``image_size`` S, whose pixel x sits at stored pixel (x + 0.5) n / S - 0.5.
``facediff.losses.align.encoder_crop(images, crops[kind], kind)`` cuts the crop.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import cv2
import grain
import jax
import numpy as np
from jax.sharding import Mesh

from data_pipelines import records
from data_pipelines.records import RecordError
from facediff import partitioning

TASKS = ("reconstruct", "swap", "reenact", "sfsr")


# ----------------------------------------------------------------------------- config


def _get(data_cfg, key: str, default: Any = None) -> Any:
  """``data_cfg.get`` that also works for plain mappings and missing keys."""
  try:
    value = data_cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def _require(data_cfg, key: str) -> Any:
  value = _get(data_cfg, key)
  if value is None:
    raise KeyError(f"config.data.{key} is required by data_pipelines.loaders")
  return value


def expected_fields(data_cfg) -> dict[str, int | None]:
  """Fields the config needs from the manifest -> expected last dim (None: any)."""
  id_fields = list(_require(data_cfg, "id_fields"))
  id_dims = _get(data_cfg, "id_dims")
  if id_dims is not None and len(id_dims) != len(id_fields):
    raise ValueError(
      f"config.data.id_dims {list(id_dims)} and config.data.id_fields "
      f"{id_fields} have different lengths"
    )
  out: dict[str, int | None] = {
    _get(data_cfg, "image_field", "image"): None,
    _get(data_cfg, "mask_field", "mask"): None,
  }
  for i, f in enumerate(id_fields):
    out[f] = None if id_dims is None else int(id_dims[i])
  out[_require(data_cfg, "exp_field")] = _get(data_cfg, "exp_dim")
  latent = _get(data_cfg, "latent_field", "")
  if latent:
    out[latent] = _get(data_cfg, "latent_channels")
  for kind in crop_kinds(data_cfg):
    out[CROP_PREFIX + kind] = 3  # (2, 3) matrices
  coeff = _get(data_cfg, "coeff_field", "")
  if coeff:
    out[coeff] = _get(data_cfg, "coeff_dim")
  pair = _get(data_cfg, "pair_field", "")
  if pair:
    out[pair] = None
  return out


CROP_PREFIX = "crop_"  # as data_pipelines.export writes them


def crop_kinds(data_cfg) -> list[str]:
  """``config.data.crop_fields`` as a list of crop kinds (default none)."""
  kinds = _get(data_cfg, "crop_fields", ())
  if isinstance(kinds, str):
    raise ValueError(f"config.data.crop_fields={kinds!r}: expected a list of crop kinds")
  return list(kinds)


def resize_matrix(src_hw: tuple[int, int], size: int) -> np.ndarray:
  """2x3 matrix from the pixels of a ``size`` x ``size`` resize (cv2.resize) of an
  image of ``src_hw`` to the pixels of that image: x_src = (x + 0.5) w / size - 0.5."""
  sy, sx = src_hw[0] / size, src_hw[1] / size
  return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])


def rescale_crop(crop: np.ndarray, src_hw: tuple[int, int], size: int) -> np.ndarray:
  """A stored image -> crop transform re-expressed from the resized image's pixels."""
  m = np.asarray(crop, np.float64)
  if m.shape != (2, 3):
    raise RecordError(f"crop transform has shape {m.shape}, expected (2, 3)")
  r = resize_matrix(src_hw, size)
  out = m[:, :2] @ r[:, :2]
  return np.concatenate([out, (m[:, :2] @ r[:, 2] + m[:, 2])[:, None]], 1).astype(np.float32)


def host_batch_size(global_batch_size: int, process_count: int) -> int:
  """Per-host batch: the global batch split evenly over the processes."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"config.data.global_batch_size={global_batch_size} is not a positive "
      f"multiple of the process count {process_count}"
    )
  return global_batch_size // process_count


# ----------------------------------------------------------------------------- source


def open_source(data_cfg) -> tuple[grain.sources.ArrayRecordDataSource, records.Manifest]:
  """Opens the shards of ``data.path`` after checking the manifest against the config.

  Fails at once (before any step) if the folder has no manifest, lacks a field the
  config needs, has another embedding dimension than the config expects, or if a
  shard is missing or holds another number of records than the manifest says.
  """
  folder = os.fspath(_require(data_cfg, "path"))
  manifest = records.Manifest.load(folder)
  manifest.check_fields(expected_fields(data_cfg), folder=folder)
  for kind in crop_kinds(data_cfg):
    shape = list(manifest.fields[CROP_PREFIX + kind].shape)
    if shape != [2, 3]:
      raise RecordError(
        f"{os.path.join(folder, records.MANIFEST)}: field {CROP_PREFIX + kind!r} has "
        f"shape {shape}, expected [2, 3] (an affine transform)"
      )
  latent = _get(data_cfg, "latent_field", "")
  if latent:
    shape = list(manifest.fields[latent].shape)
    side = int(_require(data_cfg, "image_size")) // int(_get(data_cfg, "latent_downsample", 8))
    if len(shape) != 3 or shape[0] != side or shape[1] != side:
      raise RecordError(
        f"{os.path.join(folder, records.MANIFEST)}: field {latent!r} has shape "
        f"{shape}, the config expects ({side}, {side}, C) for image_size "
        f"{data_cfg.image_size}"
      )
  if not manifest.shards:
    raise RecordError(f"{os.path.join(folder, records.MANIFEST)}: no shards listed")
  paths = []
  for s in manifest.shards:
    p = os.path.join(folder, s.path)
    if not os.path.exists(p):
      raise RecordError(f"{p}: shard listed in the manifest is missing")
    paths.append(p)
  source = grain.sources.ArrayRecordDataSource(paths)
  if len(source) != manifest.num_records:
    raise RecordError(
      f"{folder}: shards hold {len(source)} records, the manifest says {manifest.num_records}"
    )
  return source, manifest


# ----------------------------------------------------------------------------- decoding


def decode_image_native(data: bytes, *, source: str = "<image>") -> np.ndarray:
  """PNG/JPEG bytes -> (H, W, 3) uint8 RGB at the stored size."""
  buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else None
  img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf is not None and buf.size else None
  if img is None:
    raise RecordError(f"{source}: not a decodable image")
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
  """(H, W, 3) -> (size, size, 3): area-downscaled / cubic-upscaled."""
  return _resize(img, size, cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC)


def decode_image_uint8(data: bytes, size: int, *, source: str = "<image>") -> np.ndarray:
  """PNG/JPEG bytes -> (size, size, 3) uint8 RGB (area-downscaled / cubic-upscaled)."""
  return resize_image(decode_image_native(data, source=source), size)


def to_unit_range(img):
  """uint8 [0, 255] -> float32 [-1, 1] (numpy or jax arrays): x / 127.5 - 1."""
  return img.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def decode_image(data: bytes, size: int, *, source: str = "<image>") -> np.ndarray:
  """PNG/JPEG bytes -> (size, size, 3) float32 RGB in [-1, 1]."""
  return to_unit_range(decode_image_uint8(data, size, source=source))


def decode_mask(value: Any, size: int, *, source: str = "<mask>") -> np.ndarray:
  """uint8 mask (array or encoded bytes), nonzero = face -> (size, size, 1) uint8 {0, 1}."""
  if isinstance(value, (bytes, bytearray)):
    m = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_GRAYSCALE)
    if m is None:
      raise RecordError(f"{source}: not a decodable mask image")
  else:
    m = np.asarray(value)
    if m.ndim == 3 and m.shape[-1] == 1:
      m = m[..., 0]
    if m.ndim != 2:
      raise RecordError(f"{source}: mask has shape {m.shape}, expected (H, W)")
  m = (m > 0).astype(np.uint8)
  return _resize(m, size, cv2.INTER_NEAREST)[..., None]


IMAGE_KEYS = ("bkg_image", "id_image", "exp_image", "source_image")
MASK_KEYS = ("bkg_mask",)


def to_model_inputs(batch: dict) -> dict:
  """Host uint8 images -> float32 [-1, 1], uint8 masks -> float32 {0, 1}.

  Works on numpy (no mesh) and, jitted, on global jax.Arrays: with a mesh the
  host ships uint8 (4x less to copy and transfer) and the device converts.
  """
  out = dict(batch)
  for k in IMAGE_KEYS:
    if k in out:
      out[k] = to_unit_range(out[k])
  for k in MASK_KEYS:
    if k in out:
      out[k] = out[k].astype(np.float32)
  return out


class HostToModelInputs(grain.transforms.Map):
  def map(self, batch):
    return to_model_inputs(batch)


def _resize(img: np.ndarray, size: int, interp: int) -> np.ndarray:
  if img.shape[0] == size and img.shape[1] == size:
    return img
  return cv2.resize(img, (size, size), interpolation=interp)


def _field(rec: Mapping[str, Any], name: str, where: str) -> Any:
  try:
    return rec[name]
  except KeyError:
    raise RecordError(f"{where}: record has no field {name!r} (it has {sorted(rec)})") from None


def _embedding(rec, name, dim, where) -> np.ndarray:
  v = np.asarray(_field(rec, name, where), np.float32)
  if dim is not None and v.shape[-1:] != (dim,):
    raise RecordError(
      f"{where}: field {name!r} has shape {v.shape}, the config expects last dimension {dim}"
    )
  return v


class _Reader:
  """Reads and decodes one record into the per-image parts of a triplet."""

  def __init__(self, data_cfg, source, manifest, folder: str):
    self.size = int(_require(data_cfg, "image_size"))
    self.image_field = _get(data_cfg, "image_field", "image")
    self.mask_field = _get(data_cfg, "mask_field", "mask")
    self.id_fields = list(_require(data_cfg, "id_fields"))
    dims = _get(data_cfg, "id_dims")
    self.id_dims = [None] * len(self.id_fields) if dims is None else [int(d) for d in dims]
    self.exp_field = _require(data_cfg, "exp_field")
    self.exp_dim = _get(data_cfg, "exp_dim")
    self.latent_field = _get(data_cfg, "latent_field", "")
    self.coeff_field = _get(data_cfg, "coeff_field", "")
    self.coeff_dim = _get(data_cfg, "coeff_dim")
    self.crop_kinds = crop_kinds(data_cfg)
    self.source = source
    self.folder = folder
    self.bounds = np.cumsum([s.count for s in manifest.shards])
    self.shard_paths = [s.path for s in manifest.shards]

  def where(self, index: int) -> str:
    k = int(np.searchsorted(self.bounds, index, side="right"))
    start = 0 if k == 0 else int(self.bounds[k - 1])
    return os.path.join(self.folder, self.shard_paths[k]) + f" record {index - start}"

  def record(self, index: int, raw: bytes | None = None) -> dict[str, Any]:
    raw = self.source[index] if raw is None else raw
    return records.decode_record(raw, source=self.where(index))

  def background(self, rec, index) -> dict[str, np.ndarray]:
    w = self.where(index)
    image, crops = self.image_and_crops(rec, index)
    out = {
      "bkg_image": image,
      "bkg_mask": decode_mask(
        _field(rec, self.mask_field, w), self.size, source=f"{w} field {self.mask_field!r}"
      ),
    }
    if self.latent_field:
      out["latent"] = np.asarray(_field(rec, self.latent_field, w), np.float32)
    if self.coeff_field:
      out["coeffs"] = self.coeffs(rec, index)
    if self.crop_kinds:
      out["crops"] = crops
    return out

  def coeffs(self, rec, index) -> np.ndarray:
    return _embedding(rec, self.coeff_field, self.coeff_dim, self.where(index))

  def identity(self, rec, index) -> dict[str, np.ndarray]:
    w = self.where(index)
    return {f: _embedding(rec, f, d, w) for f, d in zip(self.id_fields, self.id_dims, strict=True)}

  def expression(self, rec, index) -> np.ndarray:
    return _embedding(rec, self.exp_field, self.exp_dim, self.where(index))

  def image_and_crops(self, rec, index) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The resized image and its ``crop_fields`` transforms, rescaled to it."""
    w = self.where(index)
    native = decode_image_native(
      _field(rec, self.image_field, w), source=f"{w} field {self.image_field!r}"
    )
    crops = {}
    for kind in self.crop_kinds:
      name = CROP_PREFIX + kind
      try:
        crops[kind] = rescale_crop(_field(rec, name, w), native.shape[:2], self.size)
      except RecordError as e:
        raise RecordError(f"{w} field {name!r}: {e}") from None
    return resize_image(native, self.size), crops


def _triplet(
  reader: _Reader,
  a: int,
  b: int,
  c: int,
  *,
  source_images: bool,
  cache: dict[int, dict] | None = None,
) -> dict[str, Any]:
  """[I_bkg, I_id, I_exp] = records (a, b, c) (DiffSFSR Sec. 3.4 training sample)."""
  cache = {} if cache is None else cache
  for i in {a, b, c}:
    if i not in cache:
      cache[i] = reader.record(i)
  out = reader.background(cache[a], a)
  out["id"] = reader.identity(cache[b], b)
  out["exp"] = reader.expression(cache[c], c)
  out["src"] = {"bkg": np.int32(a), "id": np.int32(b), "exp": np.int32(c)}
  if source_images:
    images = {a: (out["bkg_image"], out.get("crops", {}))}
    for key, i in (("id", b), ("exp", c)):
      if i not in images:
        images[i] = reader.image_and_crops(cache[i], i)
      out[f"{key}_image"] = images[i][0]
      if reader.crop_kinds:
        out[f"{key}_crops"] = images[i][1]
  return out


class SelfReconstruction(grain.transforms.Map):
  """Training triplet: background, identity and expression from the same record."""

  def __init__(self, reader: _Reader):
    self.reader = reader

  def map(self, element: tuple[int, bytes]):
    i, raw = element
    return _triplet(
      self.reader, i, i, i, source_images=False, cache={i: self.reader.record(i, raw)}
    )


def group_table(data_cfg, source, manifest: records.Manifest) -> np.ndarray:
  """(N,) group value of every record for ``data.pair_field``: from the manifest's
  ``extra["groups"]`` when the writer stored it, else read from every record."""
  field = _require(data_cfg, "pair_field")
  stored = (manifest.extra.get("groups") or {}).get(field)
  if stored is not None:
    table = np.asarray(stored)
    if table.shape != (len(source),):
      raise RecordError(
        f"{os.path.join(os.fspath(data_cfg.path), records.MANIFEST)}: extra.groups.{field} "
        f"has {table.shape} entries for {len(source)} records"
      )
    return table
  values = [records.decode_record(source[i]).get(field) for i in range(len(source))]
  missing = [i for i, v in enumerate(values) if v is None]
  if missing:
    raise RecordError(f"{data_cfg.path}: record {missing[0]} has no field {field!r}")
  return np.asarray([np.asarray(v).item() for v in values])


class SameGroupSource(grain.transforms.MapWithIndex):
  """Adds a source record of the same group to a self-reconstruction example (TGDM:
  source and target from the same video). The partner is drawn from the group's other
  records with ``np.random.default_rng((seed, stream position))``: deterministic, and
  different from epoch to epoch."""

  def __init__(self, reader: _Reader, groups: np.ndarray, seed: int):
    self.reader = reader
    self.seed = int(seed)
    order = np.argsort(groups, kind="stable")
    _, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    self.members = {}
    for start, count in zip(starts, counts, strict=True):
      ids = order[start : start + count]
      for i in ids:
        self.members[int(i)] = ids

  def map_with_index(self, index: int, element: tuple[int, bytes]):
    i, raw = element
    rec = self.reader.record(i, raw)
    out = _triplet(self.reader, i, i, i, source_images=False, cache={i: rec})
    others = self.members[i][self.members[i] != i]
    if len(others):
      j = int(np.random.default_rng((self.seed, int(index))).choice(others))
    else:
      j = i
    src = rec if j == i else self.reader.record(j)
    out["source_image"] = self.reader.image_and_crops(src, j)[0]
    if self.reader.coeff_field:
      out["source_coeffs"] = self.reader.coeffs(src, j)
    out["src"]["source"] = np.int32(j)
    return out


class _TagIndex(grain.transforms.MapWithIndex):
  """Pairs each raw record with its global index (recorded as the source id).

  Past the first epoch grain passes indices beyond the length (the source reads
  them modulo its length), so the record index is ``index mod num_records``.
  """

  def __init__(self, num_records: int):
    self.num_records = int(num_records)

  def map_with_index(self, index: int, element: bytes):
    return int(index) % self.num_records, element


class EvalTriplet(grain.transforms.Map):
  """Evaluation triplet from a row ``(a, b, c, valid)`` of the triplet table."""

  def __init__(self, reader: _Reader, source_images: bool):
    self.reader = reader
    self.source_images = source_images

  def map(self, row):
    a, b, c, valid = (int(x) for x in row)
    out = _triplet(self.reader, a, b, c, source_images=self.source_images)
    out["valid"] = np.bool_(valid)
    return out


# ----------------------------------------------------------------------------- triplets


def triplet_table(num_records: int, task: str, seed: int, num: int | None = None) -> np.ndarray:
  """(num, 3) int64 rows (bkg, id, exp) of record indices for an evaluation task.

  Row i uses record ``a = i mod N`` as the target (background). ``swap``: id from
  another record b (bkg, exp from a); ``reenact``: exp from another record b (bkg,
  id from a); ``sfsr``: id from b and exp from c, a, b, c pairwise different;
  ``reconstruct``: all from a. b and c are drawn with ``np.random.default_rng(seed)``
  as nonzero offsets from a, so the table depends only on (N, task, seed, num).
  """
  if task not in TASKS:
    raise ValueError(f"unknown triplet task {task!r}; expected one of {TASKS}")
  n = int(num_records)
  num = n if num is None else int(num)
  need = {"reconstruct": 1, "swap": 2, "reenact": 2, "sfsr": 3}[task]
  if n < need:
    raise ValueError(f"task {task!r} needs at least {need} records, the dataset has {n}")
  rng = np.random.default_rng(seed)
  a = np.arange(num, dtype=np.int64) % n
  if task == "reconstruct":
    return np.stack([a, a, a], 1)
  o1 = rng.integers(1, n, size=num)  # in [1, n-1]: b != a
  b = (a + o1) % n
  if task == "swap":
    return np.stack([a, b, a], 1)
  if task == "reenact":
    return np.stack([a, a, b], 1)
  o2 = rng.integers(1, n - 1, size=num)  # in [1, n-2], then skip o1: c != a, b
  o2 = np.where(o2 >= o1, o2 + 1, o2)
  return np.stack([a, b, (a + o2) % n], 1)


# ----------------------------------------------------------------------------- placement


class PlaceOnMesh(grain.transforms.Map):
  """Host batch (numpy tree) -> global jax.Arrays with the global batch on axis 0."""

  def __init__(self, mesh: Mesh, global_batch_size: int):
    self.sharding = partitioning.batch_sharding(mesh)
    self.global_batch_size = int(global_batch_size)
    self.convert = jax.jit(to_model_inputs, out_shardings=self.sharding)

  def map(self, batch):
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(
        self.sharding, x, (self.global_batch_size,) + x.shape[1:]
      )

    return self.convert(jax.tree.map(put, batch))


# ----------------------------------------------------------------------------- pipelines


def _host(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return int(process_index), int(process_count)


def _finish(ds: grain.MapDataset, data_cfg, per_host: int) -> grain.IterDataset:
  ds = ds.batch(per_host, drop_remainder=True)
  it = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=int(_get(data_cfg, "read_threads", 2)),
      prefetch_buffer_size=int(
        _get(data_cfg, "prefetch_buffer_size", 2 * int(_get(data_cfg, "read_threads", 2)))
      ),
    )
  )
  workers = int(_get(data_cfg, "num_workers", 0))
  if workers > 0:
    # grain's worker processes read absl flags: run under absl.app (launch/) or parse
    # the flags first (tests/conftest.py does).
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it


def make_train_dataset(
  config, *, process_index: int | None = None, process_count: int | None = None
) -> grain.IterDataset:
  """Per-host training stream of numpy batches (self-reconstruction triplets).

  Images and masks stay uint8 here (``to_model_inputs`` converts them, on the
  devices when ``make_train_iterator`` is given a mesh).

  The records are first split evenly over the hosts (host k takes records k, k+P,
  ... of the first P * floor(N / P)), then each host shuffles its share with
  ``data.seed`` (reshuffled every epoch), repeats ``data.num_epochs`` times (None:
  forever), decodes and batches to ``global_batch_size / P``.
  """
  data_cfg = config.data
  pi, pc = _host(process_index, process_count)
  per_host = host_batch_size(int(_require(data_cfg, "global_batch_size")), pc)
  source, manifest = open_source(data_cfg)
  reader = _Reader(data_cfg, source, manifest, os.fspath(data_cfg.path))
  n = len(source) - len(source) % pc
  if n // pc < per_host:
    raise ValueError(
      f"{data_cfg.path}: {len(source)} records give each of {pc} "
      f"hosts {n // pc}, fewer than one host batch of {per_host}"
    )
  ds = grain.MapDataset.source(source).map_with_index(_TagIndex(len(source)))
  ds = ds[:n][pi::pc]
  ds = ds.shuffle(seed=int(_require(data_cfg, "seed")))
  ds = ds.repeat(_get(data_cfg, "num_epochs"))
  if _get(data_cfg, "pair_field", ""):
    groups = group_table(data_cfg, source, manifest)
    ds = ds.map_with_index(SameGroupSource(reader, groups, int(_require(data_cfg, "seed"))))
  else:
    ds = ds.map(SelfReconstruction(reader))
  return _finish(ds, data_cfg, per_host)


def make_train_iterator(
  config,
  mesh: Mesh | None = None,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """Checkpointable iterator of training batches; global jax.Arrays if ``mesh``."""
  ds = make_train_dataset(config, process_index=process_index, process_count=process_count)
  if mesh is None:
    ds = ds.map(HostToModelInputs())
  else:
    ds = ds.map(PlaceOnMesh(mesh, int(config.data.global_batch_size)))
  return iter(ds)


def make_eval_dataset(
  config,
  task: str,
  seed: int,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """One pass of per-host numpy batches of ``task`` triplets (see ``triplet_table``).

  Images and masks stay uint8, as in ``make_train_dataset``.

  The table (``data.num_eval`` rows, default one per record) is padded with copies
  of its first row (``valid = False``) to a whole number of global batches, so every
  host yields the same number of equally sized batches.
  """
  data_cfg = config.data
  pi, pc = _host(process_index, process_count)
  gbs = int(_require(data_cfg, "global_batch_size"))
  per_host = host_batch_size(gbs, pc)
  source, manifest = open_source(data_cfg)
  reader = _Reader(data_cfg, source, manifest, os.fspath(data_cfg.path))
  table = triplet_table(len(source), task, seed, _get(data_cfg, "num_eval"))
  pad = (-len(table)) % gbs
  valid = np.concatenate([np.ones(len(table), np.int64), np.zeros(pad, np.int64)])
  table = np.concatenate([table, np.repeat(table[:1], pad, 0)], 0)
  rows = np.concatenate([table, valid[:, None]], 1)
  ds = grain.MapDataset.source(list(rows))[pi::pc]
  ds = ds.map(EvalTriplet(reader, bool(_get(data_cfg, "eval_source_images", True))))
  return _finish(ds, data_cfg, per_host)


def make_eval_triplets(
  config,
  task: str,
  seed: int,
  mesh: Mesh | None = None,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """Iterator over one pass of evaluation batches; global jax.Arrays if ``mesh``."""
  ds = make_eval_dataset(
    config, task, seed, process_index=process_index, process_count=process_count
  )
  if mesh is None:
    ds = ds.map(HostToModelInputs())
  else:
    ds = ds.map(PlaceOnMesh(mesh, int(config.data.global_batch_size)))
  return iter(ds)


def triplet_batch(config, rows, *, source_images: bool = True) -> dict[str, Any]:
  """One host batch (model inputs, numpy) of explicit triplets: ``rows`` is a sequence
  of record-index triples (bkg, id, exp) of the dataset at ``config.data.path``, as in
  ``make_eval_triplets`` (``valid`` all True). For inference on chosen records."""
  data_cfg = config.data
  source, manifest = open_source(data_cfg)
  reader = _Reader(data_cfg, source, manifest, os.fspath(data_cfg.path))
  n = len(source)
  cache: dict[int, dict] = {}
  items = []
  for row in rows:
    a, b, c = (int(x) for x in row)
    for i in (a, b, c):
      if not 0 <= i < n:
        raise RecordError(f"{data_cfg.path}: record index {i} out of range (has {n} records)")
    item = _triplet(reader, a, b, c, source_images=source_images, cache=cache)
    item["valid"] = np.bool_(True)
    items.append(item)
  if not items:
    raise ValueError("triplet_batch: no rows")
  batch = jax.tree.map(lambda *xs: np.stack(xs), *items)
  return to_model_inputs(batch)


# ----------------------------------------------------------------------------- checkpoints


def save_args(iterator: grain.DatasetIterator):
  """orbax args saving a grain iterator's position (one JSON file per process)."""
  return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator):
  """orbax args restoring ``iterator`` (built from the same config) in place."""
  return grain.checkpoint.CheckpointRestore(iterator)
