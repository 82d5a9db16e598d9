"""Sampler overhead and speed against diffusers, for a small denoiser on this CPU.

Prints:
  1. the compiled 50-step PNDM trajectory (one lax.scan, 51 denoiser calls as in SD)
     divided by 50 separately dispatched single denoiser calls (target <= 1.05): how
     much the sampler itself costs on top of the network;
  2. facediff's compiled trajectory divided by diffusers' PyTorch loop
     (PNDMScheduler.step per step) around an equivalent torch denoiser holding the
     same weights (target <= 0.7).

The second ratio measures the sampler loop (one compiled program against a Python loop
of scheduler steps) only while the denoiser is small; with a heavier one the figure is
dominated by the two frameworks' CPU convolutions (XLA's against oneDNN's), which the
"one denoiser call" line shows separately. Seen here: --size 32 --width 64 gives 1.34,
because XLA's CPU convolution is slower than oneDNN's at that size.

Usage: python bench/samplers.py [--size 16] [--batch 2] [--width 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, default=16)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--width", type=int, default=32)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  from diffusers import PNDMScheduler

  from facediff.diffusion import make_schedule, num_denoiser_calls, sample

  C, W = 4, args.width
  rng = np.random.default_rng(0)
  w = {  # a three-conv denoiser with a sinusoidal time embedding
    "c1": rng.standard_normal((3, 3, C, W)).astype(np.float32) * 0.1,
    "c2": rng.standard_normal((3, 3, W, W)).astype(np.float32) * 0.05,
    "c3": rng.standard_normal((3, 3, W, C)).astype(np.float32) * 0.05,
    "temb": rng.standard_normal((32, W)).astype(np.float32) * 0.1,
  }
  freqs = np.exp(-np.log(10000.0) * np.arange(16) / 16).astype(np.float32)

  def conv(x, k):
    return jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def eps_jax(params, x, t):
    a = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(a), jnp.cos(a)], -1) @ params["temb"]
    h = jax.nn.silu(conv(x, params["c1"]) + emb[:, None, None, :])
    h = jax.nn.silu(conv(h, params["c2"]))
    return conv(h, params["c3"])

  tw = {k: torch.from_numpy(v) for k, v in w.items()}
  tk = {k: tw[k].permute(3, 2, 0, 1).contiguous() for k in ("c1", "c2", "c3")}
  tfreq = torch.from_numpy(freqs)

  @torch.no_grad()
  def eps_torch(x, t):
    a = float(t) * tfreq[None]
    emb = torch.cat([torch.sin(a), torch.cos(a)], -1) @ tw["temb"]
    h = torch.nn.functional.silu(
      torch.nn.functional.conv2d(x, tk["c1"], padding=1) + emb[:, :, None, None]
    )
    h = torch.nn.functional.silu(torch.nn.functional.conv2d(h, tk["c2"], padding=1))
    return torch.nn.functional.conv2d(h, tk["c3"], padding=1)

  sched = make_schedule("scaled_linear")
  params = jax.tree.map(jnp.asarray, w)
  x_T = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, C)), jnp.float32)
  n = args.steps

  traj = jax.jit(
    lambda p, x: sample(
      lambda x, t, c: eps_jax(p, x, t), sched, x, method="pndm", num_steps=n, steps_offset=1
    )
  )
  single = jax.jit(eps_jax)
  t_vec = jnp.full((args.batch,), 500, jnp.int32)
  traj(params, x_T).block_until_ready()
  single(params, x_T, t_vec).block_until_ready()

  def best(fn):
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return min(times)

  def fifty_calls():
    for _ in range(n):
      single(params, x_T, t_vec).block_until_ready()

  t_traj = best(lambda: traj(params, x_T).block_until_ready())
  t_calls = best(fifty_calls)

  ref = PNDMScheduler(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
  )
  xt_torch = torch.from_numpy(np.asarray(x_T).transpose(0, 3, 1, 2).copy())

  def torch_loop():
    ref.set_timesteps(n)
    x = xt_torch
    for t in ref.timesteps:
      x = ref.step(eps_torch(x, t), t, x).prev_sample
    return x

  t_one_torch = best(lambda: eps_torch(xt_torch, 500))
  t_one_jax = best(lambda: single(params, x_T, t_vec).block_until_ready())
  out_t = torch_loop()
  t_torch = best(torch_loop)
  out_j = np.asarray(traj(params, x_T)).transpose(0, 3, 1, 2)
  calls = num_denoiser_calls("pndm", n)

  print(
    f"denoiser: 3 convs, width {W}, batch {args.batch}, {args.size}x{args.size}x{C}; "
    f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
    f"torch threads {torch.get_num_threads()}"
  )
  print(f"PNDM {n} steps ({calls} denoiser calls) compiled trajectory: {t_traj * 1e3:9.2f} ms")
  print(f"{n} separately dispatched denoiser calls:                 {t_calls * 1e3:9.2f} ms")
  print(f"ratio trajectory / {n} calls: {t_traj / t_calls:.3f}   (target <= 1.05)")
  print(f"diffusers PNDMScheduler loop, torch denoiser:           {t_torch * 1e3:9.2f} ms")
  print(f"ratio facediff / diffusers: {t_traj / t_torch:.3f}   (target <= 0.7)")
  print(
    f"one denoiser call: facediff/XLA {t_one_jax * 1e3:.3f} ms, torch {t_one_torch * 1e3:.3f} ms"
  )
  print(
    f"max |facediff - diffusers| over the final sample: {np.abs(out_j - out_t.numpy()).max():.2e}"
  )


if __name__ == "__main__":
  main()
