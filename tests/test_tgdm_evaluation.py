"""launch.tgdm_evaluation end to end on tiny TGDM workdirs of the synthetic 3DMM set:
the pairs, then every number of the tables recomputed independently from the same
generated images (PSNR / SSIM by scikit-image, PSNR-face by hand in numpy, identity
cosines, Exp / Angle from the coefficient slices, FID from the hook's features with
scipy), the Table 1 / Table 4 Markdown and the command line's dispatch.

The default-run fixtures are untrained workdirs (a step-0 checkpoint of random params
drawn with numpy, and a random VGG16 trunk file for LPIPS: nothing is compiled but the
evaluation itself; the metrics do not care what the model learnt). The slow test trains
a few steps with launch.runner.run first."""

import json
import os

import numpy as np
import pytest
import scipy.linalg
import skimage.metrics as skm

pytest.importorskip("dlib")
torch = pytest.importorskip("torch")

from configs import tgdm as tgdm_configs  # noqa: E402
from data_pipelines import loaders, records, synthetic_3dmm  # noqa: E402
from launch import tgdm_evaluation as te  # noqa: E402

BATCH = 8


def _config(variant, data, steps=0, vgg16=""):
  c = tgdm_configs.get_config(variant)
  c.data.path = str(data)
  c.model.lpips_vgg16 = str(vgg16)
  c.data.global_batch_size = BATCH
  c.model.sample_steps = 2
  c.mesh = dict(data=-1, fsdp=1)
  c.ema.decay = 0.0
  c.train.update(dict(num_steps=steps, checkpoint_every=max(steps, 1), sample_every=0, log_every=1))
  c.train.async_checkpointing = False
  return c


def untrained_workdir(config, workdir, seed=0):
  """A workdir as launch.train leaves it, with a step-0 checkpoint whose leaves are
  drawn with numpy (normal, std 0.05; norm scales 1): compiling the real initialiser
  costs a minute of CPU, and no metric depends on how the params were drawn."""
  import jax

  from facediff import partitioning
  from facediff.train import checkpoint as ckpt_lib
  from facediff.train import state as state_lib
  from facediff.train import tgdm_task

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  task = tgdm_task.make_task(config)
  mesh = partitioning.make_mesh({"data": -1, "fsdp": 1})
  abstract, _, _ = state_lib.abstract_state(task, config, mesh)
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if not name.startswith(".params"):  # step, optimizer moments, rng, gate: zeros
      v = np.zeros(a.shape, a.dtype)
    elif name.endswith("['scale']"):  # normalisation scales
      v = np.ones(a.shape, np.float32)
    else:
      v = (rng.normal(size=a.shape) * 0.05).astype(np.float32)
    return v  # numpy: orbax writes it without slicing device arrays (seconds, not a minute)

  state = jax.tree_util.tree_map_with_path(draw, abstract)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.train)
  ck.save(0, state, force=True)
  ck.close()
  return str(workdir)


