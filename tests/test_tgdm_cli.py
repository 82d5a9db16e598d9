"""The facediff command (launch.sample -> launch.sample_tgdm) on TGDM workdirs.

Default run: bad inputs on config-only workdirs (every check comes before the checkpoint
is loaded): one line naming the input, nothing written, exit status 1 from the real
entry point. Then tiny TGDM reenact / swap and EmoA2E workdirs (step-1 checkpoints
written by the test) through every task of the command, each result compared with the
TGDMPipeline called directly on independently decoded records with the same params and
key. Slow (-m slow): user photos and a video file through the exporter.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import emoa2e as emoa2e_configs
from configs import tgdm as tgdm_configs
from data_pipelines import fake_shards, synthetic_3dmm
from launch import sample_tgdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 8000  # the test WAVs' rate: the command resamples to EmoA2E's 16 kHz


def _write_config(workdir, config):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return str(workdir)


def _wav(path, seconds, rate=SR):
  """A chirp as 16-bit PCM."""
  from scipy.io import wavfile

  t = np.arange(int(seconds * rate)) / rate
  x = 0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)
  wavfile.write(path, rate, (x * 32767).astype(np.int16))
  return str(path)


# ---- bad inputs, before any checkpoint (default run) ----


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
  """Config-only workdirs (no checkpoint) over a 3-record set whose coefficients come
  from no exporter encoder, like the synthetic 3DMM set's."""
  d = tmp_path_factory.mktemp("bare")
  data = str(d / "data")
  fake_shards.write_dataset(
    data,
    3,
    image_size=32,
    embeddings={"coeffs": 257, "id_3dmm": 80, "exp_3dmm": 64},
    latent_shape=None,
  )
  c = tgdm_configs.get_config("tiny")
  c.data.path = data
  emo = emoa2e_configs.get_config("tiny")
  free = emoa2e_configs.get_config("tiny_free")
  Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(d / "photo.png")
  (d / "broken.wav").write_bytes(b"RIFF but not really")
  return {
    "data": data,
    "reenact": _write_config(d / "reenact", c),
    "emoa2e": _write_config(d / "emoa2e", emo),
    "emoa2e_free": _write_config(d / "emoa2e_free", free),
    "photo": str(d / "photo.png"),
    "broken_wav": str(d / "broken.wav"),
    "wav": _wav(d / "speech.wav", 0.2),
    "dir": d,
  }


