"""dlib's ``.dat`` serialisation of the face-recognition ResNet -> facediff params.

Reads ``dlib_face_recognition_resnet_model_v1.dat`` (shipped in the
face-recognition-models package) with plain Python and numpy: no dlib import. The reader
walks the file exactly as dlib's ``deserialize(anet_type&)`` would, checks every version
string, layer setting and tensor shape against ``facediff.models.dlib_resnet``'s
architecture, consumes the file to its last byte, and raises ``DlibDatError`` naming the
file and the byte offset on anything unexpected.

Layout (dlib sources: serialize.h, float_details.h, cuda/tensor.h, dnn/core.h,
dnn/layers.h, dnn/input.h, dnn/loss.h):

* ``add_loss_layer``: int version 1, ``loss_metric_2`` (margin, distance threshold), the net.
* Each layer wrapper writes its version, then everything beneath it, then its layer's
  settings, 3 bools and its gradient/cache tensors. Tag and skip wrappers write only
  version 1. So the file holds the wrappers' versions from the output down to the input,
  then the input layer, then the layers' settings from the input up.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

from facediff.convert import common
from facediff.models.dlib_resnet import DlibResNetConfig, abstract_params, conv_padding

DLIB_RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"

# float_details' special exponents (dlib/float_details.h).
_EXP_INF, _EXP_NINF, _EXP_NAN = 32000, 32001, 32002


class DlibDatError(ValueError):
  """A dlib ``.dat`` file is truncated, corrupt or holds a different network."""

  def __init__(self, path: str, offset: int, message: str):
    self.path, self.offset = path, offset
    super().__init__(f"{path}: at byte {offset}: {message}")


class _Reader:
  """dlib's primitive encodings (dlib/serialize.h, dlib/cuda/tensor.h) over a byte string."""

  def __init__(self, data: bytes, path: str):
    self.data, self.path, self.pos = data, path, 0

  def error(self, message: str, at: int | None = None) -> DlibDatError:
    return DlibDatError(self.path, self.pos if at is None else at, message)

  def take(self, n: int, what: str) -> bytes:
    left = len(self.data) - self.pos
    if n > left:
      raise self.error(f"file ends while reading {what}: needs {n} byte(s), {left} left")
    out = self.data[self.pos : self.pos + n]
    self.pos += n
    return out

  def integer(self, what: str, signed: bool = True) -> int:
    """dlib ``pack_int``: a control byte (low 4 bits = byte count 1-8, 0x80 = negative,
    0x70 reserved = 0), then the magnitude little-endian."""
    start = self.pos
    ctrl = self.take(1, what)[0]
    size, negative = ctrl & 0x0F, bool(ctrl & 0x80)
    if ctrl & 0x70 or not 1 <= size <= 8 or (negative and not signed):
      raise self.error(f"bad integer control byte 0x{ctrl:02x} for {what}", start)
    value = int.from_bytes(self.take(size, what), "little")
    return -value if negative else value

  def real(self, what: str) -> float:
    """dlib ``float_details``: mantissa (int64) then exponent (int16), value = m * 2^e."""
    start = self.pos
    if start < len(self.data) and self.data[start] & 0x70:
      raise self.error(f"{what}: old ASCII float format is not supported", start)
    mantissa = self.integer(f"{what} (mantissa)")
    exponent = self.integer(f"{what} (exponent)")
    if not -(2**15) <= exponent < 2**15:
      raise self.error(f"{what}: exponent {exponent} out of int16 range", start)
    if exponent >= _EXP_INF:
      return {_EXP_INF: np.inf, _EXP_NINF: -np.inf}.get(exponent, np.nan)
    return float(np.ldexp(np.float64(mantissa), exponent))

  def boolean(self, what: str) -> bool:
    start = self.pos
    ch = self.take(1, what)
    if ch not in (b"0", b"1"):
      raise self.error(f"{what}: expected a bool ('0' or '1'), got {ch!r}", start)
    return ch == b"1"

  def string(self, what: str) -> str:
    start = self.pos
    n = self.integer(f"{what} (length)", signed=False)
    raw = self.take(n, what)
    try:
      return raw.decode("ascii")
    except UnicodeDecodeError:
      raise self.error(f"{what}: not an ASCII string: {raw[:40]!r}", start) from None

  def expect_int(self, want: int | tuple[int, ...], what: str) -> int:
    start = self.pos
    got = self.integer(what)
    wants = want if isinstance(want, tuple) else (want,)
    if got not in wants:
      raise self.error(f"{what}: expected {' or '.join(map(str, wants))}, got {got}", start)
    return got

  def expect_string(self, want: str | tuple[str, ...], what: str) -> str:
    start = self.pos
    got = self.string(what)
    wants = want if isinstance(want, tuple) else (want,)
    if got not in wants:
      raise self.error(f"{what}: expected {' or '.join(map(repr, wants))}, got {got!r}", start)
    return got

  def dims(self, what: str) -> tuple[int, int, int, int]:
    dims = tuple(self.integer(f"{what} (dimension)") for _ in range(4))
    if any(d < 0 for d in dims):
      raise self.error(f"{what}: negative dimension in {dims}")
    return dims

  def tensor(self, what: str) -> np.ndarray:
    """``resizable_tensor``: version 2, dims (n, k, nr, nc), then raw little-endian float32."""
    self.expect_int(2, f"{what} (tensor version)")
    dims = self.dims(what)
    raw = self.take(4 * int(np.prod(dims)), f"{what} data {dims}")
    return np.frombuffer(raw, "<f4").astype(np.float32).reshape(dims)

  def alias_tensor(self, what: str) -> tuple[int, int, int, int]:
    """``alias_tensor``: version 1 and four dims, no data."""
    self.expect_int(1, f"{what} (alias_tensor version)")
    return self.dims(what)


