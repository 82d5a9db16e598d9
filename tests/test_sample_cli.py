"""launch.sample on a tiny trained DiffSFSR workdir: SFSR / swap / reenact from real
photos through the exporter's alignment, expression words through the index,
expression travel, CSV batches with one compiled sampler, and bad inputs answered
with one line and nothing written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib")

from _photos import IMAGES, astronaut_face  # noqa: E402
from _photos import cut as _cut  # noqa: E402

from configs import diffsfsr as diffsfsr_config  # noqa: E402
from launch import runner  # noqa: E402
from launch import sample as sample_cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 1-step tiny DiffSFSR checkpoint (L_DM only: the encoders' gradients would only
  add compile time) on an 8-photo demo set."""
  work = tmp_path_factory.mktemp("trained")
  c = diffsfsr_config.get_config("tiny")
  c.demo.num = 8
  c.demo.shard_size = 8
  c.data.global_batch_size = 8
  c.model.lambda_id = c.model.lambda_exp = 0.0
  c.train.num_steps = 1
  c.train.sample_every = 0
  c.train.checkpoint_every = 1
  c.train.async_checkpointing = False
  c.ema.decay = 0.0
  runner.run(c, str(work))
  return str(work)


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory):
  from data_pipelines import faces

  d = tmp_path_factory.mktemp("user_photos")
  Image.fromarray(astronaut_face()).save(d / "astronaut.png")
  t1 = np.array(Image.open(os.path.join(IMAGES, "t1.jpg")).convert("RGB"))
  for i, det in enumerate(faces.FaceDetector()(t1)[:2]):
    Image.fromarray(_cut(t1, det, 1.0)).save(d / f"person{i}.png")
  Image.fromarray(t1).save(d / "group.png")  # several faces
  Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(d / "blank.png")  # no face
  (d / "broken.png").write_bytes(b"not an image")
  return d


def _job(**kw):
  job = dict(
    task="sfsr",
    steps=2,
    method="ddim",
    seed=0,
    id_scale=1.0,
    exp_scale=1.0,
    index=None,
    frames=3,
    travel=None,
  )
  job.update(kw)
  return job


def _a_word(trained):
  from data_pipelines import expression_index
  from facediff import expressions

  index = expression_index.index_from_fer(os.path.join(trained, "data"))
  return expressions.vocabulary().word(index.labels()[0])


def test_tasks_travel_and_csv_write_outputs_and_record(trained, faces_dir, tmp_path):
  word = _a_word(trained)
  a, p0, p1 = (str(faces_dir / n) for n in ("astronaut.png", "person0.png", "person1.png"))
  jobs = [
    _job(task="sfsr", background=a, id=p0, expression_image=p1, name="sfsr"),
    _job(task="swap", background=a, id=p0, name="swap"),
    _job(task="reenact", background=a, expression=word, name="reenact"),
    _job(task="sfsr", background=p1, id=a, travel=f"{word},{word}", name="travel"),
  ]
  out = tmp_path / "out"
  record = sample_cli.run_jobs(jobs, trained, str(out), progress=False)
  assert record["checkpoint_step"] == 1
  for name in ("sfsr", "swap", "reenact"):
    img = np.asarray(Image.open(out / f"{name}.png"))
    assert img.shape == (64, 64, 3) and img.std() > 0
  assert len(list((out / "travel").glob("frame_*.png"))) == 3
  assert Image.open(out / "travel.gif").n_frames >= 1
  on_disk = json.load(open(out / "record.json"))
  assert [j["job"]["task"] for j in on_disk["jobs"]] == ["sfsr", "swap", "reenact", "sfsr"]


def test_same_inputs_same_seed_same_image(trained, faces_dir, tmp_path):
  a, p0 = str(faces_dir / "astronaut.png"), str(faces_dir / "person0.png")
  jobs = [_job(task="swap", background=a, id=p0, name=n) for n in ("x", "y")]
  jobs.append(_job(task="swap", background=a, id=p0, name="z", seed=1))
  record = sample_cli.run_jobs(jobs, trained, str(tmp_path), progress=False)
  assert [j["outputs"] for j in record["jobs"]] == [["x.png"], ["y.png"], ["z.png"]]
  x, y, z = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "xyz")
  np.testing.assert_array_equal(x, y)  # jobs share one compiled sampler; same seed, same image
  assert np.abs(x.astype(int) - z.astype(int)).max() > 0


@pytest.mark.parametrize(
  "photo, message",
  [
    ("blank.png", "no face found"),
    ("group.png", "faces found"),
    ("broken.png", "not a readable image"),
    ("missing.png", "no such file"),
  ],
)
def test_bad_photos_are_named_and_nothing_is_written(trained, faces_dir, tmp_path, photo, message):
  out = tmp_path / "out"
  job = _job(task="swap", background=str(faces_dir / "astronaut.png"), id=str(faces_dir / photo))
  with pytest.raises(sample_cli.SampleError, match=message) as e:
    sample_cli.run_jobs([job], trained, str(out), progress=False)
  assert photo in str(e.value)
  assert not out.exists()


def test_cli_answers_a_bad_word_with_one_line(trained, faces_dir, tmp_path):
  out = tmp_path / "out"
  cmd = [
    sys.executable,
    "-m",
    "launch.sample",
    f"--workdir={trained}",
    f"--out={out}",
    "--task=reenact",
    f"--background={faces_dir / 'astronaut.png'}",
    "--expression=flabbergastedness",
  ]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 1
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("launch.sample: --expression 'flabbergastedness': not in the 135-word")
  assert "Traceback" not in r.stderr
  assert not out.exists()


