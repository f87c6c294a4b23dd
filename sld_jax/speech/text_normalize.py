"""Transcript normalisation and the SentencePiece text model.

``normalize_transcript`` lower-cases, turns punctuation and symbols into
spaces (apostrophes inside or at the edge of words stay), and collapses
whitespace::

  "He was NOT an ill-disposed young man."  ->  "he was not an ill disposed young man"
  "It's 'quoted' -- isn't it?"             ->  "it's 'quoted' isn't it"

``train_text_model`` trains the text vocabulary with pad_id=0, eos_id=1,
unk_id=2 and no BOS, which is exactly ``sld_jax.vocab.VocabLayout``'s text
block (0 PAD, 1 EOS = <text_end>, 2 UNK), so the model's ids are the text ids.
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import Iterable

from absl import logging
import sentencepiece as spm

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'",
                              "`": "'"})
_SPACES = re.compile(r"\s+")


def _is_punctuation_or_symbol(char: str) -> bool:
  return unicodedata.category(char)[0] in ("P", "S") and char != "'"


def normalize_transcript(text: str) -> str:
  """Lower-case, punctuation (except apostrophes) to spaces, single spaces."""
  text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
  text = "".join(" " if _is_punctuation_or_symbol(c) else c for c in text)
  words = [w for w in _SPACES.split(text) if w and w.strip("'")]
  return " ".join(words)


MODEL_TYPES = ("unigram", "word", "bpe", "char")


def train_text_model(transcripts: Iterable[str], vocab_size: int,
                     model_prefix: str, model_type: str = "unigram", *,
                     character_coverage: float = 1.0,
                     hard_vocab_limit: bool = False,
                     num_threads: int | None = None) -> str:
  """Trains a SentencePiece model over (normalised) transcripts.

  Ids: 0 ``<pad>``, 1 ``</s>`` (= <text_end>), 2 ``<unk>``, no BOS; the text
  is used as given (identity normalisation; run ``normalize_transcript``
  first). With ``hard_vocab_limit=False`` a small corpus may give fewer pieces
  than asked (logged); use the model's piece count as ``text_size``.

  Returns:
    The path of the ``.model`` file.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type must be one of {MODEL_TYPES}, got "
                     f"{model_type!r}")
  sentences = []
  for i, text in enumerate(transcripts):
    if not text or not text.strip():
      raise ValueError(f"train_text_model: transcript {i} is empty")
    sentences.append(text)
  if not sentences:
    raise ValueError("train_text_model: no transcripts given")
  longest = max(len(s.encode("utf-8")) for s in sentences)
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_prefix=model_prefix,
      model_type=model_type,
      vocab_size=vocab_size,
      hard_vocab_limit=hard_vocab_limit,
      character_coverage=character_coverage,
      normalization_rule_name="identity",
      byte_fallback=False,
      max_sentence_length=max(4192, longest + 16),
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      num_threads=num_threads or min(16, os.cpu_count() or 1),
      minloglevel=2)
  path = model_prefix + ".model"
  size = spm.SentencePieceProcessor(model_file=path).get_piece_size()
  if size != vocab_size:
    logging.warning("text model %s: asked for %d pieces, got %d; use "
                    "text_size=%d", path, vocab_size, size, size)
  return path
