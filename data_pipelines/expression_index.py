"""Expression indexes from exported datasets, for DiffSFSR's reference retrieval.

The vocabulary and the index type live in ``facediff.expressions`` (the sampler needs
them); reading an exported dataset to fill one is the data pipeline's job.
"""

from __future__ import annotations

import os

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
