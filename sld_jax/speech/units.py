"""Speech unit post-processing: repeat merging and unit pieces.

Unit pieces are SentencePiece (unigram) subwords over unit sequences, as in
the paper (2000 k-means units -> 6000 pieces). Unit ``u`` is written as the
character ``chr(256 + u)``, so a unit sequence becomes a string::

  units   [3, 3, 17, 0]
  text    "\u0103\u0103\u0111\u0100"
  pieces  ["\u0103\u0103", "\u0111\u0100"]  ->  piece ids e.g. [412, 1337]

Piece ids are speech ids. The trained model has exactly one special piece,
``<unk>`` at id 0, and no PAD/BOS/EOS: every unit 0..K-1 is forced into the
character set (``required_chars``), so ``<unk>`` is never emitted for a valid
unit (``encode`` rejects units outside [0, K) before SentencePiece sees them).
Hence every emitted piece id lies in [1, num_pieces), and
``speech_size = num_pieces`` is a valid ``VocabLayout.speech_size`` (id 0 is a
never-used slot). ``decode`` rejects id 0 and ids >= num_pieces.

The SentencePiece settings that make this work: identity normalisation (NFKC
would rewrite some of these code points), no dummy prefix, no whitespace /
unicode-script / number splitting (the characters span Latin, Greek, Cyrillic,
Hebrew and Arabic blocks), byte fallback off, character coverage 1.0, and a
``max_sentence_length`` large enough for the longest utterance (SentencePiece
otherwise skips long lines).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

UNIT_CHAR_OFFSET = 256
# chr(256 + u) must stay below the UTF-16 surrogates (U+D800).
MAX_NUM_UNITS = 0xD800 - UNIT_CHAR_OFFSET


def merge_repeats(units: Sequence[int] | np.ndarray,
                  return_counts: bool = False):
  """Collapses runs of equal consecutive units.

  >>> merge_repeats([5, 5, 5, 2, 2, 5])
  array([5, 2, 5], dtype=int32)
  >>> merge_repeats([5, 5, 5, 2, 2, 5], return_counts=True)[1]
  array([3, 2, 1], dtype=int32)
  """
  units = np.asarray(units)
  if units.ndim != 1:
    raise ValueError(f"merge_repeats: expected a 1-D unit sequence, got shape "
                     f"{units.shape}")
  if units.size == 0:
    empty = np.zeros((0,), np.int32)
    return (empty, empty) if return_counts else empty
  starts = np.concatenate([[True], units[1:] != units[:-1]])
  merged = units[starts].astype(np.int32)
  if not return_counts:
    return merged
  boundaries = np.concatenate([np.flatnonzero(starts), [units.size]])
  return merged, np.diff(boundaries).astype(np.int32)


def _check_units(units, num_units: int, where: str) -> np.ndarray:
  units = np.asarray(units)
  if units.ndim != 1:
    raise ValueError(f"{where}: expected a 1-D unit sequence, got shape "
                     f"{units.shape}")
  if units.size and (not np.issubdtype(units.dtype, np.integer)):
    raise ValueError(
        f"{where}: units must be integers, got dtype {units.dtype}")
  if units.size and (units.min() < 0 or units.max() >= num_units):
    bad = units[(units < 0) | (units >= num_units)][0]
    raise ValueError(f"{where}: unit {int(bad)} is outside [0, {num_units})")
  return units


def units_to_text(units: Sequence[int] | np.ndarray) -> str:
  """[3, 17] -> chr(259) + chr(273)."""
  return "".join(chr(UNIT_CHAR_OFFSET + int(u)) for u in units)


def text_to_units(text: str) -> np.ndarray:
  """Inverse of ``units_to_text``; raises on characters below chr(256)."""
  units = np.fromiter((ord(c) - UNIT_CHAR_OFFSET for c in text), np.int32,
                      count=len(text))
  if units.size and units.min() < 0:
    raise ValueError(f"text_to_units: {text!r} has characters that are not "
                     "units (below chr(256))")
  return units


def train_unit_pieces(unit_sequences: Iterable[Sequence[int] | np.ndarray],
                      vocab_size: int, model_prefix: str, *, num_units: int,
                      max_piece_length: int = 16,
                      input_sentence_size: int = 0,
                      num_threads: int | None = None) -> str:
  """Trains a unigram SentencePiece model over unit sequences.

  Args:
    unit_sequences: unit id sequences in [0, num_units) (no merging is done
      here; the paper does not merge repeats before pieces).
    vocab_size: number of pieces including ``<unk>`` (paper: 6000). Must be
      > num_units, since every unit is a piece of its own. With little data
      SentencePiece may stop short of it; the model's ``num_pieces`` is then
      smaller (logged), and that is the speech size to use.
    model_prefix: writes ``model_prefix + ".model"`` and ``".vocab"``.
    num_units: K, the number of k-means clusters.
    max_piece_length: longest piece in units.
    input_sentence_size: if > 0, SentencePiece samples this many sequences.
    num_threads: trainer threads (default: CPU count, at most 16).

  Returns:
    The path of the ``.model`` file.
  """
  if not 1 <= num_units <= MAX_NUM_UNITS:
    raise ValueError(f"num_units must be in [1, {MAX_NUM_UNITS}], got "
                     f"{num_units}")
  if vocab_size <= num_units:
    raise ValueError(
        f"vocab_size ({vocab_size}) must exceed num_units ({num_units}): every "
        "unit is a piece, plus <unk> at id 0")
  sentences = []
  longest = 0
  for i, seq in enumerate(unit_sequences):
    seq = _check_units(seq, num_units, f"unit sequence {i}")
    if seq.size == 0:
      raise ValueError(f"unit sequence {i} is empty")
    text = units_to_text(seq)
    longest = max(longest, len(text.encode("utf-8")))
    sentences.append(text)
  if not sentences:
    raise ValueError("train_unit_pieces: no unit sequences given")
  # SentencePiece drops required characters that never occur once the piece
  # budget is full; a one-unit sentence per unseen unit keeps every unit a
  # piece without adding any multi-unit statistics.
  seen = set("".join(sentences))
  unseen = [chr(UNIT_CHAR_OFFSET + u) for u in range(num_units)
            if chr(UNIT_CHAR_OFFSET + u) not in seen]
  if unseen:
    logging.info("unit pieces: %d of %d units never occur in the training "
                 "sequences; adding each once on its own", len(unseen),
                 num_units)
    sentences.extend(unseen)
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_prefix=model_prefix,
      model_type="unigram",
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      character_coverage=1.0,
      required_chars="".join(chr(UNIT_CHAR_OFFSET + u)
                             for u in range(num_units)),
      byte_fallback=False,
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      split_by_whitespace=False,
      split_by_unicode_script=False,
      split_by_number=False,
      split_digits=False,
      max_sentencepiece_length=max_piece_length,
      max_sentence_length=max(4192, longest + 16),
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True,
      unk_id=0, pad_id=-1, bos_id=-1, eos_id=-1,
      num_threads=num_threads or min(16, os.cpu_count() or 1),
      minloglevel=2)
  path = model_prefix + ".model"
  model = UnitPieceModel(path, num_units=num_units)
  if model.num_pieces < vocab_size:
    logging.warning(
        "unit pieces: asked for %d pieces, SentencePiece produced %d from %d "
        "sequences (too little data); use speech_size=%d", vocab_size,
        model.num_pieces, len(sentences), model.num_pieces)
  return path


class UnitPieceModel:
  """Encodes unit sequences to piece ids and back.

  Attributes:
    num_pieces: size of the piece vocabulary (ids [0, num_pieces); id 0 is
      ``<unk>`` and never emitted), the ``speech_size`` to use.
    num_units: K; units must be in [0, K).
  """

  def __init__(self, model_path: str, num_units: int | None = None):
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"unit piece model not found: {model_path}")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.num_pieces = int(self._sp.get_piece_size())
    if self._sp.unk_id() != 0 or any(
        i >= 0 for i in (self._sp.pad_id(), self._sp.bos_id(),
                         self._sp.eos_id())):
      raise ValueError(f"{model_path} is not a unit piece model (needs unk=0, "
                       "no pad/bos/eos); train it with train_unit_pieces")
    self._piece_units = [None] + [
        text_to_units(self._sp.id_to_piece(i))
        for i in range(1, self.num_pieces)]
    single = [int(p[0]) for p in self._piece_units[1:] if p.size == 1]
    covered = max(single) + 1 if single else 0
    if num_units is None:
      num_units = covered
    elif num_units > covered or sorted(single)[:num_units] != list(
        range(num_units)):
      raise ValueError(f"{model_path} does not cover all units [0, {num_units})"
                       f" as single pieces")
    self.num_units = num_units

  def encode(self, units: Sequence[int] | np.ndarray) -> np.ndarray:
    """Unit sequence [T] -> piece ids [P] (int32, P <= T)."""
    units = _check_units(units, self.num_units, "UnitPieceModel.encode")
    ids = np.asarray(self._sp.encode(units_to_text(units)), np.int32)
    if ids.size and ids.min() == 0:
      raise ValueError("UnitPieceModel.encode produced <unk>; the model does "
                       f"not cover some unit in [0, {self.num_units})")
    return ids

  def encode_batch(self, unit_sequences) -> list[np.ndarray]:
    return [self.encode(u) for u in unit_sequences]

  def decode(self, piece_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Piece ids -> the unit sequence they spell (int32)."""
    piece_ids = np.asarray(piece_ids)
    if piece_ids.size and (piece_ids.min() < 1
                           or piece_ids.max() >= self.num_pieces):
      bad = piece_ids[(piece_ids < 1) | (piece_ids >= self.num_pieces)][0]
      raise ValueError(f"UnitPieceModel.decode: piece id {int(bad)} is not a "
                       f"unit piece (valid: [1, {self.num_pieces}))")
    if piece_ids.size == 0:
      return np.zeros((0,), np.int32)
    return np.concatenate([self._piece_units[int(i)] for i in piece_ids])

  def piece_lengths(self) -> np.ndarray:
    """Units per piece [num_pieces] (0 for <unk>)."""
    return np.array([0] + [p.size for p in self._piece_units[1:]], np.int32)
