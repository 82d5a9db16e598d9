"""The README's main job end to end on a small demo: real photos -> real offline
encoders -> shards -> grain batches on an 8-device mesh -> SFSR eval triplets."""

import json
import os

import numpy as np

from configs import demo as demo_config
from launch import main as main_job


def test_main_job_builds_reads_and_summarises(tmp_path):
  cfg = demo_config.get_config()
  cfg.demo.num = 24
  cfg.demo.shard_size = 8
  cfg.num_batches = 2
  summary = main_job.run(cfg, str(tmp_path))
  ds = summary["dataset"]
  assert ds["counters"]["inputs"] == 24
  assert ds["records"] == ds["counters"]["written"] > 0
  assert {"id_dlib", "exp_fer", "mask", "image"} <= set(ds["fields"])
  tb = summary["train_batch"]
  assert tb["mesh"] == {"data": 8, "fsdp": 1}
  assert tb["shapes"]["bkg_image"] == [8, 128, 128, 3]
  assert tb["shapes"]["id/id_dlib"] == [8, 128]
  src = summary["sfsr_eval_sources"]
  bkg, idx, exp = (np.array(src[k]) for k in ("bkg", "id", "exp"))
  # SFSR triplets draw background, identity and expression from three different images.
  assert np.all(bkg != idx) and np.all(bkg != exp) and np.all(idx != exp)
  with open(os.path.join(tmp_path, "summary.json")) as f:
    assert json.load(f)["dataset"]["records"] == ds["records"]