BAD = {
  "missing photo": (dict(task="reenact", source="{dir}/missing.png", driver="{data}#000001"),
                    "missing.png: no such file"),
  "unknown key": (dict(task="reenact", source="{data}#000000", driver="{data}#nope"),
                  "{data}#nope: no record 'nope' in {data} (3 records"),
  "no dataset": (dict(task="reenact", source="{dir}/nodata#000000", driver="{data}#000001"),
                 "no dataset folder"),
  "photo on synthetic": (dict(task="reenact", source="{photo}", driver="{data}#000001"),
                         "photo.png: a photo needs the encoder that wrote 'coeffs'"),
  "swap on reenact": (dict(task="swap", source="{data}#000000", target="{data}#000001"),
                      "--task swap: {reenact} is a 'reenact'-mode TGDM checkpoint"),
  "no task": (dict(task="sfsr", source="{data}#000000"), "the tasks reenact, video, audio, swap"),
  "audio without emoa2e": (dict(task="audio", source="{data}#000000", audio="{wav}"),
                           "--task audio needs --emoa2e_workdir"),
  "bad wav": (dict(task="audio", source="{data}#000000", audio="{broken_wav}",
                   emoa2e_workdir="{emoa2e}", emotion="happy"), "broken.wav: not a readable WAV"),
  "missing wav": (dict(task="audio", source="{data}#000000", audio="{dir}/none.wav",
                       emoa2e_workdir="{emoa2e}", emotion="happy"), "none.wav: no such file"),
  "no emotion": (dict(task="audio", source="{data}#000000", audio="{wav}",
                      emoa2e_workdir="{emoa2e}"), "is the emotional EmoA2E; pass --emotion"),
  "emotion to free": (dict(task="audio", source="{data}#000000", audio="{wav}",
                           emoa2e_workdir="{emoa2e_free}", emotion="happy"),
                      "is the emotion-free EmoA2E"),
  "empty glob": (dict(task="video", source="{data}#000000", driver_video="{data}#zz*"),
                 "no record key of {data} matches 'zz*'"),
  "no video": (dict(task="video", source="{data}#000000", driver_video="{dir}/none.mp4"),
               "none.mp4: no such file or folder"),
  "broken video": (dict(task="video", source="{data}#000000", driver_video="{broken_wav}"),
                   "broken.wav: not a readable video file"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_one_line_and_nothing_is_written(bare, tmp_path, case):
  job, message = BAD[case]
  job = {k: v.format(**bare) for k, v in job.items()}
  out = tmp_path / "out"
  with pytest.raises(sample_tgdm.SampleError) as e:
    sample_tgdm.run_jobs([job], bare["reenact"], str(out), progress=False)
  msg = str(e.value)
  assert message.format(**bare) in msg and "\n" not in msg
  assert not out.exists()


def test_audio_checks_run_before_any_checkpoint_is_read(bare, tmp_path, monkeypatch, capsys):
  """WAV, inputs and emotion come before EmoA2E's checkpoint; an EmoA2E trained with
  other emotion embeddings than MiniLM is flagged on stderr."""
  c = emoa2e_configs.get_config("tiny")
  c.data.text_encoder = "random"
  a2e = _write_config(tmp_path / "emoa2e_random", c)
  seen = []

  def fake_embedding(text, dim):
    seen.append((text, dim))
    return np.zeros(dim, np.float32), [text]

  monkeypatch.setattr(sample_tgdm, "emotion_embedding", fake_embedding)
  job = dict(
    task="audio",
    source=f"{bare['data']}#000000",
    audio=bare["wav"],
    emoa2e_workdir=a2e,
    emotion="happy",
  )
  with pytest.raises(sample_tgdm.SampleError, match="checkpoints: no complete checkpoint"):
    sample_tgdm.run_jobs([job], bare["reenact"], str(tmp_path / "out"), progress=False)
  assert seen == [("happy", 384)]
  assert "trained with 'random' emotion embeddings" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def _cli(args, **kw):
  return subprocess.run(
    [sys.executable, "-m", "launch.sample", *args], cwd=ROOT, capture_output=True, text=True, **kw
  )


def test_entry_point_answers_bad_inputs_with_one_line_and_exit_1(bare, tmp_path):
  out = tmp_path / "out"
  data = bare["data"]
  r = _cli(
    [
      f"--workdir={bare['reenact']}",
      f"--out={out}",
      "--task=reenact",
      f"--source={data}#000000",
      f"--driver={data}#gone",
    ]
  )
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
    f"launch.sample: {data}#gone: no record 'gone' in {data} (3 records, e.g. 000000, 000001, "
    f"000002)"
  )
  # A DiffSFSR input on a TGDM workdir.
  r = _cli([f"--workdir={bare['reenact']}", f"--out={out}", f"--background={bare['photo']}"])
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
    "launch.sample: --background: not an input of TGDM (the workdir's model)"
  )
  assert not out.exists()


# ---- tiny checkpoints through every task ----


def _tgdm_config(variant, data_path=""):
  """The tiny configs shrunk further for a fast compile: 32 px, a 2-level UNet."""
  c = tgdm_configs.get_config(variant)
  c.synthetic_3dmm.update(dict(num_groups=2, per_group=4, image_size=32, num_vertices=400))
  c.data.image_size = 32
  c.data.global_batch_size = 8  # one example per virtual device
  if data_path:
    c.data.path = data_path
  c.model.tgdm = dict(
    block_channels=(8, 8),
    layers_per_block=1,
    cond_dim=8,
    norm_num_groups=4,
    texatt_factors=(2,),
  )
  c.model.sample_steps = 2  # the config's sampler: ddim, 2 steps
  c.optim.warmup_steps = 0
  c.ema.decay = 0.5  # the EMA differs from the trained params after one step
  c.train.update(
    dict(num_steps=1, checkpoint_every=1, sample_every=0, log_every=1, async_checkpointing=False)
  )
  return c


