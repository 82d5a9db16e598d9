"""How well each z0* estimator recovers the clean sample, on a trained DiffSFSR
checkpoint (DiffSFSR Fig. 10: improved midpoint < midpoint < one step).

For records of a dataset (default: the workdir's held-out demo set, else its training
set), for each t on a grid, draws z_t = q(z_t | z0) with fixed noise and prints the
mean squared error ||z0* - z0||^2 (per element, in the diffusion's space) of
one_step, midpoint and improved_midpoint, and which estimator is best at each t.

Usage: python bench/x0_estimators.py --workdir TRAINED [--data DIR] [--num 16]
                                     [--timesteps 100,300,500,700,900]

Seen 2026-11-22, 2-core CPU, on the README main job's checkpoint (configs/diffsfsr.py
tiny, 200 steps, EMA 0.99; held-out L_DM 1.13 -> 0.15), 16 held-out records:
    t   one_step   midpoint  improved_midpoint
  100    0.0222     0.0144      0.0159
  300    0.163      0.0477      0.0550
  500    1.147      0.287       0.327
  700   14.13       7.46        7.64
  900  366.2      319.3       319.9
Both two-call estimators beat one step at every t (by 3.4x at t = 300), but plain
midpoint beat improved midpoint everywhere, by 2-15%: the paper's ordering (improved <
midpoint) is not reproduced at this training length. An earlier 30-step checkpoint
(EMA still almost the initialisation) had one step best: the second call helps only once
the denoiser has learned something. Not yet measured on a longer-trained model.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("one_step", "midpoint", "improved_midpoint")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--data", default=None)
  ap.add_argument("--num", type=int, default=16)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--timesteps", default="100,300,500,700,900")
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args()
  import jax
  import jax.numpy as jnp

  from data_pipelines import loaders
  from facediff.diffusion import estimators, schedules
  from launch import inference

  config, model, params, frozen, step = inference.load_trained(a.workdir)
  data = a.data or next(
    (p for p in (os.path.join(a.workdir, "heldout"), config.data.path) if os.path.isdir(p)),
    None,
  )
  c = config.copy_and_resolve_references()
  c.data.path = data
  c.data.global_batch_size = a.batch
  c.data.num_eval = a.num

  def errors(params, frozen, batch, t, noise):
    z0 = model.clean_latent(frozen, batch)
    z_t = schedules.q_sample(model.schedule, z0, t, noise)
    cond = model.condition(frozen, batch)
    out = {}
    for m in METHODS:
      est = estimators.estimate_x0(
        m, lambda z, tt, cc: model.eps(params, z, tt, cc), model.schedule, z_t, t, cond
      )
      out[m] = jnp.mean((est.x0 - z0) ** 2, axis=(1, 2, 3))
    return out

  run = jax.jit(errors)
  timesteps = [int(x) for x in a.timesteps.split(",")]
  sums = {t: dict.fromkeys(METHODS, 0.0) for t in timesteps}
  count = 0
  for i, batch in enumerate(loaders.make_eval_triplets(c, "reconstruct", seed=0)):
    valid = np.asarray(batch["valid"], bool)
    shape = model.latent_shape(batch)
    noise = jax.random.normal(jax.random.key(a.seed + i), shape, jnp.float32)
    for t in timesteps:
      e = run(params, frozen, batch, jnp.full((shape[0],), t, jnp.int32), noise)
      for m in METHODS:
        sums[t][m] += float(np.asarray(e[m])[valid].sum())
    count += int(valid.sum())
  print(f"checkpoint {a.workdir} step {step}; {count} records of {data}")
  print(f"{'t':>5} " + " ".join(f"{m:>18}" for m in METHODS) + "  best")
  for t in timesteps:
    means = {m: sums[t][m] / max(count, 1) for m in METHODS}
    best = min(means, key=means.get)
    print(f"{t:5d} " + " ".join(f"{means[m]:18.5f}" for m in METHODS) + f"  {best}")


if __name__ == "__main__":
  main()
