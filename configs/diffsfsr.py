"""DiffSFSR training configs.

    python -m launch.train --config configs/diffsfsr.py:<variant> --workdir DIR

Variants (``base`` or ``base+ablation``; a bare ablation means ``sd14_512+ablation``):
  tiny: CPU demo: a small UNet directly on 64 px pixels of the locally built demo
    dataset; identity compound = the real offline dlib recogniser, expression = the
    real fer CNN, both in the loss through improved midpoint sampling. Minutes on 2
    cores.
  sd14_512: the paper (Sec. 4): SD-1.4 (``--config.model.init_from=<diffusers folder
    or CompVis .ckpt/.safetensors>``), 512 px, SD's VAE latents, global batch 64, AdamW
    1e-5 for 100k steps then linear decay over 100k, compound ArcFace + FaceNet + dlib,
    DLN expression (user-supplied weights: ``--config.model.encoder_weights.<field>``),
    PNDM 50 steps for preview samples. Data: a dataset exported with the arcface,
    facenet, dlib and dln encoders (``python -m data_pipelines.export``).
Ablations (the paper's Table 3 / Fig. 10 and Table 4, DiffSwap's setting):
  midpoint, one_step: the z0* estimator of the identity/expression terms.
  single_id: one identity encoder (the compound's first field).
  no_bkg: the masked background is not given in training.
"""

import ml_collections

from configs import common

BASES = ("tiny", "sd14_512")
ABLATIONS = ("midpoint", "one_step", "single_id", "no_bkg")


def parse_variant(arg: str) -> tuple[str, tuple[str, ...]]:
  parts = [p for p in (arg or "tiny").split("+") if p]
  if parts and parts[0] not in BASES:
    parts = ["sd14_512", *parts]
  base, ablations = parts[0], tuple(parts[1:])
  for a in ablations:
    if a not in ABLATIONS:
      raise ValueError(
        f"configs/diffsfsr.py: unknown variant part {a!r} in {arg!r}; bases {BASES}, "
        f"ablations {ABLATIONS}"
      )
  return base, ablations


def _tiny() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Built into <workdir>/data by launch.train when data.path is empty.
  c.demo = dict(num=240, seed=0, image_size=256, shard_size=64)
  c.data = common.data(
    global_batch_size=4,
    image_size=64,
    id_fields=["id_dlib"],
    id_dims=[128],
    exp_field="exp_fer",
    exp_dim=7,
    crop_fields=["dlib150", "fer64"],
  )
  c.model = dict(
    name="diffsfsr",
    latent_space="pixels",
    init_from="",
    # Attention only at 1/4 resolution (16x16 at 64 px): self-attention over 64x64
    # pixels would cost 4096^2 scores per head.
    unet=dict(
      block_out_channels=(32, 64, 64),
      layers_per_block=1,
      attention_head_dim=4,
      cross_attention_dim=64,
      down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
      norm_num_groups=8,
    ),
    schedule="linear",
    estimator="improved_midpoint",
    lambda_id=0.003,
    lambda_exp=0.01,
    encoder_weights=dict(id_dlib="", exp_fer=""),
    use_background=True,
    id_dropout=0.0,
    exp_dropout=0.0,
    sample_method="ddim",
    sample_steps=20,
    eval_sample_method="ddim",
    eval_sample_steps=10,
    eval_timesteps=[100, 500, 900],
    dtype="float32",
    remat=False,
  )
  c.optim = common.optim(lr=2e-4, warmup_steps=20)
  c.ema = dict(decay=0.99)  # a few hundred steps: a longer average would keep the init
  c.train = common.train(num_steps=200, checkpoint_every=100, sample_every=100)
  return c


def _sd14_512() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.demo = dict(num=240, seed=0, image_size=512, shard_size=64)
  ids = ["id_arcface", "id_facenet", "id_dlib"]
  c.data = common.data(
    global_batch_size=64,
    image_size=512,
    id_fields=ids,
    id_dims=[512, 512, 128],
    exp_field="exp_dln",
    exp_dim=16,
    crop_fields=["arcface112", "facenet160", "dlib150"],
    num_workers=8,
  )
  c.model = dict(
    name="diffsfsr",
    latent_space="sd_vae",
    init_from="",  # required: SD-1.4 diffusers folder or CompVis file
    unet=dict(),  # from init_from
    schedule="scaled_linear",
    estimator="improved_midpoint",
    lambda_id=0.003,
    lambda_exp=0.01,
    encoder_weights=dict(id_arcface="", id_facenet="", id_dlib="", exp_dln=""),
    use_background=True,
    id_dropout=0.0,
    exp_dropout=0.0,
    sample_method="pndm",
    sample_steps=50,
    eval_sample_method="ddim",
    eval_sample_steps=25,
    eval_timesteps=[100, 500, 900],
    dtype="bfloat16",  # UNet compute dtype; params, VAE and face encoders stay float32
    remat=True,
  )
  c.optim = common.optim(lr=1e-5, warmup_steps=0, constant_steps=100_000, decay_steps=100_000)
  c.ema = dict(decay=0.0)
  c.train = common.train(
    num_steps=200_000, checkpoint_every=2_000, sample_every=2_000, log_every=50
  )
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  base, ablations = parse_variant(arg)
  c = _tiny() if base == "tiny" else _sd14_512()
  c.variant = "+".join((base, *ablations))
  c.mesh = common.mesh()
  c.logging = common.logging()
  # What launch.main measures after training, on a held-out demo set (another seed).
  c.evaluate = dict(
    heldout_num=16,
    heldout_seed=1,
    batch_size=8,
    ldm_timesteps=[50, 250, 500, 750, 950],
    num_examples=4,
    sample_method="pndm",
    sample_steps=50,
    seed=0,
  )
  # Backgrounds from text prompts (launch.main --t2i_model <SD-1.x weights>).
  c.t2i = dict(
    prompts=["a portrait photo of a smiling woman in a garden"],
    steps=50,
    guidance=7.5,
    height=512,
    width=512,
    seed=0,
  )
  for a in ablations:
    if a in ("midpoint", "one_step"):
      c.model.estimator = a
    elif a == "single_id":
      c.data.id_fields = c.data.id_fields[:1]
      c.data.id_dims = c.data.id_dims[:1]
    elif a == "no_bkg":
      c.model.use_background = False
  return c