def _checkpoint(config, workdir):
  """A tiny workdir as launch.runner leaves it (config.json, a step-1 checkpoint), written
  from the initial state without compiling a training step: the EMA params (where the
  config keeps them) are the params scaled by 0.5, so the EMA / trained choice shows in
  the results."""
  import jax

  from facediff import partitioning
  from facediff.train import checkpoint as ckpt_lib
  from facediff.train import state as state_lib
  from launch import runner

  prepared = runner.prepare(config, workdir)
  with partitioning.activation_rules(prepared.mesh):
    state, _, _ = state_lib.create_train_state(prepared.task, config, prepared.mesh)
  ema = None if state.ema_params is None else jax.tree.map(lambda p: 0.5 * p, state.params)
  state = state.replace(step=state.step + 1, ema_params=ema)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.train)
  ck.save(1, state, force=True)
  ck.wait()
  ck.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bare):
  """Step-1 checkpoints of TGDM reenact and swap (on one synthetic 3DMM set, 2 groups of
  4 records at 32 px) and of EmoA2E, in workdirs prepared by launch.runner (training
  itself is tested elsewhere; compiling its step here would cost minutes)."""
  d = tmp_path_factory.mktemp("trained")
  reenact, swap, a2e = str(d / "reenact"), str(d / "swap"), str(d / "emoa2e")
  data = str(d / "data")
  synthetic_3dmm.build(data, **dict(_tgdm_config("tiny").synthetic_3dmm))
  _checkpoint(_tgdm_config("tiny", data), reenact)
  _checkpoint(_tgdm_config("tiny_swap", data), swap)
  c = emoa2e_configs.get_config("tiny")
  c.data.text_encoder = "random"  # the records only; the command embeds with MiniLM
  c.data.num_records = 16
  c.data.num_frames = 4
  c.model.num_layers = 1
  c.train.update(dict(num_steps=1, log_every=1, checkpoint_every=1, async_checkpointing=False))
  _checkpoint(c, a2e)
  return {"reenact": reenact, "swap": swap, "emoa2e": a2e, "data": data, "dir": d}


def _records(folder):
  """key -> record, decoded here with PIL (not the command's cv2 path)."""
  from data_pipelines import records

  out = {}
  for r in records.iter_records(folder):
    img = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), np.float32)
    out[str(r["key"])] = dict(r, pixels=img / 127.5 - 1.0)
  return out


def _u8(x):
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _png(path):
  return np.asarray(Image.open(path).convert("RGB"))


def _frames(folder):
  names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
  return np.stack([_png(os.path.join(folder, n)) for n in names])


def _job(**kw):
  job = dict(seed=0, steps=None, method=None)
  job.update(kw)
  return job


def test_reenact_equals_the_pipeline_and_records_its_run(trained, tmp_path):
  import jax

  from facediff.pipelines import tgdm as pipe_lib
  from launch import inference

  data = trained["data"]
  src, drv = f"{data}#g0000/f0000", f"{data}#g0001/f0002"
  jobs = [
    _job(task="reenact", source=src, driver=drv, seed=3, name="a"),
    _job(task="reenact", source=src, driver=drv, seed=4, name="b"),
  ]
  before = pipe_lib._reenact_program._cache_size()
  rec = sample_tgdm.run_jobs(jobs, trained["reenact"], str(tmp_path), progress=False)
  assert pipe_lib._reenact_program._cache_size() == before + 1  # one program, two jobs

  recs = _records(data)
  _, pipe, params, step = inference.load_tgdm(trained["reenact"])
  s, d = recs["g0000/f0000"], recs["g0001/f0002"]
  want = pipe.reenact(
    params, s["pixels"][None], s["coeffs"][None], d["coeffs"][None], jax.random.key(3)
  )
  np.testing.assert_array_equal(_png(tmp_path / "a.png"), _u8(want.image[0]))
  assert np.abs(_png(tmp_path / "a.png").astype(int) - _png(tmp_path / "b.png")).max() > 0

  on_disk = json.load(open(tmp_path / "record.json"))
  assert on_disk == json.loads(json.dumps(rec, default=str))
  assert rec["checkpoint_step"] == step == 1 and rec["params"] == "ema" and rec["mode"] == "reenact"
  j = rec["jobs"][0]
  assert j["sampler"] == {"method": "ddim", "num_steps": 2} and j["seed"] == 3
  assert j["inputs"] == {"source": src, "driver": drv} and j["outputs"] == ["a.png"]

  # --noema and --steps/--method: the trained params, another sampler.
  out = tmp_path / "noema"
  rec = sample_tgdm.run_jobs(
    [_job(task="reenact", source=src, driver=drv, seed=3, steps=1, method="ddim", name="a")],
    trained["reenact"],
    str(out),
    use_ema=False,
    progress=False,
  )
  assert rec["params"] == "trained" and rec["jobs"][0]["sampler"]["num_steps"] == 1
  _, _, raw, _ = inference.load_tgdm(trained["reenact"], use_ema=False)
  want = pipe.reenact(
    raw, s["pixels"][None], s["coeffs"][None], d["coeffs"][None], jax.random.key(3), num_steps=1
  )
  np.testing.assert_array_equal(_png(out / "a.png"), _u8(want.image[0]))


