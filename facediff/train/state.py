"""The train state: one pytree, created already sharded on the mesh.

``TrainState`` holds the step, the trainable params (float32 master copy), the
optimizer state (sharded like the params), the EMA params (or None), the base PRNG key
(raw uint32 key data; step ``s`` uses ``fold_in(key, s)``, so a resumed run draws the
same randomness as an uninterrupted one) and the task's extra ``model_state``.

Shapes come from ``jax.eval_shape(init)``; the state is materialised by
``jax.jit(init, out_shardings=...)``, so no host ever holds the whole tree.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from facediff import partitioning
from facediff.train import optim
from facediff.train.task import Task


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  model_state: Any

  def as_dict(self) -> dict[str, Any]:
    """Plain-dict view (what checkpoints store)."""
    return {
      "step": self.step,
      "params": self.params,
      "opt_state": self.opt_state,
      "ema_params": self.ema_params,
      "rng": self.rng,
      "model_state": self.model_state,
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainState":
    return cls(**d)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _init_fn(task: Task, tx: optax.GradientTransformation, use_ema: bool):
  def init(key: jax.Array) -> TrainState:
    params = nn.unbox(task.init(key))
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
      rng=jax.random.key_data(jax.random.fold_in(key, 1)),
      model_state=task.init_model_state(),
    )

  return init


def state_shardings(task: Task, tx, abstract_state: TrainState, key: jax.Array, mesh: Mesh):
  """NamedShardings for every leaf of the state: params, EMA and the params-shaped
  parts of the optimizer state by the logical rules; everything else replicated."""
  param_sh = partitioning.param_shardings(jax.eval_shape(task.init, key), mesh)
  rep = replicated(mesh)
  opt_sh = optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    abstract_state.opt_state,
    param_sh,
    transform_non_params=lambda _: rep,
    is_leaf=lambda x: isinstance(x, NamedSharding),
  )
  return TrainState(
    step=rep,
    params=param_sh,
    opt_state=opt_sh,
    ema_params=None if abstract_state.ema_params is None else param_sh,
    rng=rep,
    model_state=jax.tree.map(lambda _: rep, abstract_state.model_state),
  )


def _plan(task: Task, config, mesh: Mesh):
  tx = optim.make_optimizer(config.optim)
  key = jax.random.key(int(config.train.seed))
  init = _init_fn(task, tx, use_ema=float(config.ema.decay) > 0)
  abstract = jax.eval_shape(init, key)
  return init, key, abstract, state_shardings(task, tx, abstract, key, mesh), tx


def create_train_state(task: Task, config, mesh: Mesh):
  """(state, shardings, tx): a freshly initialised state sharded on ``mesh``, with the
  task's ``pretrained`` params (if any) in place of the random ones."""
  init, key, abstract, shardings, tx = _plan(task, config, mesh)
  if task.pretrained is None:
    return jax.jit(init, out_shardings=shardings)(key), shardings, tx
  placed = place_pretrained(task.pretrained(), abstract.params, shardings.params)
  use_ema = shardings.ema_params is not None

  def init_from(key, placed):
    state = init(key)
    params = overlay(state.params, placed)
    return state.replace(
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
    )

  return jax.jit(init_from, out_shardings=shardings)(key, placed), shardings, tx


def place_pretrained(
  pretrained: Any, abstract: Any, param_shardings: Any, where: str = "params"
) -> Any:
  """Host arrays of a params subtree -> global arrays with the params' shardings
  (each host reads only the slices its devices hold). Paths and shapes are checked
  against the params tree, naming the first that does not fit."""
  if isinstance(pretrained, dict):
    if not isinstance(param_shardings, dict):
      raise ValueError(f"pretrained {where}: a subtree where the params have a leaf")
    out = {}
    for k, v in pretrained.items():
      if k not in param_shardings:
        raise ValueError(
          f"pretrained {where}/{k}: no such parameter (has {sorted(param_shardings)})"
        )
      out[k] = place_pretrained(v, abstract[k], param_shardings[k], f"{where}/{k}")
    return out
  arr = np.asarray(pretrained, np.float32)
  if arr.shape != tuple(abstract.shape):
    raise ValueError(
      f"pretrained {where}: shape {arr.shape}, the model has {tuple(abstract.shape)}"
    )
  return jax.make_array_from_callback(arr.shape, param_shardings, lambda idx: arr[idx])


def overlay(params: Any, pretrained: Any, where: str = "params") -> Any:
  """``params`` with the leaves present in ``pretrained`` replaced (same shapes, see
  ``place_pretrained``)."""
  if isinstance(pretrained, dict):
    return {
      k: (overlay(v, pretrained[k], f"{where}/{k}") if k in pretrained else v)
      for k, v in params.items()
    }
  return pretrained.astype(params.dtype)


def abstract_state(task: Task, config, mesh: Mesh):
  """(abstract state carrying its shardings, shardings, tx); nothing allocated."""
  _, _, abstract, shardings, tx = _plan(task, config, mesh)
  with_sh = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return with_sh, shardings, tx


def shard_frozen(task: Task, mesh: Mesh):
  """The task's frozen weights placed on the mesh (by their logical axes if given)."""
  if task.frozen is None:
    return None, None
  if task.frozen_abstract is not None:
    sh = partitioning.param_shardings(task.frozen_abstract, mesh)
  else:
    sh = jax.tree.map(lambda _: replicated(mesh), task.frozen)
  frozen = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), nn.unbox(task.frozen), sh)
  return frozen, sh


def param_counts(params: Any) -> dict[str, int]:
  """Parameter count per top-level module (first key of the params tree)."""
  if not isinstance(params, dict):
    return {"params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}
  return {
    k: int(sum(np.prod(x.shape) for x in jax.tree.leaves(v))) for k, v in sorted(params.items())
  }
