"""Keras reference for fer's expression CNN, run as its own process by test_fer_flax.py.

    KERAS_BACKEND=jax python tests/_keras_fer.py MODEL.hdf5 IN.npz OUT.npz

Loads the Keras file with Keras 3 (``load_model(compile=False)``, its legacy HDF5
reader), scales IN.npz's ``grey`` (B, 64, 64, 1) in [0, 255] as fer does,
``(x / 255 - 0.5) * 2``, and writes to OUT.npz the model's softmax (``probs``), the
global average pooling before it (``logits``) and the global average of the input of
the classifier conv (``feature``). Keras must be imported after KERAS_BACKEND is set,
hence the separate process.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def main(model_path: str, in_path: str, out_path: str) -> None:
  if keras.backend.backend() != "jax":
    raise SystemExit(f"expected the jax backend, got {keras.backend.backend()}")
  model = keras.models.load_model(model_path, compile=False)
  gap = next(ly for ly in model.layers if isinstance(ly, keras.layers.GlobalAveragePooling2D))
  head = next(ly for ly in model.layers if ly.output is gap.input)  # the classifier conv
  sub = keras.Model(model.inputs[0], [model.outputs[0], gap.output, head.input])
  grey = np.load(in_path)["grey"].astype(np.float32)
  x = (grey / 255.0 - 0.5) * 2.0
  probs, logits, last_block = sub.predict(x, batch_size=len(x), verbose=0)
  np.savez(
    out_path,
    probs=probs,
    logits=logits,
    feature=last_block.mean(axis=(1, 2)),
    head=np.array(head.name),
    num_params=np.array(model.count_params()),
    num_layers=np.array(len(model.layers)),
  )


if __name__ == "__main__":
  main(*sys.argv[1:4])
