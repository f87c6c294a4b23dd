"""sld_jax.comparison.statistics against naive NumPy/SciPy on fabricated errors,
and the stopping rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from sld_jax.comparison import statistics
from sld_jax.comparison import stopping

SEEDS, UTTERANCES = 5, 400


def _fabricate(shift: float, seed: int = 0):
  """Per-utterance word errors of two methods; B makes ``shift`` more errors
  per utterance on average, and each seed has its own offset."""
  rng = np.random.default_rng(seed)
  words = rng.integers(2, 8, UTTERANCES)
  difficulty = rng.uniform(0.0, 0.3, UTTERANCES)
  seed_offsets = rng.normal(0.0, 0.02, (SEEDS, 1))
  rate_a = np.clip(difficulty + seed_offsets, 0, 1)
  errors_a = rng.binomial(words, rate_a)
  errors_b = rng.binomial(words, np.clip(rate_a + shift, 0, 1))
  return errors_a, errors_b, words


def _naive_utterance_bootstrap(errors_a, errors_b, words, resamples, rng):
  stats = []
  for _ in range(resamples):
    index = rng.integers(0, words.size, words.size)
    stats.append(100 * (errors_a[:, index].sum() - errors_b[:, index].sum()) /
                 (errors_a.shape[0] * words[index].sum()))
  return np.percentile(stats, [2.5, 97.5])


def _naive_two_level_bootstrap(errors_a, errors_b, words, resamples, rng):
  stats = []
  for _ in range(resamples):
    seeds = rng.integers(0, errors_a.shape[0], errors_a.shape[0])
    index = rng.integers(0, words.size, words.size)
    a, b = errors_a[seeds][:, index], errors_b[seeds][:, index]
    stats.append(100 * (a.sum() - b.sum()) / (len(seeds) * words[index].sum()))
  return np.percentile(stats, [2.5, 97.5])


def test_worked_example_of_the_docstring():
  errors_a = np.array([[1, 0, 2], [0, 0, 1]])
  errors_b = np.array([[1, 1, 2], [1, 0, 2]])
  words = np.array([3, 4, 5])
  assert statistics.wer_difference(errors_a, errors_b, words) == pytest.approx(-12.5)
  sign = statistics.sign_test(errors_a, errors_b, words)
  assert (sign.better, sign.worse, sign.ties) == (3, 0, 0)
  assert sign.p_value == pytest.approx(0.25)   # 2 * 0.5**3


@pytest.mark.parametrize("shift", [0.0, 0.05])
def test_bootstraps_match_naive_loops(shift):
  errors_a, errors_b, words = _fabricate(shift)
  pooled = 100 * (errors_a.sum() - errors_b.sum()) / (SEEDS * words.sum())
  utterance = statistics.paired_bootstrap(errors_a, errors_b, words, seed=1, resamples=4000)
  naive = _naive_utterance_bootstrap(errors_a, errors_b, words, 4000,
                                     np.random.default_rng(2))
  assert utterance.estimate == pytest.approx(pooled)
  # Two Monte Carlo estimates of the same percentiles: within ~0.15 points here.
  np.testing.assert_allclose([utterance.low, utterance.high], naive, atol=0.15)
  assert utterance.low < pooled < utterance.high

  both = statistics.seed_and_utterance_bootstrap(errors_a, errors_b, words, seed=1,
                                                 resamples=4000)
  naive_both = _naive_two_level_bootstrap(errors_a, errors_b, words, 4000,
                                          np.random.default_rng(3))
  assert both.estimate == pytest.approx(pooled)
  np.testing.assert_allclose([both.low, both.high], naive_both, atol=0.2)
  # Resampling seeds too can only widen the interval (up to Monte Carlo noise).
  assert both.high - both.low >= utterance.high - utterance.low - 0.05
  # A 5-point shift is detected; no shift is not.
  assert utterance.excludes_zero() == (shift > 0)
  assert utterance.high < 0 if shift > 0 else True


def test_pooled_wer_interval_of_one_method():
  errors_a, _, words = _fabricate(0.0)
  interval = statistics.pooled_wer_interval(errors_a, words, seed=0, resamples=2000)
  assert interval.estimate == pytest.approx(100 * errors_a.sum() / (SEEDS * words.sum()))
  assert interval.low < interval.estimate < interval.high


def test_sign_test_matches_the_binomial_sum():
  errors_a, errors_b, words = _fabricate(0.02, seed=4)
  difference = (errors_a - errors_b).sum(0)
  better, worse = int((difference < 0).sum()), int((difference > 0).sum())
  n = better + worse
  tail = sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2 ** n
  sign = statistics.sign_test(errors_a, errors_b, words)
  assert (sign.better, sign.worse, sign.ties) == (better, worse, UTTERANCES - n)
  assert sign.p_value == pytest.approx(min(1.0, 2 * tail), rel=1e-9)
  assert sign.p_value == pytest.approx(scipy.stats.binomtest(better, n).pvalue)
  same = statistics.sign_test(errors_a, errors_a, words)
  assert (same.better, same.worse, same.p_value) == (0, 0, 1.0)


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match=r"two \[seeds, utterances\] error matrices"):
    statistics.paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 3)), np.ones(3))
  with pytest.raises(ValueError, match="one reference length per utterance"):
    statistics.paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(4))


def test_stopping_rule_of_the_docstring():
  curve = [(100, 30.0), (200, 21.0), (300, 22.5), (400, 21.0), (500, 24.0)]
  decision = stopping.decide(curve, 500, 3000, patience=3)
  assert (decision.done, decision.selected, decision.best_wer) == (True, 200, 21.0)
  assert "did not improve for 3 evaluations after step 200" in decision.reason
  assert not stopping.decide(curve[:4], 400, 3000, patience=3).done
  assert not stopping.decide(curve, 500, 3000, patience=0).done
  at_budget = stopping.decide(curve[:2], 200, 200, patience=3)
  assert at_budget.done and "still improving at the budget" in at_budget.reason
  assert stopping.dev_curve([{"step": 2, "dev/wer": 5.0}, {"step": 1, "dev/wer": 7},
                             {"step": 2, "dev/wer": 4.0}, {"step": 3}]) == [(1, 7.0), (2, 4.0)]


def test_segments_end_where_the_run_could_first_stop():
  curve = [(100, 30.0), (200, 21.0), (300, 22.5), (400, 21.0), (500, 24.0)]
  assert stopping.next_stop([], 0, 3000, 100, 3) == 400
  assert stopping.next_stop(curve[:4], 400, 3000, 100, 3) == 500
  assert stopping.next_stop(curve[:4], 400, 450, 100, 3) == 450     # capped at TRAIN_STEPS
  assert stopping.next_stop(curve[:2], 250, 3000, 100, 3) == 500    # resumed mid-segment
  assert stopping.next_stop(curve[:4], 400, 3000, 100, 0) == 3000   # no early stopping
  # Deciding only at those steps stops where deciding after every evaluation would.
  start, checked = 0, []
  while True:
    start = stopping.next_stop([p for p in curve if p[0] <= start], start, 3000, 100, 3)
    checked.append(start)
    if stopping.decide([p for p in curve if p[0] <= start], start, 3000, 3).done:
      break
  assert checked == [400, 500]