# ----------------------------------------------------------------------------- network


@dataclasses.dataclass(frozen=True)
class _Layer:
  """One dlib layer wrapper, input to output. ``kind``: tag, skip, con, affine, relu,
  max_pool, avg_pool, add_prev, fc. ``path``: the facediff module holding its params."""

  kind: str
  path: str = ""
  features: int = 0
  in_features: int = 0
  kernel: int = 0
  stride: int = 1


def dlib_layers(config: DlibResNetConfig) -> list[_Layer]:
  """``anet_type`` of dlib's examples/dnn_face_recognition_ex.cpp, input to output, as
  wrappers in the file: ``residual`` = add_prev1<block<tag1<x>>>, ``residual_down`` =
  add_prev2<avg_pool<2,2,2,2, skip1<tag2<block<stride 2, tag1<x>>>>>>, each under a
  relu; ``block`` = affine<con3x3<relu<affine<con3x3(stride)>>>>. Global pooling is
  ``avg_pool<0,0,1,1>`` (kernel 0 = whole map)."""
  out = [
    _Layer("con", "stem_conv", config.stem_features, 3, config.stem_kernel, 2),
    _Layer("affine", "stem_affine", config.stem_features),
    _Layer("relu"),
    _Layer("max_pool", kernel=3, stride=2),
  ]
  channels = config.stem_features
  for s, (features, blocks) in enumerate(
    zip(config.stage_features, config.stage_blocks, strict=True)
  ):
    for b in range(blocks):
      down, p = s > 0 and b == 0, f"stage{s}_block{b}"
      out += [
        _Layer("tag"),
        _Layer("con", f"{p}/conv1", features, channels, 3, 2 if down else 1),
        _Layer("affine", f"{p}/affine1", features),
        _Layer("relu"),
        _Layer("con", f"{p}/conv2", features, features, 3, 1),
        _Layer("affine", f"{p}/affine2", features),
      ]
      if down:
        out += [_Layer("tag"), _Layer("skip"), _Layer("avg_pool", kernel=2, stride=2)]
      out += [_Layer("add_prev"), _Layer("relu")]
      channels = features
  out += [
    _Layer("avg_pool", kernel=0, stride=1),
    _Layer("fc", "fc", config.embed_dim, channels),
  ]
  return out


def _read_con(r: _Reader, layer: _Layer, params: dict) -> None:
  """``con_`` (dlib/dnn/layers.h): params tensor (filters (out, in, kh, kw) then biases),
  num_filters, kernel rows/cols, stride y/x, padding y/x, filter and bias alias tensors,
  4 learning-rate/weight-decay doubles; con_5 adds use_bias, con_6 use_relu."""
  start = r.pos
  version = r.expect_string(("con_4", "con_5", "con_6"), f"{layer.path} layer")
  flat = r.tensor(f"{layer.path} params").reshape(-1)
  k, stride, pad = layer.kernel, layer.stride, conv_padding(layer.kernel, layer.stride)
  for what, want in (
    ("num_filters", layer.features),
    ("kernel rows", k),
    ("kernel cols", k),
    ("stride y", stride),
    ("stride x", stride),
    ("padding y", pad),
    ("padding x", pad),
  ):
    r.expect_int(want, f"{layer.path} {what}")
  want_filters = (layer.features, layer.in_features, k, k)
  at = r.pos
  if (got := r.alias_tensor(f"{layer.path} filters")) != want_filters:
    raise r.error(f"{layer.path} filters: expected shape {want_filters}, got {got}", at)
  at = r.pos
  bias_shape = r.alias_tensor(f"{layer.path} biases")
  for what in ("lr", "weight decay", "bias lr", "bias weight decay"):
    r.real(f"{layer.path} {what} multiplier")
  use_bias = r.boolean(f"{layer.path} use_bias") if version in ("con_5", "con_6") else True
  if version == "con_6" and r.boolean(f"{layer.path} use_relu"):
    raise r.error(f"{layer.path}: convolutions with a fused relu are not supported", r.pos - 1)
  if use_bias and bias_shape != (1, layer.features, 1, 1):
    raise r.error(f"{layer.path} biases: expected shape (1, {layer.features}, 1, 1)", at)
  n_w = int(np.prod(want_filters))
  n_b = layer.features if use_bias else 0
  if flat.size != n_w + n_b:
    raise r.error(f"{layer.path}: params hold {flat.size} floats, expected {n_w + n_b}", start)
  params[f"{layer.path}/kernel"] = common.conv_torch_to_flax(flat[:n_w].reshape(want_filters))
  params[f"{layer.path}/bias"] = flat[n_w:] if use_bias else np.zeros(layer.features, np.float32)


