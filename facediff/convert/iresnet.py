"""PyTorch IResNet state dicts <-> facediff ``IResNet`` params (ArcFace, CurricularFace).

Key layouts (FACTS.md "Face networks"):

* ArcFace, insightface ``arcface_torch`` ``iresnet.py`` (``backbone.pth``): ``conv1``,
  ``bn1``, ``prelu``, ``layer<i>.<j>.{bn1, conv1, bn2, prelu, conv2, bn3,
  downsample.0, downsample.1}``, ``bn2``, ``fc``, ``features``.
* CurricularFace IR (``model_irse.Backbone``, as data_pipelines/encoders/iresnet.py's
  ``IRBackbone``): ``input_layer.{0,1,2}`` (conv, BN, PReLU), ``body.<k>.res_layer.{0..4}``
  (BN, conv, PReLU, conv, BN) and ``body.<k>.shortcut_layer.{0,1}`` (conv, BN) with k
  counting blocks over all stages, ``output_layer.{0,3,4}`` (BN2d, Linear, BN1d without
  affine).

Tensors: conv (O, I, kh, kw) <-> (kh, kw, I, O); BN weight/bias/running_mean/running_var
<-> scale/bias/mean/var; PReLU weight <-> negative_slope; the head Linear's input
columns are torch's NCHW flatten order (c, h, w), facediff's rows the NHWC order
(h, w, c). ``num_batches_tracked`` buffers are dropped; a DataParallel ``module.``
prefix and a ``{"state_dict": ...}`` wrapper are accepted.

Entry points: ``torch_to_flax(checkpoint, config)`` (a ``.pth`` path or a dict),
``load(checkpoint)`` (config inferred from the keys), ``flax_to_torch(params, config)``.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Mapping

import numpy as np

from facediff.convert import common
from facediff.models.iresnet import STAGE_WIDTHS, IResNetConfig, abstract_params

_BLOCK = re.compile(r"^layer(\d+)_(\d+)$")

# facediff leaf name -> torch parameter name, per kind of module.
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_OTHER_LEAVES = {"kernel": "weight", "bias": "bias", "negative_slope": "weight"}

# facediff module names -> torch module names.
_ARCFACE_TOP = {n: n for n in ("conv1", "bn1", "prelu", "bn2", "fc", "features")}
_ARCFACE_BLOCK = {
  **{n: n for n in ("bn1", "conv1", "bn2", "prelu", "conv2", "bn3")},
  "downsample_conv": "downsample.0",
  "downsample_bn": "downsample.1",
}
_IR_TOP = {
  "conv1": "input_layer.0",
  "bn1": "input_layer.1",
  "prelu": "input_layer.2",
  "bn2": "output_layer.0",
  "fc": "output_layer.3",
  "features": "output_layer.4",
}
_IR_BLOCK = {
  "bn1": "res_layer.0",
  "conv1": "res_layer.1",
  "prelu": "res_layer.2",
  "conv2": "res_layer.3",
  "bn3": "res_layer.4",
  "downsample_conv": "shortcut_layer.0",
  "downsample_bn": "shortcut_layer.1",
}
_IGNORED_SUFFIX = ".num_batches_tracked"


@functools.lru_cache(maxsize=8)
def _flat_abstract(config: IResNetConfig) -> dict[str, Any]:
  """{flat key: ShapeDtypeStruct} of ``config``'s params (traced once per config: r100
  takes seconds). Callers must not modify the dict."""
  return common.flatten_params(abstract_params(config))


def _torch_module(config: IResNetConfig, module_path: str) -> str:
  """facediff module path (``layer2_3/downsample_bn``) -> torch module name, per variant."""
  parts = module_path.split(common.SEP)
  arcface = config.variant == "arcface"
  if len(parts) == 1:
    return (_ARCFACE_TOP if arcface else _IR_TOP)[parts[0]]
  stage, block = (int(g) for g in _BLOCK.match(parts[0]).groups())
  if arcface:
    return f"layer{stage}.{block}.{_ARCFACE_BLOCK[parts[1]]}"
  k = sum(config.layers[: stage - 1]) + block  # CurricularFace numbers blocks globally
  return f"body.{k}.{_IR_BLOCK[parts[1]]}"


def torch_layout(config: IResNetConfig) -> dict[str, tuple[str, str]]:
  """{facediff flat key ("a/b/leaf"): (torch key, kind)}; kind is "conv", "fc" or
  "vector" (BN / PReLU / bias, same layout in both)."""
  flat = _flat_abstract(config)
  bn_modules = {k.rpartition(common.SEP)[0] for k in flat if k.endswith(common.SEP + "mean")}
  out = {}
  for key, leaf in flat.items():
    module_path, _, name = key.rpartition(common.SEP)
    tname = (_BN_LEAVES if module_path in bn_modules else _OTHER_LEAVES)[name]
    kind = {1: "vector", 2: "fc", 4: "conv"}[len(leaf.shape)]
    out[key] = (f"{_torch_module(config, module_path)}.{tname}", kind)
  return out


def _fc_torch_to_flax(w: np.ndarray, config: IResNetConfig) -> np.ndarray:
  """torch Linear (E, C*H*W), input columns in NCHW flatten order -> (H*W*C, E), NHWC rows."""
  s, c = config.feature_size, STAGE_WIDTHS[-1]
  return w.reshape(w.shape[0], c, s, s).transpose(2, 3, 1, 0).reshape(s * s * c, w.shape[0])


def _fc_flax_to_torch(k: np.ndarray, config: IResNetConfig) -> np.ndarray:
  """Inverse of ``_fc_torch_to_flax``."""
  s, c = config.feature_size, STAGE_WIDTHS[-1]
  return k.reshape(s, s, c, k.shape[1]).transpose(3, 2, 0, 1).reshape(k.shape[1], c * s * s)


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "conv":
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if kind == "fc":
    return (shape[1], shape[0])
  return tuple(shape)


def expected_torch_shapes(config: IResNetConfig) -> dict[str, tuple[int, ...]]:
  """{torch key: shape} of the checkpoint that fits ``config`` (without the
  ``num_batches_tracked`` buffers)."""
  flat = _flat_abstract(config)
  return {
    tkey: _torch_shape(tuple(flat[fkey].shape), kind)
    for fkey, (tkey, kind) in torch_layout(config).items()
  }


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor
    v = v.detach().cpu()
    if v.is_floating_point():
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def read_checkpoint(
  checkpoint: str | os.PathLike | Mapping[str, Any], source: str | None = None
) -> tuple[dict[str, np.ndarray], str]:
  """(state dict as numpy, source name) from a ``.pth``/``.pt``/``.safetensors`` path or a
  dict of tensors/arrays. Unwraps ``{"state_dict": ...}``, strips DataParallel's
  ``module.`` prefix and drops ``num_batches_tracked``."""
  if isinstance(checkpoint, (str, os.PathLike)):
    source = source or os.fspath(checkpoint)
    state = common.read_state_dict(checkpoint)
  elif isinstance(checkpoint, Mapping):
    source = source or "<state dict>"
    if isinstance(checkpoint.get("state_dict"), Mapping):
      checkpoint = checkpoint["state_dict"]
    state = {str(k): _to_numpy(v) for k, v in checkpoint.items()}
  else:
    raise TypeError(
      f"an IResNet checkpoint is a path or a state dict, got {type(checkpoint).__name__}"
    )
  state = {
    (k[len("module.") :] if k.startswith("module.") else k): v
    for k, v in state.items()
    if not k.endswith(_IGNORED_SUFFIX)
  }
  return state, source


def _detect_variant(state: Mapping[str, Any]) -> str | None:
  if any(k.startswith("layer1.") for k in state):
    return "arcface"
  if any(k.startswith("body.") for k in state):
    return "curricularface"
  return None


def infer_config(
  state: Mapping[str, Any], source: str = "<state dict>", dtype: str = "float32"
) -> IResNetConfig:
  """The ``IResNetConfig`` a state dict was saved from: variant from the key names
  (``layer1.*`` ArcFace, ``body.*`` CurricularFace), blocks per stage from the block
  indices (CurricularFace: from each block's conv2 width), embedding size and input
  size from the head Linear's shape."""
  variant = _detect_variant(state)
  if variant is None:
    raise ValueError(
      f"{source}: neither an insightface IResNet (layer1.*) nor a CurricularFace IR "
      "backbone (body.*) state dict"
    )
  if variant == "arcface":
    pat = re.compile(r"^layer(\d)\.(\d+)\.")
    blocks = {}
    for k in state:
      m = pat.match(k)
      if m:
        i, j = int(m.group(1)), int(m.group(2))
        blocks[i] = max(blocks.get(i, 0), j + 1)
    layers = tuple(blocks.get(i, 0) for i in range(1, len(STAGE_WIDTHS) + 1))
    fc_key = "fc.weight"
  else:
    pat = re.compile(r"^body\.(\d+)\.res_layer\.3\.weight$")
    widths = sorted(
      (int(m.group(1)), np.shape(v)[0]) for k, v in state.items() if (m := pat.match(k))
    )
    layers = tuple(sum(1 for _, w in widths if w == c) for c in STAGE_WIDTHS)
    fc_key = "output_layer.3.weight"
  if fc_key not in state:
    raise ValueError(f"{source}: no head Linear {fc_key!r}")
  emb, flat = np.shape(state[fc_key])
  side = int(round((flat / STAGE_WIDTHS[-1]) ** 0.5))
  if side * side * STAGE_WIDTHS[-1] != flat:
    raise ValueError(f"{source}: {fc_key} has {flat} inputs, not 512 x side x side")
  try:
    return IResNetConfig(
      layers=layers, variant=variant, embedding_size=emb, image_size=16 * side, dtype=dtype
    )
  except ValueError as e:
    raise ValueError(f"{source}: cannot infer the IResNet shape: {e}") from e


def torch_to_flax(
  checkpoint: str | os.PathLike | Mapping[str, Any],
  config: IResNetConfig,
  source: str | None = None,
) -> dict[str, Any]:
  """An IResNet checkpoint (path or state dict) -> facediff params (nested numpy dict).

  Raises ``common.StateDictMismatchError`` naming the file (or ``source``) and every
  missing, unexpected or mis-shaped torch key; a checkpoint of the other variant is a
  ``ValueError`` saying so.
  """
  state, source = read_checkpoint(checkpoint, source)
  found = _detect_variant(state)
  if found is not None and found != config.variant:
    raise ValueError(
      f"{source}: holds a {found} state dict, but the config is variant={config.variant!r}"
    )
  layout = torch_layout(config)
  want = expected_torch_shapes(config)
  missing = [k for k in want if k not in state]
  unexpected = [k for k in state if k not in want]
  mismatched = [
    (k, want[k], tuple(np.shape(state[k])))
    for k in want
    if k in state and tuple(np.shape(state[k])) != want[k]
  ]
  if missing or unexpected or mismatched:
    err = common.StateDictMismatchError(source, missing, unexpected, mismatched)
    if found is not None:
      try:
        err.add_note(f"{source} looks like {infer_config(state, source)}; the model is {config}")
      except ValueError:
        pass
    raise err
  flat = {}
  for fkey, (tkey, kind) in layout.items():
    w = np.asarray(state[tkey], dtype=np.float32)
    if kind == "conv":
      w = common.conv_torch_to_flax(w)
    elif kind == "fc":
      w = _fc_torch_to_flax(w, config)
    flat[fkey] = w
  return common.match_params(_flat_abstract(config), flat, source)


def load(
  checkpoint: str | os.PathLike | Mapping[str, Any],
  config: IResNetConfig | None = None,
  source: str | None = None,
) -> tuple[IResNetConfig, dict[str, Any]]:
  """(config, params) from a checkpoint; the config is inferred from the keys when None."""
  state, source = read_checkpoint(checkpoint, source)
  config = config or infer_config(state, source)
  return config, torch_to_flax(state, config, source)


def flax_to_torch(params: Mapping[str, Any], config: IResNetConfig) -> dict[str, np.ndarray]:
  """facediff IResNet params -> the torch state dict of ``config``'s variant (float32
  numpy; without ``num_batches_tracked``)."""
  flat = common.flatten_params(params)
  out = {}
  for fkey, (tkey, kind) in torch_layout(config).items():
    if fkey not in flat:
      raise KeyError(f"IResNet params lack {fkey!r}")
    w = np.asarray(flat[fkey], dtype=np.float32)
    if kind == "conv":
      w = common.conv_flax_to_torch(w)
    elif kind == "fc":
      w = _fc_flax_to_torch(w, config)
    out[tkey] = np.ascontiguousarray(w)
  return out