def test_video_has_the_drivers_frames_and_equals_the_pipeline(trained, tmp_path):
  import cv2
  import jax

  from launch import inference

  data = trained["data"]
  keys = ["g0001/f0000", "g0001/f0001", "g0001/f0002"]
  jobs = [
    _job(
      task="video", source=f"{data}#g0000/f0000", driver_video=f"{data}#g0001/f000[0-2]", name="v"
    ),
    # chunks of 2 frames (the last one padded): the window is averaged on the host
    _job(
      task="video",
      source=f"{data}#g0000/f0000",
      driver_video=f"{data}#{','.join(keys)}",
      chunk=2,
      fps=10.0,
      name="c",
    ),
  ]
  rec = sample_tgdm.run_jobs(jobs, trained["reenact"], str(tmp_path), progress=False)
  got = _frames(tmp_path / "v")
  assert got.shape == (3, 32, 32, 3)
  assert rec["jobs"][0]["inputs"]["driver_video"] == [f"{data}#{k}" for k in keys]
  assert rec["jobs"][0]["frames"] == 3 and rec["jobs"][0]["radius"] == 1

  recs = _records(data)
  _, pipe, params, _ = inference.load_tgdm(trained["reenact"])
  s = recs["g0000/f0000"]
  seq = np.stack([recs[k]["coeffs"] for k in keys])
  want = pipe.drive_video(params, s["pixels"], s["coeffs"], seq, jax.random.key(0), radius=1)
  np.testing.assert_array_equal(got, _u8(want.image))
  chunked = _frames(tmp_path / "c")
  diff = np.abs(chunked.astype(int) - got.astype(int))
  print("chunked vs whole: max", diff.max(), "mean", diff.mean())
  assert diff.max() <= 2

  cap = cv2.VideoCapture(str(tmp_path / "v.mp4"))
  n = 0
  while cap.read()[0]:
    n += 1
  assert n == 3 and cap.get(cv2.CAP_PROP_FPS) == 25.0
  assert Image.open(tmp_path / "v.gif").n_frames == 3
  assert "mp4" not in rec["jobs"][0]  # the MP4 was written
  assert rec["jobs"][1]["fps"] == 10.0


def test_audio_frames_follow_the_clips_and_equal_the_pipeline(trained, tmp_path):
  import jax

  from data_pipelines import text_embed
  from facediff import audio
  from facediff.pipelines import tgdm as pipe_lib
  from launch import inference

  wav = _wav(tmp_path / "speech.wav", 0.24)  # 8 kHz -> 16 kHz, 6 frames at 25 fps
  data = trained["data"]
  job = _job(
    task="audio",
    source=f"{data}#g0000/f0001",
    audio=wav,
    emoa2e_workdir=trained["emoa2e"],
    emotion="happy, sad",
    intensity=2.0,
    name="talk",
  )
  # In chunks of 2 frames: EmoA2E on the whole sequence, then the chunks.
  chunked = dict(job, chunk=2, name="chunked")
  rec = sample_tgdm.run_jobs(
    [job, chunked], trained["reenact"], str(tmp_path / "out"), progress=False
  )
  got = _frames(tmp_path / "out" / "talk")

  # Independently: scipy's resampling, the MFCC clips, MiniLM per word averaged by hand.
  from scipy import signal
  from scipy.io import wavfile

  a2e_config, a2e, a2e_params, a2e_step = inference.load_emoa2e(trained["emoa2e"])
  rate, pcm = wavfile.read(wav)
  x = signal.resample_poly(pcm.astype(np.float32) / 32768.0, 2, 1).astype(np.float32)
  mcfg = audio.MFCCConfig(**dict(a2e_config.audio))
  clips = audio.video_clips(audio.mfcc(x, mcfg), audio.num_video_frames(len(x), mcfg), mcfg)
  assert clips.shape[0] == 6 and got.shape == (6, 32, 32, 3)
  enc = text_embed.MiniLMEncoder()
  z = (enc(["happy"])[0] + enc(["sad"])[0]) / 2
  _, tg, params, _ = inference.load_tgdm(trained["reenact"])
  pipe = pipe_lib.TGDMPipeline(tg.config, tg.morphable_model, tg.settings, emoa2e_config=a2e)
  s = _records(data)["g0000/f0001"]
  want = pipe.drive_audio(
    params,
    a2e_params,
    s["pixels"],
    s["coeffs"],
    clips,
    jax.random.key(0),
    emotion=z,
    intensity=2.0,
  )
  diff = np.abs(got.astype(int) - _u8(want.image).astype(int))
  print("audio vs pipeline: max", diff.max(), "mean", diff.mean())
  assert diff.max() <= 1
  diff = np.abs(_frames(tmp_path / "out" / "chunked").astype(int) - got.astype(int))
  print("audio chunked vs whole: max", diff.max(), "mean", diff.mean())
  assert diff.max() <= 2
  j = rec["jobs"][0]
  assert j["frames"] == 6 and j["fps"] == 25.0
  assert j["emoa2e"]["emotion"] == ["happy", "sad"] and j["emoa2e"]["intensity"] == 2.0
  assert j["emoa2e"]["checkpoint_step"] == a2e_step == 1
  assert Image.open(tmp_path / "out" / "talk.gif").n_frames == 6


