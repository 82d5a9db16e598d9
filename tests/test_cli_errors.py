"""Every command line answers a user's mistake with ONE stderr line naming the input and
a non-zero exit status, never a traceback, and writes nothing (``facediff.cli``).

Each case is a real ``python -m <module>`` subprocess; the cases of one test run
side by side (most stop at flag parsing, well before jax is imported)."""

import concurrent.futures
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Logging that may precede the answer: absl's ("I1122 08:00:00.000 ..."), Python's
# logging.basicConfig format ("2026-01-01 08:00:00,000 INFO ..."), XLA's start-up notice.
_LOG_LINE = re.compile(
  r"^([IWEF]\d{4} \d\d:\d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ (DEBUG|INFO|WARNING)"
  r"|WARNING: All log messages before absl)"
)


def _run(module: str, args: list[str]) -> tuple[int, list[str]]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  p = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not _LOG_LINE.match(ln)]
  return p.returncode, lines


def _check_all(cases: list[tuple[str, list[str], list[str]]], untouched: list[str] = ()):
  """Runs every (module, args, substrings) case; each must exit non-zero with one
  stderr line holding every substring and no traceback; ``untouched`` paths must
  still not exist afterwards."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    results = list(pool.map(lambda c: _run(c[0], c[1]), cases))
  failures = []
  for (module, args, wants), (rc, lines) in zip(cases, results, strict=True):
    text = "\n".join(lines)
    ok = rc != 0 and len(lines) == 1 and "Traceback" not in text
    ok = ok and all(w in lines[0] for w in wants)
    if not ok:
      failures.append(f"{module} {' '.join(args)} -> rc {rc}:\n{text[-2000:]}")
  assert not failures, "\n\n".join(failures)
  for path in untouched:
    assert not os.path.exists(path), f"{path} was written"


@pytest.fixture
def places(tmp_path):
  """A file where a folder is expected, a folder that is not a dataset, a folder that
  is not an SD model, a junk checkpoint, and paths that must stay unwritten."""
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  (tmp_path / "not_a_dataset").mkdir()
  (tmp_path / "not_sd" / "vae").mkdir(parents=True)
  (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
  return {
    "file": str(a_file),
    "not_dataset": str(tmp_path / "not_a_dataset"),
    "not_sd": str(tmp_path / "not_sd"),
    "junk": str(tmp_path / "junk.ckpt"),
    "missing": str(tmp_path / "missing"),
    "new": str(tmp_path / "new"),
  }


def test_launch_train_answers_each_mistake_with_one_line(places):
  cfg = os.path.join("configs", "diffsfsr.py")
  new = places["new"]
  base = ["--config", f"{cfg}:tiny", f"--workdir={new}"]
  _check_all(
    [
      ("launch.train", ["--config", "configs/nope.py", f"--workdir={new}"], ["configs/nope.py"]),
      ("launch.train", ["--config", f"{cfg}:bogus", f"--workdir={new}"], ["'bogus'", "variant"]),
      ("launch.train", ["--config", "configs/tgdm.py:vox512", f"--workdir={new}"], ["vox512"]),
      ("launch.train", [*base, "--config.train.nope=1"], ["--config.train.nope=1", "'nope'"]),
      ("launch.train", [*base, "--config.train.num_steps=abc"], ["num_steps", "abc"]),
      ("launch.train", [*base, "--nope"], ["nope"]),
      ("launch.train", [*base, "extra"], ["unexpected arguments: extra"]),
      ("launch.train", ["--config", f"{cfg}:tiny"], ["--workdir"]),
      ("launch.train", ["--config", f"{cfg}:tiny", f"--workdir={places['file']}"], ["a_file"]),
      ("launch.train", [*base, f"--config.data.path={places['missing']}"], ["missing"]),
      ("launch.train", [*base, f"--config.data.path={places['not_dataset']}"], ["not_a_dataset"]),
      ("launch.train", [*base, "--config.model.estimator=nope"], ["estimator", "'nope'"]),
      (
        "launch.train",
        ["--config", "configs/tgdm.py:tiny", f"--workdir={new}", "--config.model.mode=x"],
        ["config.model.mode", "'x'"],
      ),
    ],
    untouched=[new],
  )


def test_launch_main_tgdm_demo_sample_evaluate_answer_with_one_line(places):
  new = places["new"]
  _check_all(
    [
      ("launch.main", [f"--workdir={places['file']}"], ["--workdir", "a_file"]),
      ("launch.main", [f"--workdir={new}", f"--t2i_model={places['not_sd']}"], ["--t2i_model"]),
      ("launch.main", [f"--workdir={new}", "--config=configs/diffsfsr.py:x"], ["'x'"]),
      (
        "launch.main",
        [f"--workdir={new}", f"--config.data.path={places['not_dataset']}"],
        ["not_a_dataset"],
      ),
      ("launch.tgdm_demo", [f"--workdir={places['file']}"], ["--workdir", "a_file"]),
      ("launch.tgdm_demo", [f"--workdir={new}", "--config=configs/tgdm.py:vox256"], ["vox256"]),
      ("launch.tgdm_demo", [f"--workdir={new}", "--heldout_groups=0"], ["--heldout_groups"]),
      ("launch.tgdm_demo", [f"--workdir={new}", "--swap_config.model.mode=x"], ["mode", "'x'"]),
      ("launch.tgdm_demo", [f"--workdir={new}", "--audio_intensity=5"], ["--audio_intensity"]),
      ("launch.sample", [f"--workdir={new}", f"--out={new}", "--method=nope"], ["--method"]),
      ("launch.sample", [], ["--workdir"]),
      ("launch.evaluate", [f"--workdir={new}", "--num=x"], ["--num"]),
    ],
    untouched=[new],
  )


def test_text_to_image_answers_a_folder_that_is_not_sd_with_one_line(places):
  new = places["new"]
  t2i = "facediff.pipelines.text_to_image"
  common = ["--prompt", "a face", "--out", new]
  _check_all(
    [
      (t2i, ["--model", places["not_sd"], *common], ["--model", "not_sd", "unet"]),
      (t2i, ["--model", places["missing"], *common], ["--model", "missing"]),
      (t2i, ["--model", places["junk"], *common], ["--model", "junk.ckpt"]),
      (t2i, ["--model", places["not_sd"], "--prompt", "a", "--out", places["file"]], ["--out"]),
      (t2i, ["--prompt", "a face"], ["--model", "--out"]),
    ],
    untouched=[new],
  )


def test_data_pipeline_clis_answer_with_one_line_and_write_nothing(places, tmp_path):
  from PIL import Image

  photos = tmp_path / "photos" / "p"
  photos.mkdir(parents=True)
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photos / "a.png")
  photos = str(photos.parent)
  new = places["new"]
  export = "data_pipelines.export"
  _check_all(
    [
      (export, ["--input", places["missing"], "--output", new], ["--input", "missing"]),
      (export, ["--input", photos, "--output", places["file"]], ["--output", "a_file"]),
      (export, ["--input", photos, "--output", new, "--encoders", "dlib,nope"], ["'nope'"]),
      (export, ["--input", photos, "--output", new, "--image-size", "0"], ["--image-size 0"]),
      (export, ["--input", "tfds:no_such_set", "--output", new], ["no_such_set"]),
      (
        export,
        ["--input", photos, "--output", new, "--encoders", "facenet"]
        + ["--weights", f"facenet={places['junk']}"],
        ["facenet", "junk.ckpt"],
      ),
      ("data_pipelines.demo", ["--out", places["file"]], ["--out", "a_file"]),
      ("data_pipelines.demo", ["--out", new, "--num", "0"], ["--num 0"]),
      ("data_pipelines.synthetic_3dmm", ["--output", places["file"]], ["a_file"]),
      ("data_pipelines.synthetic_3dmm", ["--output", new, "--groups", "0"], ["num_groups=0"]),
    ],
    untouched=[new],
  )
