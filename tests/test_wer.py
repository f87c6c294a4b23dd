"""WER/CER against jiwer 4.0 (a test-only dependency)."""

from __future__ import annotations

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
    ours = wer_lib.corpus_word_errors(refs, hyps)
    assert ours.errors == (jiwer_words.substitutions + jiwer_words.deletions
                           + jiwer_words.insertions)
    assert ours.reference_length == (jiwer_words.hits + jiwer_words.substitutions
                                     + jiwer_words.deletions)


def test_per_utterance_counts_match_jiwer_distance():
  rng = random.Random(7)
  for _ in range(200):
    ref, hyp = _random_text(rng, 9), _random_text(rng, 9)
    ours = wer_lib.word_errors(ref, hyp)
    theirs = jiwer.process_words(ref, hyp)
    assert ours.errors == (theirs.substitutions + theirs.deletions
                           + theirs.insertions)
    assert ours.reference_length == len(wer_lib.words(ref))


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


def test_wer_metric_in_percent_and_accepts_bytes():
  metrics = wer_lib.wer_metric([b"one two", "three four"],
                               ["one", b"three four"])
  assert metrics["wer"] == pytest.approx(25.0)
  assert metrics["cer"] == pytest.approx(
      100 * jiwer.cer(["one two", "three four"], ["one", "three four"]))


def test_mismatched_lengths_raise():
  with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
    wer_lib.wer(["a", "b"], ["a"])
  with pytest.raises(TypeError, match="single string"):
    wer_lib.wer("a b", "a b")
