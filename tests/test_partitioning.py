"""Logical-axis sharding: rules, mesh construction, sharded init and apply (8 CPU devices)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from facediff import partitioning
from facediff.convert import common
from facediff.models import unet as unet_model

# One resolution level keeps compile times small; it still has every layer kind
# (convs, GroupNorm/LayerNorm, self/cross attention, GEGLU, time MLP).
CONFIG = unet_model.UNetConfig.tiny(
  in_channels=9,
  sample_size=8,
  block_out_channels=(32,),
  down_block_types=("CrossAttnDownBlock2D",),
  up_block_types=("CrossAttnUpBlock2D",),
)


def test_make_mesh_fills_in():
  assert len(jax.devices()) == 8
  mesh = partitioning.make_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert dict(partitioning.make_mesh({"data": -1, "fsdp": 1}).shape) == {"data": 8, "fsdp": 1}
  with pytest.raises(ValueError, match="at most one"):
    partitioning.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="not divisible"):
    partitioning.make_mesh({"data": 3, "fsdp": -1})
  with pytest.raises(ValueError, match="needs 6 devices"):
    partitioning.make_mesh({"data": 2, "fsdp": 3})


def test_rules_priority_and_divisibility():
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 4})
  spec = functools.partial(partitioning.logical_to_mesh_spec, mesh=mesh)
  assert spec(("embed", "mlp"), (320, 2560)) == P(None, "fsdp")  # mlp outranks embed
  assert spec(("mlp", "embed"), (1280, 320)) == P("fsdp", None)
  assert spec(("cross_embed", "heads"), (768, 320)) == P(None, "fsdp")
  assert spec(("conv_h", "conv_w", "conv_in", "conv_out"), (3, 3, 9, 320)) == P(
    None, None, None, "fsdp"
  )
  # 4 output channels do not split 8 ways: the input channels take the fsdp axis instead
  mesh8 = partitioning.make_mesh({"data": 1, "fsdp": 8})
  assert partitioning.logical_to_mesh_spec(
    ("conv_h", "conv_w", "conv_in", "conv_out"), (3, 3, 320, 4), mesh8
  ) == P(None, None, "fsdp", None)
  assert spec(("norm",), (320,)) == P(None)
  assert spec(("conv_out",), (6,)) == P(None)  # indivisible -> replicated


def _expected_spec(names, shape, fsdp=4):
  """The rules written out by hand: first of this priority list that divides gets fsdp."""
  for name in ("vocab", "mlp", "heads", "conv_out", "embed", "cross_embed", "conv_in"):
    for i, n in enumerate(names):
      if n == name and shape[i] % fsdp == 0:
        return P(*["fsdp" if j == i else None for j in range(len(shape))])
  return P(*([None] * len(shape)))


def _init(k):
  return unet_model.init_params(CONFIG, k, context_len=5)


@pytest.fixture(scope="module")
def setup():
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 4})
  key = jax.random.key(42)
  sharded = partitioning.init_sharded(_init, key, mesh)
  unsharded = jax.jit(lambda k: nn.unbox(_init(k)))(key)
  return mesh, key, sharded, unsharded


def test_sharded_init_follows_rules_and_equals_unsharded(setup):
  mesh, key, sharded, unsharded = setup
  abstract = jax.eval_shape(_init, key)
  boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  flat_s = jax.tree.leaves(sharded)
  flat_u = jax.tree.leaves(unsharded)
  assert len(boxes) == len(flat_s) == len(flat_u)
  n_sharded = 0
  for box, s, u in zip(boxes, flat_s, flat_u, strict=True):
    want = _expected_spec(box.names, box.value.shape)
    got = s.sharding.spec
    assert tuple(got) + (None,) * (len(want) - len(got)) == tuple(want), (box.names, got)
    # replicated over 'data': the 8 devices hold 4 distinct shards (1 if replicated)
    starts = {tuple(sl.start for sl in sh.index) for sh in s.addressable_shards}
    if "fsdp" in tuple(want):
      n_sharded += 1
      dim = tuple(want).index("fsdp")
      assert s.addressable_shards[0].data.shape[dim] == s.shape[dim] // 4
      assert len(starts) == 4
    else:
      assert len(starts) == 1
    np.testing.assert_array_equal(np.asarray(s), np.asarray(u))
  assert n_sharded > 20
  # every kernel of this config is sharded (only norm scales/biases are replicated)
  for name, leaf in common.flatten_params(sharded).items():
    if name.endswith("kernel"):
      assert "fsdp" in tuple(leaf.sharding.spec), name


def test_sharded_apply_equals_unsharded(setup):
  mesh, key, params, unsharded = setup
  host_params = jax.tree.map(np.asarray, unsharded)
  k1, k2 = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k1, (8, 8, 8, CONFIG.in_channels))
  ctx = jax.random.normal(k2, (8, 5, CONFIG.cross_attention_dim))
  t = jnp.arange(8, dtype=jnp.int32) * 100
  apply = jax.jit(functools.partial(unet_model.apply_unet, CONFIG))
  ref = apply(host_params, x, t, ctx)

  xs = jax.device_put(x, partitioning.batch_sharding(mesh, 4))
  cs = jax.device_put(ctx, partitioning.batch_sharding(mesh, 3))
  ts = jax.device_put(t, partitioning.batch_sharding(mesh, 1))
  with partitioning.activation_rules(mesh):
    out = apply(params, xs, ts, cs)
    # converted host params placed with shard_params: same shardings, same result
    placed = partitioning.shard_params(host_params, jax.eval_shape(_init, key), mesh)
    out2 = apply(placed, xs, ts, cs)
  assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=0, rtol=0)
