"""TGDM training configs (TGDM Sec. 4.3-4.4, 5.1).

    python -m launch.train --config configs/tgdm.py:tiny --workdir DIR

Variants:
  vox256: talking-face reenactment on VoxCeleb1 at 256 px (source and target from the
    same video): batch 8, lr 2e-4, 200k steps, T = 1000 linear betas (TGDM 5.1).
  mead256: the same on MEAD (emotional talking faces).
  swap: face swapping on CelebAMask-HQ at 256 px (TGDM 4.4): self-reconstruction from
    the "Small"-masked face, CurricularFace identity (512), rho and I_3d.
  tiny: CPU demo of reenact at 64 px on the synthetic 3DMM dataset
    (data_pipelines/synthetic_3dmm.py, built into <workdir>/data when data.path is
    empty), small widths, random LPIPS trunk with the real heads.
  tiny_swap: the same for swap mode (identity embedding = the 80 identity coefficients).

The 256 variants need the exported datasets (``data.path``, with the ``d3dfr`` encoder's
``coeffs`` and, for reenact, a video id carried as ``pair_field``), the BFM
(``model.bfm_path``) and a torchvision VGG16 state dict for LPIPS
(``model.lpips_vgg16``); none is reachable offline.
"""

import ml_collections

from configs import common

VARIANTS = ("vox256", "mead256", "swap", "tiny", "tiny_swap")


def _model(mode: str, **tgdm_fields) -> dict:
  return dict(
    name="tgdm",
    mode=mode,
    tgdm=dict(tgdm_fields),  # TGDMConfig fields (image_size / id_dim come from data)
    bfm_path="",  # BFM_model_front.mat; "" = <data.path>/BFM_model_front.mat (synthetic)
    lpips_vgg16="",  # torchvision vgg16 state dict; "" = random trunk (lpips_seed)
    lpips_seed=0,
    render_window=8,
    schedule="linear",
    num_train_timesteps=1000,
    lambda_simple=10.0,
    lambda_rec=1.0,
    lambda_p=1.0,
    gate_threshold=0.05,
    sample_method="ddpm",
    sample_steps=None,  # None = all T DDPM steps; "ddim" with fewer for previews
    # The trainer's periodic evaluation (train.eval_every > 0): PSNR / SSIM / LPIPS of
    # reenactments sampled with this sampler against the targets of a fixed batch.
    eval_sample_method="ddim",
    eval_sample_steps=50,
  )


def _data(mode: str, **overrides) -> ml_collections.ConfigDict:
  fields = dict(
    global_batch_size=8,
    image_size=256,
    id_fields=["id_curricularface"],
    id_dims=[512],
    exp_field="exp_fer",
    exp_dim=7,
    mask_field="mask",
    coeff_field="coeffs",
    coeff_dim=257,
    coeff_layout="d3dfr",
    pair_field="video_id" if mode == "reenact" else "",
  )
  fields.update(overrides)
  return common.data(**fields)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"configs/tgdm.py: unknown variant {variant!r}; one of {VARIANTS}")
  mode = "swap" if variant in ("swap", "tiny_swap") else "reenact"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.mesh = common.mesh()
  c.logging = common.logging()
  if variant.startswith("tiny"):
    # Built into <workdir>/data by launch.train when data.path is empty.
    c.synthetic_3dmm = dict(
      num_groups=8, per_group=4, image_size=64, num_vertices=800, bfm_seed=0, seed=0
    )
    c.data = _data(
      mode,
      global_batch_size=4,
      image_size=64,
      id_fields=["id_3dmm"],
      id_dims=[80],
      exp_field="exp_3dmm",
      exp_dim=64,
      pair_field="group" if mode == "reenact" else "",
    )
    c.model = _model(
      mode,
      block_channels=(16, 32, 32, 64, 64),
      layers_per_block=1,
      cond_dim=64,
      norm_num_groups=8,
    )
    c.model.sample_method = "ddim"
    c.model.sample_steps = 20
    c.model.eval_sample_steps = 10
    num_steps, ckpt_every, sample_every = 300, 100, 100
  else:
    c.data = _data(mode, pair_field="" if mode == "swap" else "video_id")
    c.model = _model(mode)
    num_steps, ckpt_every, sample_every = 200_000, 5_000, 5_000
  c.optim = dict(
    lr=2e-4,
    end_lr=2e-4,
    warmup_steps=0 if not variant.startswith("tiny") else 20,
    constant_steps=None,
    decay_steps=0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    max_grad_norm=1.0,
  )
  c.ema = dict(decay=0.9999 if not variant.startswith("tiny") else 0.999)
  c.train = dict(
    num_steps=num_steps,
    seed=0,
    grad_accum_steps=1,
    log_every=10,
    checkpoint_every=ckpt_every,
    keep_checkpoints=3,
    keep_best_metric="",  # an eval metric (psnr, ssim, lpips, mse) with eval_every > 0
    keep_best_mode="min",
    sample_every=sample_every,
    eval_every=0,
    profile_steps=[],
    async_checkpointing=True,
  )
  return c
