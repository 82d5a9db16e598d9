"""A tiny regression task on the trainer's Task interface, its data and its config.

The model is a 2-layer MLP whose params carry logical axes (so FSDP shards them);
the loss adds noise drawn from the step's key, so resumption must reproduce the RNG
stream as well as the data order. Its evaluation (``eval_fn``) maps predictions and
targets to tiny images and scores them with ``facediff.metrics``.
"""

from __future__ import annotations

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from facediff import metrics
from facediff.models import layers
from facediff.train import Task

DIM, HIDDEN, NUM_RECORDS = 16, 64, 64


class MLP(nn.Module):
  hidden: int = HIDDEN

  @nn.compact
  def __call__(self, x):
    h = layers.Dense(self.hidden, ("embed", "mlp"), name="fc1")(x)
    return layers.Dense(DIM, ("mlp", "embed"), name="fc2")(jax.nn.gelu(h))


def make_task(hidden: int = HIDDEN, nan_after: int | None = None) -> Task:
  model = MLP(hidden)

  def init(key):
    return model.init(key, jnp.zeros((1, DIM)))["params"]

  def loss_fn(params, frozen, batch, rng, model_state):
    del frozen, model_state
    x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
    pred = model.apply({"params": params}, x)
    mse = jnp.mean((pred - batch["y"]) ** 2)
    reg = 1e-3 * jnp.mean(pred**2)
    loss = mse + reg
    if nan_after is not None:  # records with index >= nan_after carry a NaN flag
      loss = loss + jnp.where(jnp.any(batch["index"] >= nan_after), jnp.nan, 0.0)
    return loss, {"mse": mse, "reg": reg}

  def sample_fn(params, frozen, batch, rng):
    del frozen, rng
    pred = model.apply({"params": params}, batch["x"])
    img = jnp.tanh(pred[:, :12].reshape(-1, 2, 2, 3))
    return jnp.repeat(jnp.repeat(img, 4, 1), 4, 2)

  def eval_fn(params, frozen, batch, rng):
    del frozen
    images, targets = eval_images(model, params, batch, rng)
    return {
      "psnr": jnp.mean(metrics.psnr(images, targets)),
      "mse": jnp.mean(metrics.mse(images, targets)),
    }

  return Task(name="toy", init=init, loss_fn=loss_fn, sample_fn=sample_fn, eval_fn=eval_fn)


def eval_images(model, params, batch, rng):
  """(prediction, target) as (B, 2, 2, 3) images in [-1, 1]: the first 12 outputs for
  inputs perturbed by noise from ``rng`` (so the evaluation key matters)."""
  x = batch["x"] + 0.1 * jax.random.normal(rng, batch["x"].shape)
  pred = jnp.tanh(model.apply({"params": params}, x)[:, :12])
  return pred.reshape(-1, 2, 2, 3), batch["y"][:, :12].reshape(-1, 2, 2, 3)


def fixed_batch(num: int = 8) -> dict[str, np.ndarray]:
  """The first ``num`` records, unshuffled: a fixed evaluation batch."""
  recs = records()[:num]
  return {k: np.stack([r[k] for r in recs]) for k in recs[0]}


def records() -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)
  w = rng.normal(size=(DIM, DIM)).astype(np.float32) / 4
  xs = rng.normal(size=(NUM_RECORDS, DIM)).astype(np.float32)
  return [{"x": xs[i], "y": np.tanh(xs[i] @ w), "index": np.int32(i)} for i in range(NUM_RECORDS)]


def make_iterator(config, process_index: int = 0, process_count: int = 1, shuffle=True):
  """Batches of ``config.data.global_batch_size`` records, the same sequence on every
  process; process ``p`` of ``P`` keeps rows ``p*B/P .. (p+1)*B/P - 1`` of each global
  batch: the rows ``jax.make_array_from_process_local_data`` (``loop.place_batch``) puts
  on its devices when the mesh lists each process's devices together, as
  ``jax.devices()`` does. So any process count trains on the same global batches."""
  gbs = int(config.data.global_batch_size)
  if gbs % process_count:
    raise ValueError(f"global_batch_size={gbs} does not divide over {process_count} processes")
  per_host = gbs // process_count
  lo, hi = process_index * per_host, (process_index + 1) * per_host
  ds = grain.MapDataset.source(records())
  if shuffle:
    ds = ds.shuffle(seed=int(config.data.seed))
  ds = ds.repeat(None).batch(gbs, drop_remainder=True)
  if process_count > 1:
    ds = ds.map(lambda b: {k: v[lo:hi] for k, v in b.items()})
  return iter(ds.to_iter_dataset())


def make_config(**train) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = dict(global_batch_size=8, seed=0)
  c.mesh = dict(data=-1, fsdp=1)
  c.optim = common.optim(
    lr=3e-3,
    warmup_steps=2,
    constant_steps=10,
    decay_steps=10,
    b2=0.99,
    weight_decay=1e-4,
  )
  c.ema = dict(decay=0.9)
  c.train = common.train(
    num_steps=6, log_every=1, checkpoint_every=3, keep_checkpoints=5, sample_every=3
  )
  c.train.update(train)
  return c
