"""The 135 fine-grained expression words of DiffSFSR and reference-image retrieval.

DiffSFSR (Sec. 4 and the appendix) controls expression with a word from the 135
emotion terms of Shaver et al. (1987); a reference expression image is drawn at
random from the images labelled with that word, and its expression embedding
conditions the model. ``facediff/assets/expressions_135.txt`` holds the words in
alphabetical order: line N is label N (1-based), as printed in the paper's appendix
(9 amusement, 10 anger, 111 sadness, 132 worry).

This module has no torch or JAX dependency: the trainer and the sampler import it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

ASSET = os.path.join(os.path.dirname(__file__), "assets", "expressions_135.txt")
NUM_EXPRESSIONS = 135


class UnknownExpressionError(KeyError):
  """An expression word or label outside the 135-word vocabulary."""

  def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
    return str(self.args[0]) if self.args else ""


def load_vocabulary(path: str = ASSET) -> tuple[str, ...]:
  """Reads the vocabulary file: one word per line, line N = label N."""
  try:
    with open(path, encoding="utf-8") as f:
      words = tuple(line.strip().lower() for line in f if line.strip())
  except OSError as e:
    raise FileNotFoundError(f"{path}: cannot read the expression vocabulary ({e})") from e
  if len(set(words)) != len(words):
    dup = sorted({w for w in words if words.count(w) > 1})
    raise ValueError(f"{path}: duplicate expression word(s) {dup}")
  return words


class Vocabulary:
  """Word <-> label (1-based) mapping over the expression vocabulary."""

  def __init__(self, words: Sequence[str] | None = None, *, source: str = ASSET):
    self.words = tuple(words) if words is not None else load_vocabulary(source)
    self.source = source if words is None else "<given words>"
    self._label = {w: i + 1 for i, w in enumerate(self.words)}

  def __len__(self) -> int:
    return len(self.words)

  def __contains__(self, word: str) -> bool:
    return _norm(word) in self._label

  def closest(self, word: str, n: int = 5) -> list[str]:
    """The vocabulary words closest to ``word`` (difflib ratio)."""
    return difflib.get_close_matches(_norm(word), self.words, n=n, cutoff=0.5)

  def label(self, word: str) -> int:
    """1-based label of ``word``; unknown words raise, naming the closest words."""
    w = _norm(word)
    if w in self._label:
      return self._label[w]
    close = self.closest(w)
    hint = f"; closest: {', '.join(close)}" if close else "; no close match"
    raise UnknownExpressionError(
      f"unknown expression {word!r} (not among the {len(self)} words of {self.source}){hint}"
    )

  def word(self, label: int) -> str:
    """Word of a 1-based label."""
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
      raise TypeError(f"expression label must be an int, got {type(label).__name__}")
    if not 1 <= int(label) <= len(self):
      raise UnknownExpressionError(
        f"expression label {label} out of range 1..{len(self)} ({self.source})"
      )
    return self.words[int(label) - 1]


_DEFAULT: Vocabulary | None = None


def vocabulary() -> Vocabulary:
  """The shipped 135-word vocabulary (read once)."""
  global _DEFAULT
  if _DEFAULT is None:
    _DEFAULT = Vocabulary()
    if len(_DEFAULT) != NUM_EXPRESSIONS:
      raise ValueError(f"{ASSET}: {len(_DEFAULT)} words, expected {NUM_EXPRESSIONS}")
  return _DEFAULT


def word_to_label(word: str) -> int:
  return vocabulary().label(word)


def label_to_word(label: int) -> str:
  return vocabulary().word(label)


def _norm(word: str) -> str:
  if not isinstance(word, str):
    raise TypeError(f"expression word must be a str, got {type(word).__name__}")
  return " ".join(word.strip().lower().split())


class ExpressionIndex:
  """Label -> image ids of a labelled dataset, for DiffSFSR's reference retrieval.

  "a reference expression image is randomly selected from the corresponding
  category according to the input expression text" (DiffSFSR Sec. 4).
  """

  def __init__(self, by_label: Mapping[int, Sequence[Any]], vocab: Vocabulary | None = None):
    self.vocab = vocab or vocabulary()
    self.by_label: dict[int, tuple[Any, ...]] = {}
    for label, ids in by_label.items():
      self.vocab.word(int(label))  # range check, clear error
      ids = tuple(ids)
      if ids:
        self.by_label[int(label)] = ids

  @classmethod
  def from_labels(
    cls, labels: Mapping[Any, Any] | Iterable[tuple[Any, Any]], vocab: Vocabulary | None = None
  ) -> "ExpressionIndex":
    """Builds from ``image_id -> label`` (int label or word), e.g. a dataset's
    annotation file or the ``expression`` field read from a manifest's records."""
    vocab = vocab or vocabulary()
    items = labels.items() if isinstance(labels, Mapping) else labels
    by_label: dict[int, list[Any]] = {}
    for image_id, lab in items:
      if isinstance(lab, bytes):
        lab = lab.decode()
      if isinstance(lab, str):
        lab = vocab.label(lab)
      else:
        lab = int(np.asarray(lab).reshape(()))
        vocab.word(lab)
      by_label.setdefault(lab, []).append(image_id)
    return cls({k: sorted(v, key=str) for k, v in by_label.items()}, vocab)

  @classmethod
  def from_records(
    cls,
    records: Iterable[Mapping[str, Any]],
    *,
    field: str = "expression",
    id_field: str = "id",
    vocab: Vocabulary | None = None,
  ) -> "ExpressionIndex":
    """Builds from decoded shard records carrying a label field and an id field;
    a record without either field raises, naming it."""
    pairs = []
    for i, rec in enumerate(records):
      for k in (field, id_field):
        if k not in rec:
          raise KeyError(f"record {i}: no field {k!r} (has {sorted(rec)})")
      img_id = rec[id_field]
      pairs.append((img_id.decode() if isinstance(img_id, bytes) else img_id, rec[field]))
    return cls.from_labels(pairs, vocab)

  def labels(self) -> list[int]:
    return sorted(self.by_label)

  def ids(self, word_or_label: str | int) -> tuple[Any, ...]:
    label = (
      self.vocab.label(word_or_label) if isinstance(word_or_label, str) else int(word_or_label)
    )
    self.vocab.word(label)
    if label not in self.by_label:
      raise KeyError(
        f"expression {self.vocab.word(label)!r} (label {label}) has no "
        f"image in this dataset; it has {len(self.by_label)} labels"
      )
    return self.by_label[label]

  def sample(self, word_or_label: str | int, rng: np.random.Generator | int) -> Any:
    """A reference image id drawn uniformly from the word's images, seeded."""
    if not isinstance(rng, np.random.Generator):
      rng = np.random.default_rng(rng)
    ids = self.ids(word_or_label)
    return ids[int(rng.integers(len(ids)))]
