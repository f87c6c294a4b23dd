"""WER/CER and the S/D/I split against jiwer 4.0 called directly."""

from __future__ import annotations

import dataclasses
import random

import jiwer
import pytest

from sld_jax import wer as wer_lib

_WORDS = ["zero", "one", "two", "three", "oh", "four", "a", "the", "cat", ""]


def _random_text(rng: random.Random, max_words: int) -> str:
  pieces = [rng.choice(_WORDS) for _ in range(rng.randint(0, max_words))]
  separators = [rng.choice([" ", " ", " ", "  ", "\t "]) for _ in pieces]
  text = "".join(p + s for p, s in zip(pieces, separators))
  if rng.random() < 0.3:
    text = "  " + text
  return text


def test_worked_example():
  counts = wer_lib.word_errors("one two three", "one too three four")
  assert counts == wer_lib.ErrorCounts(hits=2, substitutions=1, deletions=0,
                                       insertions=1)
  assert counts.rate == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(4))
def test_matches_jiwer_on_random_corpora(seed):
  rng = random.Random(seed)
  for _ in range(60):
    size = rng.randint(1, 6)
    refs = [_random_text(rng, 7) for _ in range(size)]
    hyps = [_random_text(rng, 7) for _ in range(size)]
    if not any(wer_lib.words(r) for r in refs):
      refs[0] = "one"  # jiwer's empty-corpus case is tested separately
    assert wer_lib.wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    assert wer_lib.cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))
    jiwer_words = jiwer.process_words(refs, hyps)
    assert wer_lib.corpus_word_errors(refs, hyps) == _jiwer_counts(jiwer_words)
    assert wer_lib.corpus_char_errors(refs, hyps) == _jiwer_counts(
        jiwer.process_characters(refs, hyps))


def _jiwer_counts(output) -> wer_lib.ErrorCounts:
  return wer_lib.ErrorCounts(hits=output.hits,
                             substitutions=output.substitutions,
                             deletions=output.deletions,
                             insertions=output.insertions)


def test_per_utterance_split_matches_jiwer_on_random_pairs():
  """Hits, substitutions, deletions and insertions each equal jiwer's.

  A small vocabulary makes repeated words, and so tied minimum alignments,
  common: 3,000 pairs hold hundreds of ties that a different tie-break splits
  differently (the sum S + D + I alone would not notice).
  """
  rng = random.Random(2026)
  vocabulary = ["one", "two", "three", "oh"]
  mismatches = []
  for _ in range(3000):
    ref = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 8)))
    hyp = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 8)))
    if wer_lib.word_errors(ref, hyp) != _jiwer_counts(
        jiwer.process_words(ref, hyp)):
      mismatches.append((ref, hyp))
    if wer_lib.char_errors(ref, hyp) != _jiwer_counts(
        jiwer.process_characters(ref, hyp)):
      mismatches.append(("chars", ref, hyp))
  assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("ref,hyp,expected", [
    # (hits, substitutions, deletions, insertions), as jiwer 4.0 splits them.
    ("one two", "two one", (1, 0, 1, 1)),
    ("one two three", "two three one", (2, 0, 1, 1)),
    ("a b", "b c", (0, 2, 0, 0)),
    ("a a b", "b a a", (2, 0, 1, 1)),
    ("a b c d", "d c b a", (1, 2, 1, 1)),
    ("a b c", "c a b", (2, 0, 1, 1)),
    ("a b", "b a b", (2, 0, 0, 1)),
    ("x y", "y y x", (1, 1, 0, 1)),
    ("one", "two one", (1, 0, 0, 1)),
    ("one two", "", (0, 0, 2, 0)),
])
def test_tied_alignments_split_like_jiwer(ref, hyp, expected):
  theirs = _jiwer_counts(jiwer.process_words(ref, hyp))
  assert wer_lib.word_errors(ref, hyp) == theirs
  assert tuple(dataclasses.astuple(theirs)) == expected


def test_align_counts_takes_any_hashable_tokens():
  assert wer_lib.align_counts([1, (2, 3)], [(2, 3), 1]) == wer_lib.ErrorCounts(
      hits=1, substitutions=0, deletions=1, insertions=1)
  assert wer_lib.align_counts([], []) == wer_lib.ErrorCounts()


@pytest.mark.parametrize("refs,hyps", [
    ([""], [""]),
    ([""], ["one two three"]),
    (["", "  "], ["x", "y z"]),
    (["one two"], [""]),
    (["", "one two"], ["five", ""]),
    (["a b c"], ["   "]),
])
def test_empty_references_and_hypotheses_like_jiwer(refs, hyps):
  assert wer_lib.wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
  assert wer_lib.cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))


def test_empty_reference_counts_insertions():
  assert wer_lib.wer([""], ["one two three"]) == 3.0
  assert wer_lib.wer([""], [""]) == 0.0


def test_mismatched_lengths_raise():
  with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
    wer_lib.wer(["a", "b"], ["a"])
  with pytest.raises(TypeError, match="single string"):
    wer_lib.wer("a b", "a b")
