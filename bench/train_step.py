"""One training step of a text-conditioned UNet: facediff's trainer vs PyTorch.

For each size (``--sizes``: ``small`` and/or ``sd14``, the SD-1.4 UNet with 859.5 M
parameters) it builds diffusers' ``UNet2DConditionModel`` (random init), takes the
same configuration into facediff (``convert.unet.config_from_diffusers``), and times:

* facediff: a ``facediff.train.Task`` around the UNet with the eps-MSE loss (DiffSFSR
  Eq. 2: t ~ U{0..999}, x_t = q_sample(x_0, t, eps), loss = mean (eps_theta - eps)^2 on
  the scaled-linear schedule), AdamW after global-norm clipping at 1.0, no EMA, through
  ``state.create_train_state`` and ``step.make_train_step`` (jit, NamedSharding on a
  one-device mesh, donated state), compiled ahead of time;
* PyTorch: the same loss on diffusers' UNet, ``torch.optim.AdamW`` after
  ``clip_grad_norm_(1.0)``, same shapes, timed in the same run right after facediff.

Printed per size: median seconds per step of each and the ratio facediff / PyTorch,
XLA-counted FLOPs of one step and the FLOP/s facediff reaches, the compiled program's
memory per device (arguments + outputs + temporaries - aliased, in GiB), images/s, and
with ``--peak_tflops`` the MFU. Shapes: batch ``--batch`` (1), latents
``--size`` x ``--size`` x 4 (64), cross-attention context 77 x 768.

FLOPs: XLA's cost analysis counts a loop body once, and on CPU facediff runs SD's large
self-attentions blocked in ``lax.map`` loops (``layers.multi_head_attention``), so on
CPU the FLOPs come from the same step lowered with ``attention_impl="xla"`` (lowered,
not compiled, cost analysis: no second compile); where the timed program already uses
"xla" or "cudnn" (the GPU preset) they come from its compiled.cost_analysis().

Usage:
    python bench/train_step.py [--sizes small,sd14] [--steps 3] [--batch 1]
        [--dtype float32|bfloat16] [--attention auto|xla|blocked] [--skip-torch]
        [--preset gpu --peak_tflops 989]

GPU section (``--preset gpu``): bfloat16 compute (float32 master weights), batch 8,
512 px images = 64 x 64 latents, attention through
``jax.nn.dot_product_attention(implementation="cudnn")`` (``--attention cudnn``; "xla"
for XLA's own kernel), PyTorch under ``torch.autocast(bfloat16)`` on CUDA; report
images/s and MFU against ``--peak_tflops`` (dense bf16: H100/H200 989, A100 312).

Measured 2026-11-22 on a 2-core CPU (the shared dev VM, load average 5-7 from other
jobs, so timings are noisy), float32, batch 1, 64x64x4 latents, 77x768 context,
``--sizes small --steps 5``:
  small (2,729,892 parameters): facediff 1.365 s per step (runs 1.21-1.74 s), compile
  87 s; PyTorch 3.216 s per step (runs 1.92-3.95 s) in the same process; ratio 0.42;
  11.2 GFLOP per step (XLA count), 8.2 GFLOP/s achieved; 0.35 GiB compiled memory per
  device; 0.73 images/s. PyTorch alone in a fresh process on the same machine took
  1.6-2.3 s per step, so on a quiet machine the ratio is nearer 0.6-0.85 than 0.42.
  sd14: not measured on this CPU (an 860 M-parameter AdamW step: params, gradients and
  two moments alone are 13.8 GB in float32, and compiling takes many minutes on 2
  cores); run ``--sizes sd14`` on a larger machine.
GPU figures: not measured yet (no GPU in this session).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

# Diffusers configs (the fields that differ from UNet2DConditionModel's defaults, which
# are SD-1.x's: 4 in/out channels, blocks 320/640/1280/1280, 2 layers per block, 8
# heads, cross-attention 768).
SIZES = {
  # SD's layout at a tenth of the width, one layer per block, and no attention at full
  # latent resolution (a 4096-token self-attention would dominate a model this thin).
  "small": dict(
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=1,
    attention_head_dim=8,
    norm_num_groups=32,
    cross_attention_dim=768,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
  ),
  "sd14": dict(cross_attention_dim=768, attention_head_dim=8),
}


def _time_once(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _config(args):
  import ml_collections

  c = ml_collections.ConfigDict()
  c.data = dict(global_batch_size=args.batch)
  c.mesh = dict(data=1, fsdp=1)
  c.optim = dict(
    lr=1e-4, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, max_grad_norm=1.0
  )
  c.ema = dict(decay=0.0)
  c.train = dict(seed=0, grad_accum_steps=1)
  return c


def _eps_mse_task(unet_cfg, args):
  """DiffSFSR Eq. 2 (L_DM), the eps-prediction MSE, as a facediff.train.Task."""
  import jax
  import jax.numpy as jnp

  from facediff.diffusion import schedules
  from facediff.models import unet as unet_model
  from facediff.train import Task

  model = unet_model.UNet2DConditionModel(unet_cfg)
  sched = schedules.make_schedule("scaled_linear")
  hw = (args.size, args.size)

  def init(key):
    return unet_model.init_params(unet_cfg, key, sample_hw=hw, context_len=args.context_len)

  def loss_fn(params, frozen, batch, rng, model_state):
    del frozen, model_state
    x0, ctx = batch["latents"], batch["context"]
    k_t, k_eps = jax.random.split(rng)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, sched.num_train_timesteps)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = schedules.q_sample(sched, x0, t, eps)
    pred = model.apply({"params": params}, x_t, t, ctx)
    loss = jnp.mean((pred.astype(jnp.float32) - eps) ** 2)
    return loss, {"mse": loss}

  return Task(name="unet_eps_mse", init=init, loss_fn=loss_fn)


def _cost(compiled_or_lowered):
  cost = compiled_or_lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _facediff_step(unet_cfg, args, batch_np):
  """(run one step, FLOPs per step, bytes per device, compile seconds, #params)."""
  import jax

  from facediff import partitioning
  from facediff.train import state as state_lib
  from facediff.train import step as step_lib

  cfg = _config(args)
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  task = _eps_mse_task(unet_cfg, args)
  with partitioning.activation_rules(mesh):
    state, shardings, tx = state_lib.create_train_state(task, cfg, mesh)
    step, *_ = step_lib.make_train_step(task, tx, cfg, mesh, shardings, None)
    sharding = partitioning.batch_sharding(mesh)
    batch = jax.tree.map(lambda x: jax.device_put(x, sharding), batch_np)
    t0 = time.perf_counter()
    lowered = step.lower(state, None, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    if unet_cfg.attention_impl in ("xla", "cudnn"):
      flops = _cost(compiled)
    else:  # count on the unblocked attention (see the module docstring)
      xla_task = _eps_mse_task(unet_cfg.replace(attention_impl="xla"), args)
      xla_step, *_ = step_lib.make_train_step(xla_task, tx, cfg, mesh, shardings, None)
      flops = _cost(xla_step.lower(state, None, batch))
  mem = compiled.memory_analysis()
  per_device = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  )
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
  box = {"state": state}

  def run():
    box["state"], metrics = compiled(box["state"], None, batch)
    jax.block_until_ready(metrics["loss"])
    if not bool(metrics["finite"]):
      raise FloatingPointError("facediff step: non-finite loss")

  return run, flops, per_device, compile_s, n_params


def _torch_step(tm, args, batch_np, device):
  import torch
  import torch.nn.functional as F
  from diffusers import DDPMScheduler

  sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  sched.alphas_cumprod = sched.alphas_cumprod.to(device)
  opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2)
  x0 = torch.from_numpy(batch_np["latents"].transpose(0, 3, 1, 2).copy()).to(device)
  ctx = torch.from_numpy(batch_np["context"]).to(device)
  gen = torch.Generator(device=device).manual_seed(0)
  autocast = args.dtype == "bfloat16"

  def run():
    t = torch.randint(0, 1000, (x0.shape[0],), device=device, generator=gen)
    eps = torch.randn(x0.shape, device=device, generator=gen)
    x_t = sched.add_noise(x0, eps, t)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      pred = tm(x_t, t, ctx).sample
    loss = F.mse_loss(pred.float(), eps)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
      torch.cuda.synchronize()
    if not torch.isfinite(loss):
      raise FloatingPointError("PyTorch step: non-finite loss")

  return run