def _read_affine(r: _Reader, layer: _Layer, params: dict) -> None:
  """``affine_`` (dlib/dnn/layers.h): params [gamma(C), beta(C)], gamma and beta alias
  tensors, int mode (0 = CONV_MODE, per channel); affine_2 adds ``disabled``."""
  version = r.expect_string(("affine_", "affine_2"), f"{layer.path} layer")
  start = r.pos
  flat = r.tensor(f"{layer.path} params").reshape(-1)
  c = layer.features
  if flat.size != 2 * c:
    raise r.error(f"{layer.path}: params hold {flat.size} floats, expected {2 * c}", start)
  for what in ("gamma", "beta"):
    at = r.pos
    if (got := r.alias_tensor(f"{layer.path} {what}")) != (1, c, 1, 1):
      raise r.error(f"{layer.path} {what}: expected shape (1, {c}, 1, 1), got {got}", at)
  r.expect_int(0, f"{layer.path} mode (0 = per channel)")
  if version == "affine_2" and r.boolean(f"{layer.path} disabled"):
    raise r.error(f"{layer.path}: disabled (fused) affine layers are not supported", r.pos - 1)
  params[f"{layer.path}/scale"] = flat[:c]
  params[f"{layer.path}/bias"] = flat[c:]


def _read_pool(r: _Reader, layer: _Layer) -> None:
  """``max_pool_`` / ``avg_pool_`` (dlib/dnn/layers.h): window rows/cols, stride y/x,
  padding y/x (0 whenever the stride is not 1)."""
  name = "max_pool_2" if layer.kind == "max_pool" else "avg_pool_2"
  r.expect_string(name, f"{layer.kind} layer")
  pad = conv_padding(layer.kernel, layer.stride)
  for what, want in (
    ("rows", layer.kernel),
    ("cols", layer.kernel),
    ("stride y", layer.stride),
    ("stride x", layer.stride),
    ("padding y", pad),
    ("padding x", pad),
  ):
    r.expect_int(want, f"{layer.kind} {what}")


def _read_fc(r: _Reader, layer: _Layer, params: dict) -> None:
  """``fc_`` (dlib/dnn/layers.h): num_outputs, num_inputs, params (in, out) so that
  out = x @ W, weight and bias alias tensors, int bias mode (1 = no bias), 4 doubles;
  fc_3 adds use_bias."""
  version = r.expect_string(("fc_2", "fc_3"), "fc layer")
  r.expect_int(layer.features, "fc num_outputs")
  r.expect_int(layer.in_features, "fc num_inputs")
  start = r.pos
  w = r.tensor("fc params")
  want = (layer.in_features, layer.features)
  if w.shape[:2] != want or w.shape[2:] != (1, 1):
    raise r.error(f"fc params: expected shape ({want[0]}, {want[1]}, 1, 1), got {w.shape}", start)
  at = r.pos
  if (got := r.alias_tensor("fc weights")) != (*want, 1, 1):
    raise r.error(f"fc weights: expected shape ({want[0]}, {want[1]}, 1, 1), got {got}", at)
  r.alias_tensor("fc biases")
  r.expect_int(1, "fc bias mode (1 = no bias)")
  for what in ("lr", "weight decay", "bias lr", "bias weight decay"):
    r.real(f"fc {what} multiplier")
  if version == "fc_3":
    r.boolean("fc use_bias")
  params[f"{layer.path}/kernel"] = w.reshape(want)


def _read_layer(r: _Reader, layer: _Layer, params: dict) -> None:
  if layer.kind == "con":
    _read_con(r, layer, params)
  elif layer.kind == "affine":
    _read_affine(r, layer, params)
  elif layer.kind == "relu":
    if r.expect_string(("relu_", "relu_2"), "relu layer") == "relu_2" and r.boolean(
      "relu disabled"
    ):
      raise r.error("disabled relu layers are not supported", r.pos - 1)
  elif layer.kind in ("max_pool", "avg_pool"):
    _read_pool(r, layer)
  elif layer.kind == "add_prev":
    r.expect_string("add_prev_", "add_prev layer")
  elif layer.kind == "fc":
    _read_fc(r, layer, params)
  else:
    raise AssertionError(layer.kind)