@pytest.fixture(scope="module")
def vgg16(tmp_path_factory):
  """A random torchvision-layout VGG16 ``features`` state dict (He-scaled), so LPIPS
  loads by conversion instead of compiling a random initialiser."""
  from facediff.convert import lpips as lpips_convert
  from facediff.models import vgg16 as vgg16_model

  cfg = vgg16_model.VGG16Config()
  widths = [c for c, d in zip(cfg.stage_channels, cfg.stage_depths, strict=True) for _ in range(d)]
  g = torch.Generator().manual_seed(0)
  sd, c_in = {}, 3
  for idx, c_out in zip(lpips_convert.torchvision_conv_indices(cfg).values(), widths, strict=True):
    std = (2.0 / (9 * c_in)) ** 0.5
    sd[f"features.{idx}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * std
    sd[f"features.{idx}.bias"] = torch.zeros(c_out)
    c_in = c_out
  path = tmp_path_factory.mktemp("vgg16") / "vgg16.pth"
  torch.save(sd, path)
  return str(path)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tgdm_eval_data")
  synthetic_3dmm.build(
    str(folder), num_groups=3, per_group=3, image_size=64, num_vertices=800, shard_size=4
  )
  return folder


@pytest.fixture(scope="module")
def d3dfr_weights(tmp_path_factory):
  """A randomly initialised D3DFR ResNet-50 checkpoint in the released layout and a
  five-point template file: the real code path, not the real network."""
  from scipy.io import savemat

  from data_pipelines.encoders import d3dfr
  from facediff.metrics import pose

  d = tmp_path_factory.mktemp("d3dfr")
  torch.manual_seed(0)
  net = d3dfr.ReconNet().eval()
  torch.save({"net_recon": net.state_dict()}, d / "epoch_20.pth")
  savemat(d / "similarity_Lm3D_all.mat", {"lm": pose.default_template()})
  return {"d3dfr": str(d / "epoch_20.pth"), "d3dfr_lm3d": str(d / "similarity_Lm3D_all.mat")}


def _features(images):
  """A stand-in FID feature extractor: the mean colour of each image half (6-D, so the
  8 results of a setting give full-rank covariances and scipy's sqrtm is a sound
  reference)."""
  x = np.asarray(images, np.float64)
  h = x.shape[1] // 2
  return np.concatenate([x[:, :h].mean((1, 2)), x[:, h:].mean((1, 2))], 1)


def _images_by_key(folder):
  out = {}
  for r in records.iter_records(str(folder)):
    out[r["key"]] = loaders.to_unit_range(loaders.decode_image_native(r["image"]))
  return out


def _fid(a, b):
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    eps = 1e-6 * np.eye(len(mu1))
    covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def test_pairs_share_or_cross_groups_and_follow_the_seed():
  groups = np.repeat(np.arange(4), [3, 1, 2, 3])
  same = te.reenact_pairs(groups, "same", 0, 20)
  cross = te.reenact_pairs(groups, "cross", 0, 20)
  assert np.all(groups[same[:, 0]] == groups[same[:, 1]]) and np.all(same[:, 0] != same[:, 1])
  assert set(same[:, 1]) == set(np.flatnonzero(groups != 1))  # group 1 has one record
  assert np.all(groups[cross[:, 0]] != groups[cross[:, 1]])
  assert set(cross[:, 1]) == set(range(9))
  np.testing.assert_array_equal(te.reenact_pairs(groups, "same", 0, 20), same)
  assert not np.array_equal(te.reenact_pairs(groups, "same", 1, 20), same)
  swap = te.swap_pairs(groups, 9, 0, 12)
  assert np.all(groups[swap[:, 0]] != groups[swap[:, 1]])
  free = te.swap_pairs(None, 9, 0, 12)
  assert np.all(free[:, 0] != free[:, 1])
  with pytest.raises(ValueError, match="two or more groups"):
    te.reenact_pairs(np.zeros(4), "cross", 0, 4)


def test_landmark_crops_match_the_exporters_aligner():
  """crop_from_landmarks against data_pipelines.faces.FaceAligner.crop (the exporter's
  own crops) on a real face."""
  import skimage.data

  from data_pipelines import faces

  img = skimage.data.astronaut()[:300, 100:400].copy()
  aligner = faces.FaceAligner(crops=("arcface112", "dlib150"))
  res = aligner(img)
  assert res.num_faces == 1
  for kind in ("arcface112", "dlib150"):
    want = res.crops[kind].matrix
    got = te.crop_from_landmarks(kind, res.landmarks68)
    # dlib's chip from the landmarks rounded to integers, as the aligner's shape holds them
    np.testing.assert_allclose(got, want, atol=1e-6 if kind == "arcface112" else 1e-3)


def _check_reenact(report, details, synthetic, cols, with_d3dfr):
  truth = _images_by_key(synthetic)
  groups = np.asarray(records.Manifest.load(str(synthetic)).extra["groups"]["group"])
  for setting in ("same", "cross"):
    r, d = report["results"][setting], details[setting]
    assert r["count"] == 8 and d["image"].shape == (8, 64, 64, 3)
    same_group = groups[d["pairs"][:, 0]] == groups[d["pairs"][:, 1]]
    assert same_group.all() if setting == "same" else not same_group.any()
    drivers = np.stack([truth[k] for _, k in d["keys"]])
    res01, drv01 = (d["image"] + 1) / 2, (drivers + 1) / 2
    mask = d["mask"][..., 0] > 0.5
    answer = drv01 if setting == "same" else (d["i3d"] + 1) / 2
    face = [10 * np.log10(1 / np.mean((res01[i] - answer[i])[mask[i]] ** 2)) for i in range(8)]
    np.testing.assert_allclose(r["PSNR-face"], np.mean(face), rtol=1e-4)
    emb, src = d["emb:id_dlib"], d["src:id_dlib"]
    cos = (emb * src).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(src, axis=1)
    np.testing.assert_allclose(r["ID-dlib"], cos.mean(), rtol=1e-5)
    if with_d3dfr:
      exp = np.linalg.norm(d["coeffs"][:, 80:144] - d["target_coeffs"][:, 80:144], axis=1)
      ang = np.linalg.norm(d["coeffs"][:, 224:227] - d["target_coeffs"][:, 224:227], axis=1)
      np.testing.assert_allclose(r["Exp"], exp.mean(), rtol=1e-6)
      np.testing.assert_allclose(r["Angle"], ang.mean(), rtol=1e-6)
    else:
      assert "Exp" not in r and "coeffs" not in d
    np.testing.assert_allclose(
      r["FID"], _fid(_features(d["image"]), _features(drivers)), rtol=1e-3, atol=1e-6
    )
    assert "Gaze" not in r and "ID-C" not in r
    for c in cols[setting]:
      assert np.isfinite(r[c]), c
  same, d = report["results"]["same"], details["same"]
  drivers = np.stack([truth[k] for _, k in d["keys"]])
  res01, drv01 = (d["image"] + 1) / 2, (drivers + 1) / 2
  psnr = [skm.peak_signal_noise_ratio(drv01[i], res01[i], data_range=1) for i in range(8)]
  ssim = [
    skm.structural_similarity(
      drv01[i].astype(np.float64),
      res01[i].astype(np.float64),
      gaussian_weights=True,
      sigma=1.5,
      use_sample_covariance=False,
      data_range=1,
      channel_axis=-1,
    )
    for i in range(8)
  ]
  np.testing.assert_allclose(same["PSNR"], np.mean(psnr), rtol=1e-4)
  np.testing.assert_allclose(same["SSIM"], np.mean(ssim), rtol=1e-4, atol=1e-5)
  assert same["LPIPS"] > 0 and "PSNR" not in report["results"]["cross"]


def _redo_d3dfr(images_u8, landmarks, weights):
  """D3DFR's coefficients of images, its steps written out here: dlib's predictor in the
  box of the stored landmarks, D3DFR's alignment, the torch ResNet-50. (B, 257)."""
  from data_pipelines import faces
  from data_pipelines.encoders import d3dfr

  predictor = faces.LandmarkPredictor()
  net = d3dfr.ReconNet().eval()
  net.load_state_dict(torch.load(weights["d3dfr"])["net_recon"])
  lm3d = d3dfr.load_lm3d(weights["d3dfr_lm3d"])
  out = []
  for img, lm_stored in zip(images_u8, landmarks, strict=True):
    box = te.landmark_boxes(np.asarray(lm_stored)[None], img.shape[0])[0]
    crop = d3dfr.align(img, predictor(img, tuple(int(v) for v in box)), lm3d)
    with torch.no_grad():
      x = torch.from_numpy(crop.astype(np.float32) / 255).permute(2, 0, 1)[None]
      out.append(net(x).numpy()[0])
  return np.stack(out)


def test_d3dfr_coefficients_redo_the_exporter_steps(synthetic, d3dfr_weights):
  recs = list(records.iter_records(str(synthetic)))[:2]
  images = np.stack([loaders.decode_image_native(r["image"]) for r in recs])
  lms = np.stack([np.asarray(r["landmarks"]) for r in recs])
  got = te.D3DFRCoefficients(d3dfr_weights)(images, te.landmark_boxes(lms, 64))
  assert got.shape == (2, 257) and te.D3DFRCoefficients.layout == "d3dfr"
  np.testing.assert_allclose(got, _redo_d3dfr(images, lms, d3dfr_weights), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_d3dfr", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_reenact_tables_match_independent_computations(
  synthetic, d3dfr_weights, vgg16, tmp_path, with_d3dfr
):
  """Table 1 on a reenact workdir; with D3DFR (slow: a ResNet-50 per image on the host)
  Exp and Angle too."""
  work = untrained_workdir(_config("tiny", synthetic, vgg16=vgg16), str(tmp_path / "reenact"))
  weights = d3dfr_weights if with_d3dfr else {}
  opts = te.Options(num=8, batch=BATCH, weights=weights, fid_features=_features, keep_details=True)
  report, details = te.evaluate(work, opts)
  assert report["step"] == 0 and report["mode"] == "reenact" and report["synthetic"]
  assert report["data"] == str(synthetic) and report["sampler"] == "ddim, 2 steps"
  cols = {
    "same": ("PSNR", "SSIM", "LPIPS", "ID-dlib", "FID", "PSNR-face"),
    "cross": ("ID-dlib", "FID", "PSNR-face"),
  }
  _check_reenact(report, details, synthetic, cols, with_d3dfr)
  if with_d3dfr:  # the coefficients of the first result: D3DFR's steps redone here
    d = details["same"]
    rec = next(r for r in records.iter_records(str(synthetic)) if r["key"] == d["keys"][0][1])
    want = _redo_d3dfr(te.to_uint8(d["image"][:1]), [rec["landmarks"]], d3dfr_weights)
    np.testing.assert_allclose(d["coeffs"][:1], want, rtol=1e-4, atol=1e-4)
  else:
    assert any(n.startswith("Exp, Angle, Gaze: not computed") for n in report["notes"])

  md = te.markdown(report)
  assert (
    "| Method | Same-Identity PSNR ↑ | LPIPS ↓ | Exp ↓ | Angle ↓ | Gaze ↓ | "
    "ID-C ↑ | FID ↓ | Cross-Identity Exp ↓ | Angle ↓ | Gaze ↓ | ID-C ↑ | FID ↓ |"
  ) in md
  assert "TGDM (facediff) @ 0 | " in md and "| Same-Identity SSIM ↑ |" in md
  assert report["lpips_trunk"] == vgg16 and "Gaze: not computed" in md
  assert "LPIPS ↓ (random VGG16)" in te.markdown(dict(report, lpips_trunk="random"))
  assert "ID-C: not computed: it needs --weights id_curricularface=PATH" in md
  same = report["results"]["same"]
  row = md.split("TGDM (facediff) @ 0 | ")[1].split(" |")[0]
  assert row == f"{same['PSNR']:.2f}"
  json.dumps(report)  # the report is plain JSON


def _swap_config(synthetic, vgg16):
  return _config("tiny_swap", synthetic, vgg16=vgg16)


def test_ffpp_protocol_pairs_come_from_the_dataset(synthetic, vgg16):
  """--protocol ffpp reads eval_pairs.json (source, target) and checks its keys; the
  pairs are resolved before any model is loaded."""
  from data_pipelines.protocols import pairs as pairs_lib
  from facediff import partitioning

  data = synthetic  # 3 groups of 3: g0000/f0000 ... g0002/f0002
  wanted = [
    {"source_key": "g0000/f0001", "target_key": "g0001/f0000", "name": "001_000", "slot": 0},
    {"source_key": "g0001/f0001", "target_key": "g0000/f0000", "name": "000_001", "slot": 0},
  ]
  pairs_lib.write(str(data), wanted, {"protocol": "ffpp_swap", "task": "swap"})
  cfg = _swap_config(data, vgg16)
  opts = te.Options(data=str(data), protocol="ffpp")
  mesh = partitioning.make_mesh({"data": -1, "fsdp": 1})

  def pairs():
    ctx = te._Context(cfg, "swap", te._dataset("unused", cfg, opts), opts, mesh)
    return te._pairs(ctx)

  np.testing.assert_array_equal(pairs()["swap"], [[1, 3], [4, 0]])
  assert te._dataset("unused", cfg, opts).fields["mask"] == "mask"  # no mask_small field
  wanted[0]["source_key"] = "g0001/f0000"  # another record than the indices say
  out = pairs_lib.write(str(data), wanted, {"protocol": "ffpp_swap", "task": "swap"})
  with open(data / pairs_lib.FILE, "w") as f:
    json.dump(dict(out, pairs=[dict(out["pairs"][0], source=1)]), f)
  with pytest.raises(ValueError, match="no longer name its keys"):
    pairs()
  reenact = _config("tiny", data, vgg16=vgg16)
  with pytest.raises(ValueError, match="for swap workdirs"):
    te._pairs(te._Context(reenact, "reenact", te._dataset("w", reenact, opts), opts, mesh))


def test_command_line_dispatches_tgdm_workdirs(synthetic, vgg16, tmp_path, monkeypatch):
  """launch.evaluate reads the workdir's model name, hands TGDM workdirs and their flags
  to launch.tgdm_evaluation and writes both files (the evaluation itself is stubbed:
  the other tests run it)."""
  work = tmp_path / "w"
  work.mkdir()
  (work / "config.json").write_text(_swap_config(synthetic, vgg16).to_json_best_effort())
  seen = {}
  report = {
    "workdir": str(work), "data": str(synthetic), "step": 7, "mode": "swap",
    "protocol": None, "seed": 3, "sampler": "ddim, 2 steps", "lpips_trunk": None,
    "synthetic": True, "notes": ["a note"],
    "results": {"swap": {"count": 8, "ID-A": 0.5, "ID-dlib": 0.25}},
  }  # fmt: skip

  def fake(workdir, options):
    seen.update(workdir=workdir, options=options)
    return report, None

  from launch import evaluate as cli

  monkeypatch.setattr(te, "evaluate", fake)
  monkeypatch.setattr(cli, "fid_hook", lambda path: ("fid features of", path))
  out = tmp_path / "out"
  got = _cli(
    [f"--workdir={work}", f"--out={out}", "--num=16", "--batch=8", "--seed=3", "--steps=4",
     "--weights=id_arcface=/a.pth", "--weights=d3dfr=/d.pth", "--lpips_vgg16=/v.pth",
     "--inception=/i.pth"]
  )  # fmt: skip
  o = seen["options"]
  assert o.fid_features == ("fid features of", "/i.pth")  # --inception wires the FID hook
  assert seen["workdir"] == str(work) and (o.num, o.batch, o.seed) == (16, 8, 3)
  assert o.steps == 4 and o.method is None  # the config's sampler unless --method is given
  assert o.weights == {"id_arcface": "/a.pth", "d3dfr": "/d.pth"} and o.lpips_vgg16 == "/v.pth"
  assert got == report
  md = (out / "evaluation.md").read_text()
  assert md == te.markdown(report)
  assert "| Method | ID-A ↑ | Exp ↓ | Angle ↓ | FID ↓ |" in md
  assert "| TGDM (facediff) @ 7 | 0.500 | - | - | - |" in md
  assert "| Method | ID-dlib ↑ |" in md and "- a note" in md
  with pytest.raises(SystemExit, match="expected NAME=PATH"):
    _cli([f"--workdir={work}", "--weights=d3dfr"])


def _cli(args):
  """launch.evaluate's main with ``args`` as its flags; the report it wrote."""
  from absl import flags

  from launch import evaluate as cli

  try:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["evaluate", *args])
    cli.main(["evaluate"])
  finally:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["pytest"])
  out = next(a.split("=", 1)[1] for a in args if a.startswith("--out="))
  with open(os.path.join(out, "evaluation.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_swap_table_end_to_end_and_the_real_command_line(synthetic, vgg16, tmp_path):
  """A swap workdir: Table 4 with ID-dlib and PSNR-face checked by hand; then the
  command line in a fresh process writes the same numbers."""
  import subprocess
  import sys

  work = untrained_workdir(_swap_config(synthetic, vgg16), str(tmp_path / "swap"), seed=1)
  report, details = te.evaluate(work, te.Options(num=8, batch=BATCH, keep_details=True))
  r, d = report["results"]["swap"], details["swap"]
  groups = np.asarray(records.Manifest.load(str(synthetic)).extra["groups"]["group"])
  assert np.all(groups[d["pairs"][:, 0]] != groups[d["pairs"][:, 1]])
  res01, ans01 = (d["image"] + 1) / 2, (d["i3d"] + 1) / 2
  mask = d["mask"][..., 0] > 0.5
  face = [10 * np.log10(1 / np.mean((res01[i] - ans01[i])[mask[i]] ** 2)) for i in range(8)]
  np.testing.assert_allclose(r["PSNR-face"], np.mean(face), rtol=1e-4)
  emb, src = d["emb:id_dlib"], d["src:id_dlib"]
  cos = (emb * src).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(src, axis=1)
  np.testing.assert_allclose(r["ID-dlib"], cos.mean(), rtol=1e-5)
  assert "Exp" not in r and "FID" not in r and "PSNR" not in r
  md = te.markdown(report)
  assert "## TGDM Table 4 layout: face swapping" in md
  assert "| TGDM (facediff) @ 0 | - | - | - | - |" in md
  assert "ID-A: not computed: it needs --weights id_arcface=PATH; ID-dlib" in md
  out = tmp_path / "cli"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
    [sys.executable, "-m", "launch.evaluate", f"--workdir={work}", f"--out={out}",
     "--num=8", "--batch=8"],
    cwd=root, capture_output=True, text=True, timeout=1200,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (out / "evaluation.md").read_text() == md


@pytest.mark.slow
def test_trained_reenact_workdir_through_runner(synthetic, tmp_path):
  """launch.runner.run trains the tiny reenact model a few steps; the evaluation of the
  trained checkpoint passes the same independent checks."""
  from launch import runner

  cfg = _config("tiny", synthetic, steps=3)  # random LPIPS trunk: the training default
  runner.run(cfg, str(tmp_path / "trained"))
  report, details = te.evaluate(
    str(tmp_path / "trained"), te.Options(num=8, batch=BATCH, keep_details=True)
  )
  assert report["step"] == 3 and report["lpips_trunk"] == "random"
  assert "LPIPS: the VGG16 trunk is random" in te.markdown(report)
  truth = _images_by_key(synthetic)
  d = details["same"]
  drivers = np.stack([truth[k] for _, k in d["keys"]])
  psnr = [skm.peak_signal_noise_ratio((drivers[i] + 1) / 2, (d["image"][i] + 1) / 2, data_range=1)
          for i in range(8)]  # fmt: skip
  np.testing.assert_allclose(report["results"]["same"]["PSNR"], np.mean(psnr), rtol=1e-4)
  cols = {"same": ("PSNR", "SSIM", "LPIPS", "ID-dlib", "PSNR-face"), "cross": ("ID-dlib",)}
  for s in ("same", "cross"):
    for c in cols[s]:
      assert np.isfinite(report["results"][s][c])
