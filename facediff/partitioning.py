"""Logical-axis sharding for facediff models (MaxText style).

Layers name every parameter dimension with a logical axis (see facediff.models.layers);
``LOGICAL_RULES`` maps those names to the mesh axes ``data`` and ``fsdp``:

* parameters: FSDP. Each parameter is sharded over ``fsdp`` along ONE dimension, the first
  in the rules' priority order (``vocab``, ``mlp``, ``heads``, ``conv_out``, ``embed``,
  ``cross_embed``, ``conv_in``, ...) whose size divides by the ``fsdp`` size; others and
  norm scales/biases are replicated. Parameters are replicated over ``data``.
* activations: the batch (``activation_batch``) is split over ``('data', 'fsdp')``.

A mesh axis is used at most once per array. A dimension not divisible by its mesh axes is
left unsharded and the next rule may claim the axis (so e.g. the UNet's 4-channel conv_out
kernel is sharded over its 320 input channels instead).

Inside ``activation_rules`` the models pin activations' batch to ``('data', 'fsdp')``; a
batch that does not divide by data*fsdp still runs (XLA pads it, with a warning about
rematerialisation) but wastes devices, so use batches that divide.

Typical use::

    mesh = make_mesh({"data": 2, "fsdp": -1})
    params = init_sharded(lambda k: unet.init_params(cfg, k), key, mesh)
    with activation_rules(mesh):   # for nn.with_logical_constraint inside the model
      out = jax.jit(apply_fn)(params, batch)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")

# Order = priority: earlier rules claim a mesh axis first.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
  # activations
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_height", None),
  ("activation_width", None),
  ("activation_embed", None),
  # parameters (FSDP)
  ("vocab", "fsdp"),
  ("mlp", "fsdp"),
  ("heads", "fsdp"),
  ("conv_out", "fsdp"),
  ("embed", "fsdp"),
  ("cross_embed", "fsdp"),
  ("conv_in", "fsdp"),
  ("conv_h", None),
  ("conv_w", None),
  ("norm", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with named axes from e.g. {"data": 2, "fsdp": -1}; one -1 is filled in with
  whatever the device count leaves. Axis order follows the mapping's order."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(shape.keys())
  sizes = [int(v) for v in shape.values()]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {dict(shape)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh shape {dict(shape)}: sizes must be positive or -1")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh shape {dict(shape)}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh shape {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices, "
      f"have {len(devices)}"
    )
  arr = np.array(devices, dtype=object).reshape(sizes)
  return Mesh(arr, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh_spec(
  logical_axes: Sequence[str | None],
  shape: Sequence[int],
  mesh: Mesh,
  rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
) -> PartitionSpec:
  """PartitionSpec for an array of ``shape`` whose dims carry ``logical_axes``.

  Rules are taken in order; a rule assigns its mesh axes to the dimension with that
  logical name if the dimension is still free, none of the mesh axes is used yet, all of
  them exist in ``mesh`` and the dimension size divides by their total size.
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  out: list[Any] = [None] * len(shape)
  used: set[str] = set()
  for name, mesh_axes in rules:
    if mesh_axes is None or name not in logical_axes:
      continue
    axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    axes = tuple(a for a in axes if a in mesh.shape)
    if not axes or used.intersection(axes):
      continue
    for pos, n in enumerate(logical_axes):
      if n == name and out[pos] is None and shape[pos] % _axis_size(mesh, axes) == 0:
        out[pos] = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
  return PartitionSpec(*out)


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def param_shardings(abstract_params, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
  """NamedSharding tree (structure of the UNBOXED params) for a params tree from
  ``jax.eval_shape(init)``. Leaves without logical names are replicated."""

  def one(leaf):
    if _is_box(leaf):
      value = leaf.value
      spec = logical_to_mesh_spec(leaf.names, value.shape, mesh, rules)
    else:
      spec = PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, abstract_params, is_leaf=_is_box)


def param_specs(abstract_params, mesh: Mesh, rules=LOGICAL_RULES):
  """Like ``param_shardings`` but PartitionSpecs."""
  return jax.tree.map(lambda s: s.spec, param_shardings(abstract_params, mesh, rules))


def init_sharded(
  init_fn: Callable[[jax.Array], Any],
  key: jax.Array,
  mesh: Mesh,
  rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
):
  """Creates params directly sharded: ``jax.jit(init, out_shardings=...)`` with shardings
  from ``jax.eval_shape(init)``; no host ever holds the whole tree. Returns unboxed params."""
  abstract = jax.eval_shape(init_fn, key)
  shardings = param_shardings(abstract, mesh, rules)
  return jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=shardings)(key)


def shard_params(params, abstract_params, mesh: Mesh, rules=LOGICAL_RULES):
  """Places existing (e.g. converted, host numpy) params with the rules' shardings."""
  shardings = param_shardings(abstract_params, mesh, rules)
  return jax.tree.map(jax.device_put, nn.unbox(params), shardings)


def batch_axes(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (``activation_batch``'s rule,
  restricted to the axes ``mesh`` has)."""
  axes = dict(rules).get("activation_batch")
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  present = tuple(a for a in axes if a in mesh.shape)
  if not present:
    raise ValueError(f"mesh axes {mesh.axis_names} contain none of the batch axes {axes}")
  return present


def batch_sharding(
  mesh: Mesh, ndim: int | None = None, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES
) -> NamedSharding:
  """Sharding of an activation / data array: axis 0 over the batch mesh axes, the
  rest replicated. ``ndim`` spells the trailing dimensions out; None leaves them
  implicit (the same sharding for arrays of any rank)."""
  axes = batch_axes(mesh, rules)
  first = axes[0] if len(axes) == 1 else axes
  rest = () if ndim is None else (None,) * (ndim - 1)
  return NamedSharding(mesh, PartitionSpec(first, *rest))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
  """Context in which the models' ``nn.with_logical_constraint`` hints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    yield
