"""The main job: everything facediff can run end to end today.

    python -m launch.main --workdir DIR [--config configs/demo.py] [--t2i_model SD_DIR]

1. Builds the demo dataset locally (real face photos shipped inside installed
   packages, seeded augmentations) and exports it with the real offline encoders
   (dlib 128-D identity, fer expression, 68-landmark masks) into embedding shards.
2. Reads it back with the grain loader: DiffSFSR self-reconstruction batches placed
   on a (data, fsdp) mesh over every local device, and one batch of SFSR evaluation
   triplets (background, identity and expression from three different images).
3. With SD-1.x weights (``--t2i_model``: a diffusers folder or a CompVis single
   file), generates backgrounds from text prompts with PNDM and guidance.

Writes ``DIR/summary.json``. Re-running resumes the export.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags


def _mesh(axes: dict):
  from facediff import partitioning

  return partitioning.make_mesh(dict(axes))


def _describe(batch) -> dict:
  import jax

  return {
    "/".join(str(getattr(k, "key", k)) for k in path): list(np.shape(v))
    for path, v in jax.tree_util.tree_flatten_with_path(batch)[0]
  }


def run(config, workdir: str, t2i_model: str = "") -> dict:
  from data_pipelines import demo, loaders

  summary: dict = {"workdir": os.path.abspath(workdir)}
  data_dir = os.path.join(workdir, "data")
  t0 = time.time()
  manifest = demo.build(
    data_dir,
    num=config.demo.num,
    seed=config.demo.seed,
    image_size=config.demo.image_size,
    shard_size=config.demo.shard_size,
  )
  summary["dataset"] = {
    "path": data_dir,
    "records": manifest.num_records,
    "counters": manifest.counters,
    "fields": sorted(manifest.fields),
    "seconds": round(time.time() - t0, 1),
  }
  logging.info("demo dataset: %d records in %s", manifest.num_records, data_dir)

  with config.unlocked():
    config.data.path = data_dir
  mesh = _mesh(config.mesh)
  it = loaders.make_train_iterator(config, mesh)
  shapes = None
  for _ in range(config.num_batches):
    batch = next(it)
    shapes = _describe(batch)
  summary["train_batch"] = {
    "mesh": dict(mesh.shape),
    "shapes": shapes,
    "sharding": str(batch["bkg_image"].sharding.spec),
  }
  ev = next(iter(loaders.make_eval_triplets(config, "sfsr", seed=0, mesh=mesh)))
  summary["sfsr_eval_sources"] = {k: np.asarray(v).tolist() for k, v in ev["src"].items()}

  model = t2i_model or config.t2i.model
  if model:
    import jax

    from facediff.convert.pipeline import load_models
    from facediff.pipelines.text_to_image import TextToImage, save_png

    pipe = TextToImage(load_models(model))
    t = config.t2i
    images = pipe(
      list(t.prompts),
      jax.random.key(t.seed),
      height=t.height,
      width=t.width,
      num_steps=t.steps,
      guidance_scale=t.guidance,
    )
    summary["backgrounds"] = save_png(images, os.path.join(workdir, "backgrounds"))
  else:
    summary["backgrounds"] = "skipped: pass --t2i_model with SD-1.x weights to generate backgrounds"

  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py"),
  "Experiment config file (``path.py`` or ``path.py:variant``); fields are overridable "
  "with --config.<field>=<value>.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (dataset, summary).", required=True)
_T2I_MODEL = flags.DEFINE_string(
  "t2i_model", "", "SD-1.x weights (diffusers folder or .ckpt/.safetensors) for backgrounds."
)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  summary = run(_CONFIG.value, _WORKDIR.value, _T2I_MODEL.value)
  for key, value in summary.items():
    print(f"{key}: {json.dumps(value)}")


if __name__ == "__main__":
  app.run(main)
