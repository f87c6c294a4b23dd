"""Tests for sld_jax.speech.units and sld_jax.speech.text_normalize."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm

from sld_jax import vocab
from sld_jax.speech import text_normalize
from sld_jax.speech import units as units_lib

NUM_UNITS = 2000  # the paper's K; spans Latin..Arabic code points


def test_merge_repeats():
  np.testing.assert_array_equal(units_lib.merge_repeats([5, 5, 5, 2, 2, 5]),
                                [5, 2, 5])
  merged, counts = units_lib.merge_repeats(np.array([1, 1, 0]),
                                           return_counts=True)
  np.testing.assert_array_equal(merged, [1, 0])
  np.testing.assert_array_equal(counts, [2, 1])
  assert units_lib.merge_repeats([]).shape == (0,)
  assert units_lib.merge_repeats([7]).tolist() == [7]
  with pytest.raises(ValueError, match="1-D"):
    units_lib.merge_repeats(np.zeros((2, 2), int))


def test_units_text_round_trip():
  units = np.array([0, 1999, 3, 3])
  text = units_lib.units_to_text(units)
  assert text == chr(256) + chr(2255) + chr(259) * 2
  np.testing.assert_array_equal(units_lib.text_to_units(text), units)
  with pytest.raises(ValueError, match="not units"):
    units_lib.text_to_units("abc")


def _unit_corpus(seed=0, num_sequences=1500):
  """Sequences built from recurring motifs (like units of recurring sounds)."""
  motif_rng = np.random.default_rng(0)
  motifs = [motif_rng.integers(0, NUM_UNITS, size=motif_rng.integers(2, 7))
            for _ in range(2500)]
  rng = np.random.default_rng(seed)
  seqs = [np.concatenate([motifs[j] for j in rng.integers(0, len(motifs), 30)])
          for _ in range(num_sequences)]
  seqs.append(rng.integers(0, NUM_UNITS, size=3000))  # longer than 4192 bytes
  return seqs


@pytest.fixture(scope="module")
def piece_model(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("pieces") / "units")
  path = units_lib.train_unit_pieces(_unit_corpus(), 4000, prefix,
                                     num_units=NUM_UNITS, num_threads=2)
  return units_lib.UnitPieceModel(path)


def test_unit_pieces_round_trip_and_id_range(piece_model):
  assert piece_model.num_units == NUM_UNITS
  assert NUM_UNITS < piece_model.num_pieces <= 4000
  layout = vocab.VocabLayout(text_size=100, speech_size=piece_model.num_pieces)
  held_out = _unit_corpus(seed=1, num_sequences=30)[:-1]
  for seq in held_out + [np.arange(NUM_UNITS), np.array([17])]:
    ids = piece_model.encode(seq)
    assert ids.dtype == np.int32
    assert ids.min() >= 1 and ids.max() < piece_model.num_pieces
    layout.units_to_ids(ids)  # valid speech ids
    np.testing.assert_array_equal(piece_model.decode(ids), seq)
  # Pieces learned the motifs: new sequences of known motifs get much shorter.
  total_units = sum(len(seq) for seq in held_out)
  total_pieces = sum(len(piece_model.encode(seq)) for seq in held_out)
  assert total_pieces < 0.6 * total_units
  assert piece_model.piece_lengths()[0] == 0
  assert piece_model.piece_lengths().max() <= 16


def test_unit_piece_errors(piece_model, tmp_path):
  with pytest.raises(ValueError, match=r"unit 2000 is outside \[0, 2000\)"):
    piece_model.encode([1, 2000])
  with pytest.raises(ValueError, match="piece id 0 is not a unit piece"):
    piece_model.decode([0])
  with pytest.raises(ValueError, match="is not a unit piece"):
    piece_model.decode([piece_model.num_pieces])
  with pytest.raises(ValueError, match="must exceed num_units"):
    units_lib.train_unit_pieces([[1, 2]], 10, str(tmp_path / "m"), num_units=10)
  with pytest.raises(ValueError, match=r"unit sequence 1: unit 12 is outside"):
    units_lib.train_unit_pieces([[1, 2], [12]], 50, str(tmp_path / "m"),
                                num_units=10)
  with pytest.raises(ValueError, match="unit sequence 0 is empty"):
    units_lib.train_unit_pieces([[]], 50, str(tmp_path / "m"), num_units=10)
  with pytest.raises(FileNotFoundError, match="nope.model"):
    units_lib.UnitPieceModel(str(tmp_path / "nope.model"))


def test_unit_pieces_cover_units_missing_from_training(tmp_path):
  # Units 5..9 never occur in training but must still encode (required_chars).
  seqs = [[0, 1, 2, 3, 4] * 20, [4, 3, 2, 1, 0] * 20, [0, 0, 1, 1] * 20]
  path = units_lib.train_unit_pieces(seqs, 30, str(tmp_path / "small"),
                                     num_units=10, num_threads=1)
  model = units_lib.UnitPieceModel(path)
  assert model.num_units == 10
  for seq in ([9, 8, 7, 6, 5], [0, 1, 2, 3, 4, 9]):
    ids = model.encode(seq)
    assert ids.min() >= 1
    np.testing.assert_array_equal(model.decode(ids), seq)
  text_model = text_normalize.train_text_model(
      ["a b c a b c"] * 5, 10, str(tmp_path / "text"), "char")
  with pytest.raises(ValueError, match="not a unit piece model"):
    units_lib.UnitPieceModel(text_model)


@pytest.mark.parametrize("raw,expected", [
    ("He was NOT an ill-disposed young man.", "he was not an ill disposed young man"),
    ("It\u2019s 'quoted' -- isn't it?  ", "it's 'quoted' isn't it"),
    ("MISTER JOHN DASHWOOD", "mister john dashwood"),
    ("  ... ' !", ""),
])
def test_normalize_transcript(raw, expected):
  assert text_normalize.normalize_transcript(raw) == expected


TRANSCRIPTS = [
    "and mister john dashwood had then leisure to consider how much there "
    "might be prudently in his power to do for them",
    "he was not an ill disposed young man",
    "unless to be rather cold hearted and rather selfish is to be ill disposed",
    "had he married a more amiable woman he might have been made still more "
    "respectable than he was",
    "he might even have been made amiable himself",
]


@pytest.mark.parametrize("model_type", text_normalize.MODEL_TYPES)
def test_train_text_model_matches_vocab_layout(tmp_path, model_type):
  path = text_normalize.train_text_model(TRANSCRIPTS * 4, 70,
                                         str(tmp_path / model_type), model_type)
  sp = spm.SentencePieceProcessor(model_file=path)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (
      vocab.PAD_ID, vocab.EOS_ID, vocab.UNK_ID, -1)
  for text in TRANSCRIPTS:
    ids = sp.encode(text)
    assert min(ids) > vocab.UNK_ID
    assert sp.decode(ids) == text


def test_train_text_model_errors(tmp_path):
  with pytest.raises(ValueError, match="model_type"):
    text_normalize.train_text_model(TRANSCRIPTS, 50, str(tmp_path / "m"), "wordpiece")
  with pytest.raises(ValueError, match="transcript 1 is empty"):
    text_normalize.train_text_model(["a b", " "], 50, str(tmp_path / "m"))
