"""Loader throughput (records/s) on this machine next to what training consumes.

Usage: python bench/data.py [--quick] [--records N] [--batches N]

Writes synthetic shards (a real portrait as PNG, the face mask, embeddings, and
the cached latent where the model uses one) in /tmp, then times the host side of
``data_pipelines.loaders`` (read, msgpack decode, PNG decode, batching to uint8
images; the float conversion happens on the devices) for worker counts 0 and 1,
after a warm-up batch. Shapes:

* tiny: the tests' 16x16 images;
* DiffSFSR: 512x512 image + mask, 64x64x4 SD latent, ArcFace 512 + dlib 128 +
  FaceNet 512 identity, DLN 16 expression;
* TGDM: 256x256 image + mask, CurricularFace 512 identity, 64-D expression
  coefficients (no latent: pixel diffusion).

Demand is global batch 64 times the step rate, per host. The DiffSFSR step rate is
an estimate stated below (from FACTS.md's 788 GFLOP per SD UNet forward), not a
measurement; TGDM's is an assumption (its UNet size is not in the paper).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from data_pipelines import fake_shards, loaders  # noqa: E402

GLOBAL_BATCH = 64

# DiffSFSR demand estimate. A training sample costs two UNet calls (the loss's eps
# prediction and the second call of the improved midpoint sampling) with backward
# (~3x forward each) plus the VAE decode and face encoders for L_id / L_exp,
# taken as one more UNet-equivalent with backward: about 3 * 3 * 788 GFLOP.
UNET_FWD_GFLOP = 788.0
SAMPLE_TFLOP = 3 * 3 * UNET_FWD_GFLOP / 1000.0
GPUS, PEAK_TFLOPS, MFU = 8, 312.0, 0.4  # the paper's 8 GPUs, taken as A100, 40% MFU
DIFFSFSR_STEPS = GPUS * PEAK_TFLOPS * MFU / (SAMPLE_TFLOP * GLOBAL_BATCH)
TGDM_STEPS = 4.0  # assumption: a 256x256 pixel UNet, 4 GPUs on one host

SETUPS = {
  "tiny": dict(
    size=16,
    latent=(2, 2, 4),
    emb={"id_dlib": 128, "exp_fer": 7},
    id_fields=["id_dlib"],
    exp="exp_fer",
    hosts=1,
    steps=None,
  ),
  "DiffSFSR 512": dict(
    size=512,
    latent=(64, 64, 4),
    emb={"id_arcface": 512, "id_dlib": 128, "id_facenet": 512, "exp_dln": 16},
    id_fields=["id_arcface", "id_dlib", "id_facenet"],
    exp="exp_dln",
    hosts=1,
    steps=DIFFSFSR_STEPS,
  ),
  "TGDM 256": dict(
    size=256,
    latent=None,
    emb={"id_curricular": 512, "exp_3dmm": 64},
    id_fields=["id_curricular"],
    exp="exp_3dmm",
    hosts=1,
    steps=TGDM_STEPS,
  ),
}


def measure(folder, setup, workers, batches, batch):
  cfg = ml_collections.ConfigDict(
    {
      "data": dict(
        path=folder,
        global_batch_size=batch,
        image_size=setup["size"],
        id_fields=setup["id_fields"],
        exp_field=setup["exp"],
        seed=0,
        num_workers=workers,
        latent_field="latent" if setup["latent"] else "",
        latent_downsample=setup["size"] // setup["latent"][0] if setup["latent"] else 8,
      )
    }
  )
  # The host's share when training on accelerators: uint8 images, the [-1, 1]
  # conversion runs on the devices (make_train_iterator with a mesh).
  it = iter(loaders.make_train_dataset(cfg))
  next(it)  # warm-up: worker start, first reads
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t0
  assert b["bkg_image"].shape == (batch, setup["size"], setup["size"], 3)
  it.close()
  return batches * batch / dt


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="fewer batches, small batch")
  p.add_argument("--records", type=int, default=128)
  p.add_argument("--batches", type=int, default=4)
  args = p.parse_args()
  # grain's worker processes read absl flags; this script parses its own with argparse.
  flags.FLAGS([sys.argv[0]])
  batch = 16 if args.quick else GLOBAL_BATCH
  batches = 2 if args.quick else args.batches
  print(
    f"machine: {os.cpu_count()} CPU cores; host batch {batch}; {batches} timed "
    f"batches after 1 warm-up"
  )
  print(
    f"DiffSFSR demand assumption: {SAMPLE_TFLOP:.1f} TFLOP/sample, {GPUS} GPUs x "
    f"{PEAK_TFLOPS:.0f} TFLOP/s x {MFU:.0%} MFU -> {DIFFSFSR_STEPS:.2f} steps/s at "
    f"global batch {GLOBAL_BATCH}; TGDM: {TGDM_STEPS:.1f} steps/s assumed"
  )
  print(f"{'setup':<14}{'workers':>8}{'records/s':>12}{'needed/host':>13}  keeps up?")
  root = tempfile.mkdtemp(prefix="facediff_bench_")
  try:
    for name, setup in SETUPS.items():
      folder = os.path.join(root, name.split()[0])
      fake_shards.write_dataset(
        folder,
        args.records,
        image_size=setup["size"],
        records_per_shard=64,
        embeddings=setup["emb"],
        latent_shape=setup["latent"],
        image="photo",
      )
      need = None if setup["steps"] is None else GLOBAL_BATCH * setup["steps"] / setup["hosts"]
      for workers in (0, 1):
        rate = measure(folder, setup, workers, batches, batch)
        cores = os.cpu_count() or 1
        verdict = (
          "-"
          if need is None
          else (
            "yes"
            if rate >= need
            else f"no ({need / rate:.1f}x short; ~"
            f"{int(np.ceil(cores * need / rate))} "
            "such cores would do)"
          )
        )
        need_s = "-" if need is None else f"{need:.0f}"
        print(f"{name:<14}{workers:>8}{rate:>12.0f}{need_s:>13}  {verdict}")
      shutil.rmtree(folder)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
