"""DiffSFSR training step: the cost of the identity/expression terms.

For each size it compiles the trainer's step (facediff.train: jit, donated state,
AdamW) twice — with the paper's loss (L_DM + identity + expression terms on the
improved-midpoint z0*, i.e. two UNet calls, the VAE decoder and the face encoders)
and with L_DM only (one UNet call) — and prints per variant: median step seconds,
XLA-counted FLOPs per step, achieved FLOP/s, compiled temporary memory per device,
and the ratio full / L_DM-only of time and FLOPs.

Sizes:
  tiny: configs/diffsfsr.py:tiny (64 px pixels, real dlib + fer encoders), batch 4.
  sd14: the SD-1.4-size configuration with random weights: 860M-parameter UNet on
    64x64x4 latents (512 px images), SD's VAE decoder (rematerialised), ArcFace r50 +
    FaceNet + dlib identity compound and DLN expression, batch 1. About 15 GB of host
    memory and many minutes on a small CPU.

Usage: python bench/diffsfsr_step.py [--sizes tiny,sd14] [--steps 3] [--dtype float32]

Seen 2026-11-22 on the 2-core dev VM (a test suite ran beside it, so times are upper
bounds), tiny (64 px pixels, batch 4), float32, 3 timed steps:
  size   loss               step s     GFLOP  GFLOP/s  temp GB
  tiny   L_DM only           1.054      26.2     24.8     0.27   compile 55 s
  tiny   L_DM + id + exp     3.406      56.4     16.6     0.57   compile 75 s
  tiny: identity/expression terms cost x3.23 time, x2.16 FLOPs of an L_DM-only step
(the second UNet call, the dlib ResNet's forward and backward on 150 px chips and
fer's). The sd14 size was not run (about 15 GB and many minutes of CPU), and no GPU
was lent to this task: GPU figures are not measured yet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _config(size: str, full: bool, dtype: str):
  from configs import diffsfsr as diffsfsr_config

  if size == "tiny":
    c = diffsfsr_config.get_config("tiny")
  else:
    c = diffsfsr_config.get_config("sd14_512")
    c.data.global_batch_size = 1
    c.model.encoder_weights = dict(
      id_arcface="random", id_facenet="random", id_dlib="random", exp_dln="random"
    )
  c.model.dtype = dtype
  if not full:
    c.model.estimator = "none"
  c.mesh = dict(data=1, fsdp=1)
  return c


def _random_sd(dtype: str):
  """SD-1.4-shaped model set with random weights (UNet and VAE only)."""
  import flax.linen as nn
  import jax

  from facediff.models import unet, vae
  from facediff.models.clip import CLIPTextConfig
  from facediff.models.stable_diffusion import SDModels

  ucfg = unet.UNetConfig(dtype=dtype)
  vcfg = vae.VAEConfig.sd14()
  params = {
    "unet": nn.unbox(jax.jit(lambda k: unet.init_params(ucfg, k))(jax.random.key(0))),
    "vae": nn.unbox(jax.jit(lambda k: vae.init_params(vcfg, k))(jax.random.key(1))),
    "text_encoder": {},
  }
  return SDModels(ucfg, vcfg, CLIPTextConfig(), params)


def _batch(config, seed=0):
  import jax.numpy as jnp
  import numpy as np

  d = config.data
  b, s = int(d.global_batch_size), int(d.image_size)
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, s, s, 1), np.float32)
  mask[:, s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1
  sides = {"dlib150": 150, "fer64": 64, "arcface112": 112, "facenet160": 160}
  crops = {}
  for kind in d.crop_fields:
    m = np.zeros((b, 2, 3), np.float32)
    scale = sides[kind] / (0.6 * s)
    m[:, 0, 0] = m[:, 1, 1] = scale
    m[:, :, 2] = sides[kind] / 2 - scale * s / 2
    crops[kind] = jnp.asarray(m)
  return {
    "bkg_image": jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32),
    "bkg_mask": jnp.asarray(mask),
    "id": {
      f: jnp.asarray(rng.normal(size=(b, n)), jnp.float32)
      for f, n in zip(d.id_fields, d.id_dims, strict=True)
    },
    "exp": jnp.asarray(rng.uniform(0, 1, (b, d.exp_dim)), jnp.float32),
    "crops": crops,
  }


def measure(size: str, full: bool, steps: int, dtype: str, sd=None) -> dict:
  import jax

  from facediff import partitioning
  from facediff.train import diffsfsr_task
  from facediff.train import state as state_lib
  from facediff.train import step as step_lib

  config = _config(size, full, dtype)
  task = diffsfsr_task.DiffSFSR(config, sd=sd).task()
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  batch = _batch(config)
  with partitioning.activation_rules(mesh):
    state, shardings, tx = state_lib.create_train_state(task, config, mesh)
    frozen, frozen_sh = state_lib.shard_frozen(task, mesh)
    step, *_ = step_lib.make_train_step(task, tx, config, mesh, shardings, frozen_sh)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    mem = compiled.memory_analysis()
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, frozen, batch)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  return {
    "size": size,
    "loss": "L_DM + id + exp" if full else "L_DM only",
    "step_s": sec,
    "gflop": flops / 1e9,
    "gflop_per_s": flops / 1e9 / sec,
    "temp_gb": mem.temp_size_in_bytes / 1e9,
    "compile_s": compile_s,
    "terms": sorted(k for k in metrics if k.startswith("l_")),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default="tiny")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--dtype", default="float32")
  a = ap.parse_args()
  import jax

  print(f"devices: {jax.devices()}")
  header = f"{'size':6} {'loss':16} {'step s':>8} {'GFLOP':>9} {'GFLOP/s':>8} {'temp GB':>8}"
  for size in a.sizes.split(","):
    sd = _random_sd(a.dtype) if size == "sd14" else None
    rows = [measure(size, full, a.steps, a.dtype, sd) for full in (False, True)]
    print(header)
    for r in rows:
      print(
        f"{r['size']:6} {r['loss']:16} {r['step_s']:8.3f} {r['gflop']:9.1f} "
        f"{r['gflop_per_s']:8.1f} {r['temp_gb']:8.2f}   compile {r['compile_s']:.0f} s, "
        f"terms {r['terms']}"
      )
    base, full = rows
    print(
      f"{size}: identity/expression terms cost x{full['step_s'] / base['step_s']:.2f} time, "
      f"x{full['gflop'] / base['gflop']:.2f} FLOPs of an L_DM-only step"
    )


if __name__ == "__main__":
  main()