def test_swap_equals_the_pipeline_and_needs_a_swap_workdir(trained, tmp_path):
  import jax

  from launch import inference

  data = trained["data"]
  src, tgt = f"{data}#g0000/f0000", f"{data}#g0001/f0002"
  job = _job(task="swap", source=src, target=tgt, seed=5, name="s")
  rec = sample_tgdm.run_jobs([job], trained["swap"], str(tmp_path), progress=False)
  assert rec["mode"] == "swap"
  recs = _records(data)
  _, pipe, params, _ = inference.load_tgdm(trained["swap"])
  s, t = recs["g0000/f0000"], recs["g0001/f0002"]
  want = pipe.swap(
    params,
    s["pixels"][None],
    s["coeffs"][None],
    t["pixels"][None],
    t["coeffs"][None],
    s["id_3dmm"][None],
    jax.random.key(5),
    target_mask=(np.asarray(t["mask"], np.float32) > 0)[None, ..., None].astype(np.float32),
  )
  np.testing.assert_array_equal(_png(tmp_path / "s.png"), _u8(want.image[0]))

  out = tmp_path / "wrong"
  with pytest.raises(sample_tgdm.SampleError, match="'reenact'-mode TGDM checkpoint"):
    sample_tgdm.run_jobs([job], trained["reenact"], str(out), progress=False)
  with pytest.raises(sample_tgdm.SampleError, match="'swap'-mode TGDM checkpoint"):
    sample_tgdm.run_jobs(
      [_job(task="reenact", source=src, driver=tgt)], trained["swap"], str(out), progress=False
    )
  assert not out.exists()


