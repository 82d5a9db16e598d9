"""The README's main job end to end on a small demo: real photos -> real offline
encoders -> shards -> DiffSFSR training with the identity/expression terms -> held-out
L_DM before/after -> swap/reenact/SFSR grids scored by the in-graph dlib recogniser."""

import json
import os

import numpy as np
from PIL import Image

from configs import diffsfsr as diffsfsr_config
from launch import main as main_job


def test_main_job_trains_samples_and_summarises(tmp_path):
  cfg = diffsfsr_config.get_config("tiny")
  cfg.demo.num = 24
  cfg.demo.shard_size = 8
  cfg.data.global_batch_size = 8  # one example per virtual device (data=8 mesh)
  cfg.evaluate.heldout_num = 8
  cfg.evaluate.ldm_timesteps = [100, 500, 900]
  cfg.evaluate.sample_steps = 4
  cfg.train.num_steps = 10
  cfg.train.checkpoint_every = 10
  cfg.train.sample_every = 0
  cfg.optim.warmup_steps = 0
  cfg.optim.lr = 1e-3
  cfg.ema.decay = 0.0  # evaluate the trained params themselves after 10 steps
  summary = main_job.run(cfg, str(tmp_path))

  assert summary["train"]["step"] == 10
  ldm = summary["heldout_ldm"]
  assert ldm["after"]["records"] == ldm["before"]["records"] == 8
  assert ldm["after_step"] == 10
  # Training lowers the noise-prediction error on records it never saw, at fixed (t, noise).
  assert ldm["after"]["mean"] < ldm["before"]["mean"], ldm
  for task in ("swap", "reenact", "sfsr"):
    r = summary["results"][task]
    grid = np.asarray(Image.open(r["grid"]))
    s = cfg.data.image_size
    assert grid.shape == (4 * (s + 2) - 2, 4 * (s + 2) - 2, 3)
    for key in (
      "id_cos_result_to_id_source",
      "id_cos_background_to_id_source",
      "id_cos_noise_to_id_source",
    ):
      assert -1.0 <= r[key] <= 1.0, (task, key)
    # Both images are in [0, 1] after the map from [-1, 1]: the MSE is at most 1.
    assert r["psnr_result_to_background_db"] >= 0.0, r
  # Reenactment keeps the background's identity (its background is its identity source,
  # so the in-graph embedding of the 64 px image is close to the stored one), a swap
  # brings another record's.
  res = summary["results"]
  assert res["reenact"]["id_cos_background_to_id_source"] > 0.95
  assert (
    res["reenact"]["id_cos_background_to_id_source"] > res["swap"]["id_cos_background_to_id_source"]
  )
  on_disk = json.load(open(tmp_path / "summary.json"))
  assert on_disk["heldout_ldm"]["fell"] == bool(ldm["after"]["mean"] < ldm["before"]["mean"])
  md = open(tmp_path / "summary.md").read()
  assert "| mean |" in md and "| noise |" in md
  assert os.path.exists(tmp_path / "checkpoints" / "10")
