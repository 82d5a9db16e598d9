"""The README's main job on the locally built demo dataset.

    python -m launch.main --workdir DIR [--config configs/demo.py]

Fields: ``demo`` (how the dataset is built), ``data`` (what the grain loader reads:
see data_pipelines/loaders.py), ``mesh`` (axis sizes, -1 fills in), ``t2i`` (the
text-to-image stage, run only when ``t2i.model`` names SD-1.x weights).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.demo = dict(num=240, seed=0, image_size=256, shard_size=64)
  c.data = dict(
    path="",  # set to <workdir>/data by launch.main
    global_batch_size=8,
    image_size=128,
    id_fields=["id_dlib"],  # the identity compound: the real offline recogniser
    id_dims=[128],
    exp_field="exp_fer",
    exp_dim=7,
    mask_field="mask",
    seed=0,
    num_workers=0,
  )
  c.mesh = dict(data=-1, fsdp=1)
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