def test_entry_point_runs_a_csv_of_tgdm_jobs(trained, tmp_path):
  data = trained["data"]
  jobs = tmp_path / "jobs.csv"
  jobs.write_text(
    "task,source,driver,driver_video,seed,name\n"
    f"reenact,{data}#g0000/f0000,{data}#g0000/f0002,,1,one\n"
    f"video,{data}#g0001/f0000,,{data}#g0000/f0000,2,two\n"
  )
  out = tmp_path / "out"
  r = _cli(
    [f"--workdir={trained['reenact']}", f"--out={out}", f"--csv={jobs}", "--steps=1"],
    timeout=900,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  printed = r.stdout.split()
  assert str(out / "one.png") in printed and str(out / "two.mp4") in printed
  assert _png(out / "one.png").shape == (32, 32, 3)
  assert len(os.listdir(out / "two")) == 1  # one driver frame, one output frame
  rec = json.load(open(out / "record.json"))
  assert [j["seed"] for j in rec["jobs"]] == [1, 2]
  assert [j["sampler"]["num_steps"] for j in rec["jobs"]] == [1, 1]
  assert "[1/2] reenact" in r.stderr  # progress lines


# ---- user photos through the exporter (slow; dlib, torch) ----


@pytest.fixture(scope="module")
def photo_workdir(trained, tmp_path_factory):
  """The trained reenact checkpoint over a copy of its data whose manifest says the
  coefficients come from the exporter's ``d3dfr`` encoder, and random D3DFR weights
  saved in the released format (final layers zeroed: every photo gets the same, small
  coefficients, whatever the random trunk computes)."""
  import shutil

  import cv2

  pytest.importorskip("dlib")
  torch = pytest.importorskip("torch")
  from scipy.io import savemat
  from test_crop_transforms import IMAGES, _cut, astronaut_face

  from data_pipelines import faces, records
  from data_pipelines.encoders import d3dfr

  d = tmp_path_factory.mktemp("photos")
  data = str(d / "data")
  shutil.copytree(trained["data"], data)
  m = records.Manifest.load(data)
  m.fields["coeffs"] = records.FieldSpec("float32", [257], "d3dfr", d3dfr.D3DFR.version)
  m.save(data)
  work = str(d / "reenact")
  shutil.copytree(
    os.path.join(trained["reenact"], "checkpoints"), os.path.join(work, "checkpoints")
  )
  config = json.load(open(os.path.join(trained["reenact"], "config.json")))
  config["data"]["path"] = data
  json.dump(config, open(os.path.join(work, "config.json"), "w"))

  net = d3dfr.ReconNet().eval()
  with torch.no_grad():
    for layer in net.final_layers:
      layer.weight.zero_()
      layer.bias.zero_()
  torch.save({"net_recon": net.state_dict()}, d / "epoch_20.pth")
  astro = astronaut_face()
  lm = faces.FaceAligner(image_size=128)(astro).landmarks68
  template = np.concatenate([(lm - lm.mean(0)) / 100.0 * [1, -1], np.zeros((68, 1))], axis=1)
  savemat(d / "similarity_Lm3D_all.mat", {"lm": template})
  weights = (f"d3dfr={d / 'epoch_20.pth'}", f"d3dfr_lm3d={d / 'similarity_Lm3D_all.mat'}")

  Image.fromarray(astro).save(d / "astronaut.png")
  t1 = np.array(Image.open(os.path.join(IMAGES, "t1.jpg")).convert("RGB"))
  det = faces.FaceDetector()(t1)
  Image.fromarray(_cut(t1, det[0], 1.0)).save(d / "person0.png")
  Image.fromarray(t1).save(d / "group.png")
  frames = d / "frames"
  frames.mkdir()
  side = 160
  writer = cv2.VideoWriter(str(d / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 12.0, (side, side))
  for i in range(3):  # the face moves a little from frame to frame
    f = cv2.resize(np.roll(astro, 4 * i, axis=1), (side, side))
    writer.write(f[..., ::-1].copy())
    Image.fromarray(f).save(frames / f"{i}.png")
  writer.release()
  Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(frames / "3.png")  # no face
  return {"workdir": work, "weights": weights, "dir": d}


@pytest.mark.slow
def test_photos_and_a_video_file_go_through_the_exporter(photo_workdir, tmp_path):
  p = photo_workdir
  d, work, weights = p["dir"], p["workdir"], p["weights"]
  jobs = [
    _job(task="reenact", source=str(d / "astronaut.png"), driver=str(d / "person0.png"), name="r"),
    _job(task="video", source=str(d / "person0.png"), driver_video=str(d / "clip.mp4"), name="v"),
  ]
  rec = sample_tgdm.run_jobs(jobs, work, str(tmp_path), weights=weights, progress=False)
  assert _png(tmp_path / "r.png").shape == (32, 32, 3)
  assert _frames(tmp_path / "v").shape == (3, 32, 32, 3)  # the video file's 3 frames
  v = rec["jobs"][1]
  assert v["inputs"]["driver_video"] == [f"{d / 'clip.mp4'} frame {i}" for i in (0, 1, 2)]
  assert v["fps"] == 12.0  # the file's frame rate
  assert rec["jobs"][0]["inputs"] == {
    "source": str(d / "astronaut.png"),
    "driver": str(d / "person0.png"),
  }

  bad = {
    "group.png": dict(task="reenact", source=str(d / "group.png"), driver=str(d / "person0.png")),
    "frames": dict(task="video", source=str(d / "astronaut.png"), driver_video=str(d / "frames")),
  }
  out = tmp_path / "bad"
  with pytest.raises(sample_tgdm.SampleError, match=r"group\.png: \d+ faces found"):
    sample_tgdm.run_jobs([_job(**bad["group.png"])], work, str(out), weights=weights)
  with pytest.raises(sample_tgdm.SampleError, match=r"frames/3\.png: no face found"):
    sample_tgdm.run_jobs([_job(**bad["frames"])], work, str(out), weights=weights)
  with pytest.raises(sample_tgdm.SampleError, match=r"pass --weights d3dfr=PATH"):
    sample_tgdm.run_jobs([_job(**jobs[0])], work, str(out))
  assert not out.exists()
