"""DiffSFSR evaluation of a trained workdir on evaluation triplets, as the papers' tables.

    python -m launch.evaluate --workdir TRAINED [--data DIR] [--tasks swap,reenact,sfsr]
        [--num 64] [--batch 8] [--steps 50] [--method pndm] [--out DIR]
        [--inception pt_inception-2015-12-05-6726825d.pth] [--lpips_vgg16 vgg16.pth]
        [--save_samples]

For each task (``reconstruct``, ``swap``, ``reenact``, ``sfsr``: the loaders'
``make_eval_triplets``, deterministic in ``--seed``), samples every triplet with one
compiled, mesh-sharded sampler and scores the results with ``facediff.metrics``:

* ID: identity retrieval top-1 accuracy: the result's identity embedding (the
  training set's first identity field, e.g. the real dlib recogniser) against a
  gallery of every record's stored embedding, labelled by person (the first path
  component of the record key, as the demo and folder exports name them); correct
  when the top match is the identity source's person. ID-cos: mean cosine to the
  identity source's stored embedding.
* Exp: Euclidean distance between the result's expression embedding (the training
  set's expression field, e.g. fer) and the expression source's stored one.
* Pose: mean absolute yaw/pitch/roll difference (degrees) between the result and the
  background (whose pose the result must keep), from 68 landmarks (dlib's predictor on
  the result inside the background's landmark box; the background's stored landmarks)
  through solvePnP on a generic 3D face (``metrics.head_pose``).
* MSE, PSNR, SSIM against the background for ``reconstruct`` (the result should
  reproduce it); LPIPS too with ``--lpips_vgg16`` (a torchvision VGG16 state dict; the
  linear heads are the lpips package's).
* LMD: mean distance in pixels between the 68 landmarks found on the result and the
  background's stored ones.
* FID with ``--inception`` (pytorch-fid's FID Inception weights): each task's results
  against the real images of the evaluation set (every record).

Writes ``OUT/evaluation.json`` and ``OUT/evaluation.md`` (default OUT: the workdir), and
with ``--save_samples`` each task's results as ``OUT/samples/<task>.npz``.
Defaults to the workdir's held-out demo set when it has one, else its training set.

TGDM workdirs (``model.name == "tgdm"``) go to ``launch.tgdm_evaluation``: TGDM Tab. 1
(reenact: same- and cross-identity pairs) or Tab. 4 (swap) with ``--num`` pairs per
setting; ``--tasks`` and ``--save_samples`` do not apply, and the sampler is the
config's unless ``--method`` / ``--steps`` are given. ``--inception`` adds FID,
``--lpips_vgg16`` gives LPIPS its VGG16 trunk (default: the config's; else a random
trunk, said in the table); ``--weights d3dfr=PATH --weights d3dfr_lm3d=PATH`` add Exp /
Angle, ``--weights id_curricularface=PATH`` ID-C, ``--weights id_arcface=PATH`` ID-A;
``--protocol ffpp`` evaluates a swap workdir on the FaceForensics++ pairs of ``--data``
(its export by ``data_pipelines.protocols.ffpp``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app, flags

from launch import evaluation

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir (launch.train / launch.main).")
_DATA = flags.DEFINE_string("data", None, "Evaluation dataset (default: held-out or training).")
_TASKS = flags.DEFINE_list("tasks", list(evaluation.TASKS), "Tasks to evaluate.")
_NUM = flags.DEFINE_integer("num", 64, "Triplets per task.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (a multiple of the device count).")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps.")
_METHOD = flags.DEFINE_enum("method", "pndm", ("pndm", "ddim", "ddpm"), "Sampler.")
_SEED = flags.DEFINE_integer("seed", 0, "Triplet and noise seed.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: the workdir).")
_INCEPTION = flags.DEFINE_string(
  "inception", None, "pytorch-fid's FID Inception weights (.pth): adds FID."
)
_LPIPS_VGG16 = flags.DEFINE_string(
  "lpips_vgg16", None, "torchvision VGG16 state dict: adds LPIPS to reconstruct."
)
_SAVE_SAMPLES = flags.DEFINE_bool("save_samples", False, "Write OUT/samples/<task>.npz.")
_WEIGHTS = flags.DEFINE_multi_string(
  "weights",
  [],
  "TGDM: NAME=PATH of a metric network (d3dfr, d3dfr_lm3d, id_curricularface, "
  "id_arcface, id_dlib).",
)
_PROTOCOL = flags.DEFINE_enum(
  "protocol", "", ["", "ffpp"], "TGDM swap: the pairs of --data's protocol export."
)


def fid_hook(path: str, batch: int = 50):
  """The FID features of launch.tgdm_evaluation (``fid_features``): the FID Inception
  of ``path`` (pytorch-fid's weights) through ``metrics.inception_features``."""
  import numpy as np

  from facediff import metrics
  from facediff.convert import inception as inception_convert

  config, params = inception_convert.load(path)
  return lambda images: metrics.inception_features(params, np.asarray(images), config, batch)


def main_tgdm() -> None:
  from data_pipelines.protocols import pairs as pairs_lib
  from launch import inference, tgdm_evaluation

  weights = {}
  for item in _WEIGHTS.value:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      sys.exit(f"launch.evaluate: --weights {item!r}: expected NAME=PATH")
    weights[name] = path
  try:
    options = tgdm_evaluation.Options(
      data=_DATA.value,
      num=_NUM.value,
      batch=_BATCH.value,
      method=_METHOD.value if _METHOD.present else None,
      steps=_STEPS.value if _STEPS.present else None,
      seed=_SEED.value,
      weights=weights,
      lpips_vgg16=_LPIPS_VGG16.value,
      protocol=_PROTOCOL.value,
      fid_features=fid_hook(_INCEPTION.value) if _INCEPTION.value else None,
    )
    report, _ = tgdm_evaluation.evaluate(_WORKDIR.value, options)
  except (
    inference.SampleError,
    pairs_lib.PairsError,
    FileNotFoundError,
    KeyError,
    ValueError,
  ) as e:
    sys.exit(f"launch.evaluate: {e}")
  tgdm_evaluation.write(_OUT.value or _WORKDIR.value, report)


def main(argv: Sequence[str]) -> None:
  from launch import cli  # one-line answers to flag mistakes

  cli.no_extra_arguments("launch.evaluate", argv)
  if not _WORKDIR.value:
    sys.exit(cli.fail("launch.evaluate", "--workdir is required"))
  from launch import inference

  try:
    name = inference.read_config(_WORKDIR.value).get("model", {}).get("name")
  except inference.SampleError as e:
    sys.exit(f"launch.evaluate: {e}")
  if name == "tgdm":
    return main_tgdm()
  bad = [t for t in _TASKS.value if t not in evaluation.TASKS]
  if bad:
    sys.exit(f"launch.evaluate: --tasks {bad}: unknown (one of {evaluation.TASKS})")
  out = _OUT.value or _WORKDIR.value
  try:
    config, step, data, results = evaluation.evaluate(
      _WORKDIR.value,
      _DATA.value,
      _TASKS.value,
      _NUM.value,
      _BATCH.value,
      _STEPS.value,
      _METHOD.value,
      _SEED.value,
      inception=_INCEPTION.value,
      lpips_vgg16=_LPIPS_VGG16.value,
      samples_dir=os.path.join(out, "samples") if _SAVE_SAMPLES.value else None,
    )
  except (inference.SampleError, FileNotFoundError, KeyError, ValueError) as e:
    sys.exit(f"launch.evaluate: {e}")
  os.makedirs(out, exist_ok=True)
  name = f"facediff {config.get('variant', '')} @ {step}"
  md = evaluation.markdown(name, results)
  with open(os.path.join(out, "evaluation.json"), "w") as f:
    json.dump({"workdir": _WORKDIR.value, "data": data, "step": step, "results": results}, f)
  with open(os.path.join(out, "evaluation.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  from launch import cli

  app.run(main, flags_parser=cli.flags_parser("launch.evaluate", ()))
