"""EmoA2E training configs (TGDM Sec. 4.2 and 5.1).

    python -m launch.train --config configs/emoa2e.py:tiny --workdir DIR

Variants:
  tiny: CPU demo on the synthetic set of data_pipelines/synthetic_audio.py (real
    alsa-utils speech when installed, the synthetic morphable model of
    configs/tgdm.py:tiny's 3DMM set, MEAD labels through the real MiniLM text
    encoder); a 2-layer, 32-wide EmoA2E, 8-frame sequences, 1000 steps (the TGDM
    demo's whole EmoA2E stage, training and scoring, took 41 s on 2 shared CPU
    cores). The last 2 utterances are held out of training.
  paper: TGDM's training settings: K = 32 consecutive frames per sequence, batch 128,
    Adam with lr 2e-4 for 200k iterations, lambda_rec = 100, lambda_lm = 0.1. The
    transformer's size is not in the paper (ours: 4 layers, width 256). It needs a
    real coefficient/audio dataset, which data_pipelines does not have yet: until then
    it trains on the synthetic set.
  tiny_free, paper_free: the emotion-free variant (no emotion / intensity tokens), as
    TGDM trains on VoxCeleb1.
"""

import ml_collections

from configs import common

VARIANTS = ("tiny", "tiny_free", "paper", "paper_free")


def _model(variant: str) -> dict:
  tiny = variant.startswith("tiny")
  return dict(
    name="emoa2e",
    hidden=32 if tiny else 256,
    num_layers=2 if tiny else 4,
    num_heads=4 if tiny else 8,
    mlp_dim=64 if tiny else 1024,
    token_mlp_dim=None,
    emotion=not variant.endswith("_free"),
    text_dim=384,  # MiniLM (CLIP ViT-L/14 in the paper: 768)
    dropout=0.0 if tiny else 0.1,
    norm_first=False,
    dtype="float32",
    lambda_rec=100.0,
    lambda_lm=0.1,
    # Landmarks are compared in pixels of D3DFR's 224 x 224 camera.
    landmark_image_size=224,
    # "" = the synthetic morphable model (bfm_vertices, bfm_seed); else a
    # BFM_model_front.mat path. 800 / 0: the model of configs/tgdm.py:tiny's synthetic
    # 3DMM set, so EmoA2E's expressions drive the tiny TGDM's faces.
    bfm_path="",
    bfm_vertices=800,
    bfm_seed=0,
  )


def _audio(variant: str) -> dict:
  tiny = variant.startswith("tiny")
  # facediff.audio.MFCCConfig fields.
  return dict(
    sample_rate=16000,
    fps=25.0,
    win_length=400,
    hop_length=160,
    n_fft=512,
    n_mels=40,
    n_mfcc=13,
    fmin=0.0,
    fmax=None,
    preemphasis=0.97,
    top_db=80.0,
    clip_frames=8 if tiny else 32,
  )


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"configs/emoa2e.py: unknown variant {variant!r}; one of {VARIANTS}")
  tiny = variant.startswith("tiny")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.data = common.data(
    source="synthetic_audio",  # data_pipelines/synthetic_audio.py
    global_batch_size=8 if tiny else 128,
    num_frames=8 if tiny else 32,  # TGDM: K = 32 consecutive clips
    # 1024 sequences: with fewer, the per-sequence identity lets the tiny model
    # memorise each sequence's emotion offset instead of learning eta and z_emo.
    num_records=1024 if tiny else 4096,
    audio="auto",  # auto | speech | synthetic
    speech_paths=[],
    text_encoder="minilm",  # minilm | random
    # The last heldout_utterances utterances (sorted file names) are kept out of
    # training for evaluation (split="heldout"); world_seed fixes the set's hidden
    # audio -> expression map, seed draws the sequences.
    split="train",  # train | heldout | all
    heldout_utterances=2,
    world_seed=0,
  )
  c.audio = _audio(variant)
  c.mesh = common.mesh()
  c.logging = common.logging()
  c.model = _model(variant)
  # TGDM: Adam, lr 2e-4, no schedule given.
  c.optim = dict(
    lr=2e-4 if not tiny else 1e-3,
    end_lr=0.0,
    warmup_steps=0,
    constant_steps=None,
    decay_steps=0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    max_grad_norm=0.0,
  )
  c.ema = dict(decay=0.0)
  c.train = dict(
    num_steps=1000 if tiny else 200_000,
    seed=0,
    grad_accum_steps=1,
    log_every=50 if tiny else 100,
    checkpoint_every=500 if tiny else 5000,
    keep_checkpoints=3,
    keep_best_metric="",
    keep_best_mode="min",
    sample_every=0,
    eval_every=0,
    profile_steps=[],
    async_checkpointing=True,
  )
  return c
