"""3DMM renderer speed: BFM-size mesh, forward and forward+backward, 224 and 256 px.

Builds a synthetic morphable model with the BFM's counts (35,709 vertices, 70,789
triangles; facediff.render.bfm.synthetic_bfm), draws a batch of D3DFR coefficient vectors
(random identity/expression/texture, small pose and lighting), and times, compiled:
  * forward: coefficients -> I_3d (B, S, S, 3), mask and landmarks (renderer.render);
  * forward+backward: the gradient w.r.t. all coefficients of
    sum(I_3d * random weights) + sum(landmarks) (what a training step would pay);
  * the parts of the forward: reconstruct (shape, pose, normals, lighting), rasterize
    (visibility), interpolate (shading the pixels).
Prints the median of --repeats runs after one compile run, and the rasteriser's
overflow count (0: no triangle exceeded the window).

Usage: python bench/render.py [--quick] [--batch 8] [--sizes 224,256] [--window 4]
       [--repeats 3]
--quick: a 5,000-vertex mesh, batch 2, window 8, one repeat (a smoke run).

Measured 2026-11-22 on the 2-core dev VM (Intel Xeon, AVX-512, CPU only), BFM-size
mesh, batch 8, window 4, float32, three runs while other jobs kept the load average
at 5-8 on its 2 cores (so an idle machine should do better; the spread is that load):
  224 px: forward 0.65 / 1.12 / 1.58 s, forward+backward 1.40 / 1.96 / 2.26 s
  256 px: forward 0.97 / 1.17 / 1.54 s, forward+backward 1.59 / 1.96 / 2.17 s
  parts of the forward (run with --repeats 5): reconstruct 0.18-0.28 s, rasterize
  0.64-0.67 s, interpolate 0.08-0.14 s; the face covers 42% of the image; overflow 0.
Peak resident memory of the whole run at 256 px (forward and backward): 1.2 GB.
--quick (5,000 vertices, batch 2, window 8): forward about 0.11 s, with backward 0.15 s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from facediff.render import bfm, coeffs, mesh, raster, renderer

BFM_VERTICES = 35_709
BFM_TRIANGLES = 70_789


def _median_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def random_coeffs(batch: int, seed: int = 0) -> coeffs.Coeffs:
  """D3DFR-like coefficients: unit-variance shape/texture, small pose and lighting."""
  rng = np.random.default_rng(seed)
  x = np.zeros((batch, coeffs.layout_size("d3dfr")), np.float32)
  x[:, :80] = rng.normal(size=(batch, 80))
  x[:, 80:144] = rng.normal(size=(batch, 64))
  x[:, 144:224] = 0.5 * rng.normal(size=(batch, 80))
  x[:, 224:227] = 0.2 * rng.normal(size=(batch, 3))
  x[:, 227:254] = 0.1 * rng.normal(size=(batch, 27))
  x[:, 254:257] = 0.1 * rng.normal(size=(batch, 3))
  return coeffs.split(jnp.asarray(x))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="small mesh, batch 2, one repeat")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--sizes", default="224,256")
  ap.add_argument("--window", type=int, default=raster.DEFAULT_WINDOW)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  num_vertices, num_triangles, batch, repeats = (
    BFM_VERTICES,
    BFM_TRIANGLES,
    args.batch,
    args.repeats,
  )
  window = args.window
  if args.quick:  # a coarser mesh has larger triangles: a larger window
    num_vertices, num_triangles, batch, repeats, window = 5_000, None, 2, 1, 8

  t0 = time.perf_counter()
  model = bfm.synthetic_bfm(num_vertices, seed=0, num_triangles=num_triangles)
  model = jax.tree.map(jnp.asarray, model)
  print(
    f"mesh: {model.num_vertices} vertices, {model.num_triangles} triangles "
    f"(built in {time.perf_counter() - t0:.1f} s); batch {batch}; window {window}; "
    f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})"
  )
  c = random_coeffs(batch)
  for size in [int(s) for s in args.sizes.split(",")]:
    bench_size(model, c, size, window, repeats)


def bench_size(model, c: coeffs.Coeffs, size: int, window: int, repeats: int) -> None:
  """Times and prints forward, forward+backward and the forward's three parts."""
  camera = mesh.camera_for_size(size)
  batch = c.identity.shape[0]
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(batch, size, size, 3)), jnp.float32)

  def forward(c):
    return renderer.render(model, c, image_size=size, window=window)

  def loss(c):
    out = renderer.render(model, c, image_size=size, window=window)
    return jnp.sum(out.image * weights) + jnp.sum(out.landmarks)

  recon = jax.jit(renderer.reconstruct, static_argnums=2)
  rec = recon(model, c, camera)
  raster_args = (rec.xy, rec.depth, model.triangles, size, window, camera.z_near, camera.z_far)
  fragments = raster.rasterize(*raster_args)
  t_fwd = _median_time(forward, (c,), repeats)
  t_bwd = _median_time(jax.jit(jax.grad(loss)), (c,), repeats)
  t_rec = _median_time(recon, (model, c, camera), repeats)
  t_ras = _median_time(raster.rasterize, raster_args, repeats)
  interp_args = (fragments, rec.xy, rec.depth, model.triangles, rec.colors)
  t_int = _median_time(jax.jit(raster.interpolate), interp_args, repeats)
  out = forward(c)
  print(
    f"{size} px: forward {t_fwd:.3f} s, forward+backward {t_bwd:.3f} s "
    f"(reconstruct {t_rec:.3f}, rasterize {t_ras:.3f}, interpolate {t_int:.3f}); "
    f"face covers {float(out.mask.mean()):.0%} of the image; "
    f"overflow {np.asarray(out.overflow).tolist()}"
  )


if __name__ == "__main__":
  main()
