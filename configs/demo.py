"""The README's main job on the locally built demo dataset.

    python -m launch.main --workdir DIR [--config configs/demo.py] [--config.demo.num=48]

Fields: ``demo`` (how the dataset is built), ``data`` (what the grain loader reads:
see data_pipelines/loaders.py), ``mesh`` (axis sizes, -1 fills in), ``t2i`` (the
text-to-image stage, run only when ``t2i.model`` names SD-1.x weights).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.demo = dict(num=240, seed=0, image_size=256, shard_size=64)
  # data.path is set to <workdir>/data by launch.main; the identity compound is the
  # real offline recogniser (dlib), the expression the real fer CNN.
  c.data = common.data()
  c.mesh = common.mesh()
  c.logging = common.logging()
  c.num_batches = 3
  c.t2i = dict(
    model="",
    prompts=["a portrait photo of a smiling woman in a garden"],
    steps=50,
    guidance=7.5,
    height=512,
    width=512,
    seed=0,
  )
  return c