def bench_size(name, args):
  import diffusers
  import jax
  import torch

  from facediff.convert import unet as unet_convert

  torch.manual_seed(0)
  device = torch.device("cuda" if torch.cuda.is_available() and not args.torch_cpu else "cpu")
  tm = diffusers.UNet2DConditionModel(sample_size=args.size, **SIZES[name]).to(device).train()
  n_torch = sum(p.numel() for p in tm.parameters())
  impl = None if args.attention == "auto" else args.attention
  unet_cfg = unet_convert.config_from_diffusers(
    dict(tm.config), dtype=args.dtype, attention_impl=impl
  )
  rng = np.random.default_rng(0)
  b, s = args.batch, args.size
  batch_np = {
    "latents": rng.standard_normal((b, s, s, 4)).astype(np.float32),
    "context": rng.standard_normal((b, args.context_len, 768)).astype(np.float32),
  }
  run_jax, flops, mem_bytes, compile_s, n_jax = _facediff_step(unet_cfg, args, batch_np)
  if n_jax != n_torch:
    raise AssertionError(f"{name}: facediff has {n_jax:,} parameters, diffusers {n_torch:,}")
  run_torch = None if args.skip_torch else _torch_step(tm, args, batch_np, device)

  # One block per framework (a warm-up step, then the timed ones): on a small shared CPU,
  # alternating single steps let one framework's idle worker threads slow the other's.
  run_jax()
  jax_times = [_time_once(run_jax) for _ in range(args.steps)]
  torch_times = []
  if run_torch:
    run_torch()
    torch_times = [_time_once(run_torch) for _ in range(args.steps)]
  jax_s = statistics.median(jax_times)
  torch_s = statistics.median(torch_times) if torch_times else float("nan")
  return dict(
    size=name,
    params=n_jax,
    compile_s=compile_s,
    jax_s=jax_s,
    jax_runs=jax_times,
    torch_s=torch_s,
    torch_runs=torch_times,
    flops=flops,
    mem_gib=mem_bytes / 2**30,
    images_per_s=b / jax_s,
    platform=jax.devices()[0].platform,
    torch_device=device.type,
  )