def test_guidance_needs_condition_dropout(trained, faces_dir, tmp_path):
  job = _job(task="swap", background=str(faces_dir / "astronaut.png"), id_scale=2.0)
  with pytest.raises(sample_cli.SampleError, match="id_scale=2.0.*condition dropout"):
    sample_cli.run_jobs([job], trained, str(tmp_path / "o"), progress=False)


# torchvision's vgg16().features: conv3x3 + ReLU, "M" = 2x2 max-pool.
_VGG16_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _random_vgg16(torch, path):
  """A torchvision-layout VGG16 trunk state dict (``features.<i>.weight/bias``), He-normal."""
  g = torch.Generator().manual_seed(0)
  sd, c, idx = {}, 3, 0
  for v in _VGG16_D:
    if v == "M":
      idx += 1
      continue
    sd[f"features.{idx}.weight"] = torch.randn(v, c, 3, 3, generator=g) * (2.0 / (9 * c)) ** 0.5
    sd[f"features.{idx}.bias"] = 0.01 * torch.randn(v, generator=g)
    c, idx = v, idx + 2  # conv, ReLU
  torch.save(sd, path)


def _torch_pool3(torch, net, images):
  """pool_3 of the torch reference on NHWC images in [-1, 1] (pytorch-fid takes [0, 1])."""
  x = torch.from_numpy((np.clip(images, -1, 1) + 1) / 2).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    return net(x)[0].numpy()


def test_evaluate_scores_every_task(trained, tmp_path):
  """All tasks with a tiny random FID Inception and VGG16 saved with torch.save: FID equals
  frechet_distance of features from the torch reference network on the saved samples and
  the evaluation set's images, LPIPS equals metrics.lpips on the (result, background)
  pairs, LMD the landmark distance written out."""
  torch = pytest.importorskip("torch")
  import _torch_fid_inception as fid_ref

  from data_pipelines import loaders, records
  from facediff import metrics
  from facediff.convert import lpips as lpips_convert
  from launch import evaluation as evaluate

  calibration = torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))
  net = fid_ref.randomise(fid_ref.FIDInception(16), 0, calibration)
  torch.save(net.state_dict(), tmp_path / "inception.pth")
  _random_vgg16(torch, tmp_path / "vgg16.pth")
  _, step, data, results = evaluate.evaluate(
    trained,
    None,
    evaluate.TASKS,
    num=8,
    batch=8,
    steps=2,
    method="ddim",
    seed=0,
    inception=str(tmp_path / "inception.pth"),
    lpips_vgg16=str(tmp_path / "vgg16.pth"),
    samples_dir=str(tmp_path / "samples"),
  )
  assert step == 1 and data.endswith("data")
  recs = list(records.iter_records(data))
  side = records.Manifest.load(data).fields["image"].shape[0]
  size = diffsfsr_config.get_config("tiny").data.image_size  # the fixture's
  reals = np.stack([loaders.decode_image(r["image"], size) for r in recs])
  real_feats = _torch_pool3(torch, net, reals)
  for task in evaluate.TASKS:
    r = results[task]
    assert r["count"] == 8
    assert 0.0 <= r["ID"] <= 1.0 and -1.0 <= r["ID-cos"] <= 1.0
    assert r["Exp"] >= 0 and 0 <= r["Pose"] < 180
    smp = np.load(tmp_path / "samples" / f"{task}.npz")
    assert smp["images"].shape == (8, size, size, 3)
    gen = _torch_pool3(torch, net, smp["images"])
    want = metrics.frechet_distance(
      *metrics.feature_statistics(gen), *metrics.feature_statistics(real_feats)
    )
    print(f"\n{task}: FID {r['FID']:.6f} vs torch features {want:.6f}, LMD {r['LMD']:.3f}")
    assert r["FID"] == pytest.approx(want, rel=1e-4)
    bkg_lm = np.stack([recs[i]["landmarks"] for i in smp["bkg"]]).astype(np.float64) * (size / side)
    dist = np.sqrt(((smp["landmarks"].astype(np.float64) - bkg_lm) ** 2).sum(-1))  # (8, 68)
    assert r["LMD"] == pytest.approx(dist.mean(axis=1).mean(), rel=1e-5)
  rec = results["reconstruct"]
  assert rec["MSE"] > 0 and np.isfinite(rec["PSNR"]) and -1 <= rec["SSIM"] <= 1
  smp = np.load(tmp_path / "samples" / "reconstruct.npz")
  bkg = np.stack([loaders.decode_image(recs[i]["image"], size) for i in smp["bkg"]])
  params = lpips_convert.load_params(tmp_path / "vgg16.pth")
  want = float(np.mean(metrics.lpips(params, smp["images"], bkg)))
  print(f"reconstruct LPIPS {rec['LPIPS']:.6f} vs metrics.lpips {want:.6f}")
  assert want > 0 and rec["LPIPS"] == pytest.approx(want, rel=1e-5)
  assert all("LPIPS" not in results[t] for t in ("swap", "reenact", "sfsr"))
  md = evaluate.markdown("tiny", results)
  header = "| Method | MSE ↓ | PSNR ↑ | SSIM ↑ | LPIPS ↓ | ID ↑ | Exp ↓ | Pose ↓ | LMD ↓ | FID ↓ |"
  assert header in md
  assert "| Method | ID ↑ | Exp ↓ | Pose ↓ | LMD ↓ | FID ↓ |" in md
  # Without the optional networks, their columns are left out.
  plain = {t: {k: v for k, v in r.items() if k not in ("FID", "LPIPS")} for t, r in results.items()}
  md = evaluate.markdown("tiny", plain)
  assert "| Method | MSE ↓ | PSNR ↑ | SSIM ↑ | ID ↑ | Exp ↓ | Pose ↓ | LMD ↓ |" in md