def _read_wrapper_tail(r: _Reader, version: int, innermost: bool, label: str) -> None:
  """``add_layer``'s fields after its layer (dlib/dnn/core.h): 3 bools, the x_grad and
  cached_output tensors, then params_grad (version 2), or for the wrapper holding the
  input layer grad_final and (version 3) the sample expansion factor."""
  for what in ("this_layer_setup_called", "gradient_input_is_stale", "output_disabled"):
    r.boolean(f"{label} wrapper {what}")
  r.tensor(f"{label} wrapper x_grad")
  r.tensor(f"{label} wrapper cached_output")
  if innermost:
    r.tensor(f"{label} wrapper grad_final")
    if version >= 3:
      r.expect_int(1, "sample expansion factor")
  elif version == 2:
    r.tensor(f"{label} wrapper params_grad")


@dataclasses.dataclass(frozen=True)
class DlibResNetFile:
  """Everything read from the file: the config (means and chip size from the file), flax
  params (nested numpy float32), and ``loss_metric``'s margin and distance threshold
  (two chips of one person lie closer than ``distance_threshold``)."""

  config: DlibResNetConfig
  params: dict
  margin: float
  distance_threshold: float


def default_path() -> str:
  """``dlib_face_recognition_resnet_model_v1.dat`` inside the face-recognition-models
  package, found without importing it (its ``__init__`` needs ``pkg_resources``)."""
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.origin:
    raise FileNotFoundError(
      f"{DLIB_RESNET_FILE}: package face_recognition_models is not installed "
      "(pip install face-recognition-models)"
    )
  return os.path.join(os.path.dirname(spec.origin), "models", DLIB_RESNET_FILE)


def read_dlib_resnet(
  path: str | None = None, config: DlibResNetConfig | None = None
) -> DlibResNetFile:
  """Parses a dlib face-recognition ResNet ``.dat`` file to its last byte (see the
  module docstring for the layout). ``config`` gives the expected architecture (the
  default is dlib's ``anet_type``); its ``mean_rgb``/``image_size`` are taken from the file."""
  path = default_path() if path is None else path
  with open(path, "rb") as f:
    data = f.read()
  config = config or DlibResNetConfig()
  r = _Reader(data, path)
  r.expect_int(1, "add_loss_layer version")
  if r.expect_string(("loss_metric_", "loss_metric_2"), "loss layer") == "loss_metric_2":
    margin, threshold = r.real("loss margin"), r.real("loss distance threshold")
  else:  # dlib's values for the first version, which stored none
    margin, threshold = 0.1, 0.75

  net = dlib_layers(config)
  versions = {}
  for i in range(len(net) - 1, -1, -1):  # wrappers, output -> input
    layer = net[i]
    # a wrong version here means the file's layer sequence differs from the config's
    what = f"{layer.kind} wrapper version (layer {i} of {len(net)} from the input)"
    if layer.kind in ("tag", "skip"):
      r.expect_int(1, what)
    else:
      versions[i] = r.expect_int((2, 3) if i == 0 else (1, 2), what)

  r.expect_string("input_rgb_image_sized", "input layer")
  mean = tuple(float(np.float32(r.real(f"input mean {c}"))) for c in "RGB")
  rows = r.integer("input rows", signed=False)
  at = r.pos
  if (cols := r.integer("input cols", signed=False)) != rows:
    raise r.error(f"input chip must be square, got {rows}x{cols}", at)

  params: dict[str, np.ndarray] = {}
  for i, layer in enumerate(net):  # settings, input -> output
    if layer.kind not in ("tag", "skip"):
      _read_layer(r, layer, params)
      _read_wrapper_tail(r, versions[i], i == 0, layer.path or f"{layer.kind} (layer {i})")
  if r.pos != len(data):
    raise r.error(f"{len(data) - r.pos} unexpected byte(s) after the network")

  config = dataclasses.replace(config, mean_rgb=mean, image_size=rows)
  try:
    nested = common.match_params(abstract_params(config), params, path)
  except common.StateDictMismatchError as e:  # a config whose param tree differs from dlib's
    raise DlibDatError(path, r.pos, str(e)) from e
  return DlibResNetFile(config, nested, float(margin), float(threshold))


def load_dlib_resnet(path: str | None = None) -> tuple[DlibResNetConfig, dict]:
  """(config, params) for ``facediff.models.dlib_resnet.DlibResNet`` from dlib's
  ``.dat`` file (default: the one in face-recognition-models)."""
  f = read_dlib_resnet(path)
  return f.config, f.params