def _table(rows, peak_tflops):
  cols = [
    ("size", "{}"),
    ("params", "{:,}"),
    ("compile_s", "{:.1f}"),
    ("jax_s", "{:.3f}"),
    ("torch_s", "{:.3f}"),
    ("ratio", "{:.2f}"),
    ("GFLOP/step", "{:.1f}"),
    ("GFLOP/s", "{:.1f}"),
    ("GiB/device", "{:.2f}"),
    ("img/s", "{:.2f}"),
  ]
  if peak_tflops:
    cols.append(("MFU", "{:.1%}"))
  out = []
  for r in rows:
    v = dict(r)
    v["ratio"] = r["jax_s"] / r["torch_s"]
    v["GFLOP/step"] = r["flops"] / 1e9
    v["GFLOP/s"] = r["flops"] / r["jax_s"] / 1e9
    v["GiB/device"] = r["mem_gib"]
    v["img/s"] = r["images_per_s"]
    if peak_tflops:
      v["MFU"] = r["flops"] / r["jax_s"] / (peak_tflops * 1e12)
    out.append([fmt.format(v[k]) for k, fmt in cols])
  header = [k for k, _ in cols]
  widths = [max(len(h), *(len(o[i]) for o in out)) for i, h in enumerate(header)]
  lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(o, widths, strict=True)) for o in out]
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default="small", help="comma list of: " + ",".join(SIZES))
  ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
  ap.add_argument("--batch", type=int, default=None, help="default 1 (gpu preset: 8)")
  ap.add_argument("--size", type=int, default=64, help="latent height = width (64: 512 px)")
  ap.add_argument("--context-len", type=int, default=77)
  ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
  ap.add_argument(
    "--attention",
    default=None,
    choices=["auto", "xla", "cudnn", "blocked"],
    help="facediff UNetConfig.attention_impl (auto: blocked for large CPU attention)",
  )
  ap.add_argument("--preset", default="cpu", choices=["cpu", "gpu"])
  ap.add_argument("--peak_tflops", type=float, default=0.0, help="peak FLOP/s for MFU")
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--torch-cpu", action="store_true", help="run PyTorch on CPU even with CUDA")
  args = ap.parse_args()
  gpu = args.preset == "gpu"
  args.batch = args.batch or (8 if gpu else 1)
  args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
  args.attention = args.attention or ("cudnn" if gpu else "auto")

  import jax
  import torch

  jax.config.update("jax_default_matmul_precision", "highest" if not gpu else "default")
  if args.threads:
    torch.set_num_threads(args.threads)
  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
    f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; batch {args.batch}, "
    f"latents {args.size}x{args.size}x4, context {args.context_len}x768, {args.dtype}, "
    f"attention {args.attention}"
  )
  rows = []
  for name in [s.strip() for s in args.sizes.split(",") if s.strip()]:
    if name not in SIZES:
      raise SystemExit(f"--sizes: unknown size {name!r}; known: {', '.join(SIZES)}")
    r = bench_size(name, args)
    print(
      f"{name}: facediff runs {', '.join(f'{t:.3f}' for t in r['jax_runs'])} s; PyTorch "
      f"({r['torch_device']}) runs {', '.join(f'{t:.3f}' for t in r['torch_runs'])} s",
      flush=True,
    )
    rows.append(r)
  print(_table(rows, args.peak_tflops))


if __name__ == "__main__":
  main()
