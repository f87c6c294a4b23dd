"""Paired statistics of two methods' per-utterance word errors, pooled over seeds.

Every method is trained once per seed and scored on the same utterances, so
one split gives each method an error matrix ``E[seed, utterance]`` (word
errors of that seed's hypothesis) beside the reference lengths ``N[utterance]``.
Pooled over S seeds, a method's WER is ``sum(E) / (S * sum(N))`` and the
difference of methods A and B is carried by the per-utterance sums::

  E_A = [[1, 0, 2],     E_B = [[1, 1, 2],     N = [3, 4, 5]
         [0, 0, 1]]            [1, 0, 2]]
  d = (E_A - E_B).sum(0) = [-1, -1, -1];  n = S * N = [6, 8, 10]
  WER_A - WER_B = 100 * sum(d) / sum(n) = -12.5 points

``paired_bootstrap`` resamples utterances (each with all its seeds: the
utterance is the sampling unit, the seeds of one utterance stay paired) and
gives the percentile 95% interval of that difference (Bisani & Ney 2004,
computed with ``scipy.stats.bootstrap``). ``seed_and_utterance_bootstrap``
resamples seeds as well, so the interval also carries the training-run
variance that 5 seeds leave. ``sign_test`` counts the utterances on which A
makes fewer errors than B (summed over seeds) against those on which it makes
more, ties left out, and gives the exact two-sided binomial p-value.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
RESAMPLES = 10_000


@dataclasses.dataclass(frozen=True)
class Interval:
  """A point estimate and its interval, in WER points (percent)."""

  estimate: float
  low: float
  high: float

  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0

  def to_json(self) -> list[float]:
    return [self.estimate, self.low, self.high]


@dataclasses.dataclass(frozen=True)
class SignTest:
  """Utterances where A is better / worse than B (seed sums), ties, p-value."""

  better: int
  worse: int
  ties: int
  p_value: float


def _check(errors_a: np.ndarray, errors_b: np.ndarray, words: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  errors_a, errors_b = np.asarray(errors_a, np.float64), np.asarray(errors_b, np.float64)
  words = np.asarray(words, np.float64)
  if errors_a.ndim != 2 or errors_a.shape != errors_b.shape:
    raise ValueError(f"want two [seeds, utterances] error matrices of one shape, got "
                     f"{errors_a.shape} and {errors_b.shape}")
  if words.shape != errors_a.shape[1:]:
    raise ValueError(f"want one reference length per utterance ({errors_a.shape[1]}), got "
                     f"shape {words.shape}")
  if errors_a.shape[0] < 1 or errors_a.shape[1] < 2 or words.sum() <= 0:
    raise ValueError(f"need at least one seed, two utterances and some reference words; got "
                     f"{errors_a.shape[0]} seeds, {errors_a.shape[1]} utterances, "
                     f"{int(words.sum())} words")
  return errors_a, errors_b, words


def wer_difference(errors_a, errors_b, words) -> float:
  """Pooled WER of A minus pooled WER of B, in points."""
  errors_a, errors_b, words = _check(errors_a, errors_b, words)
  return float(100.0 * (errors_a - errors_b).sum() / (errors_a.shape[0] * words.sum()))


def pooled_wer_interval(errors, words, *, seed: int = 0,
                        resamples: int = RESAMPLES) -> Interval:
  """One method's pooled WER with its utterance-bootstrap interval."""
  errors, _, words = _check(errors, errors, words)
  return _utterance_bootstrap(errors.sum(0), errors.shape[0] * words, seed, resamples)


def paired_bootstrap(errors_a, errors_b, words, *, seed: int = 0,
                     resamples: int = RESAMPLES) -> Interval:
  """Percentile interval of WER_A - WER_B over utterances resampled with replacement."""
  errors_a, errors_b, words = _check(errors_a, errors_b, words)
  return _utterance_bootstrap((errors_a - errors_b).sum(0), errors_a.shape[0] * words, seed,
                              resamples)


def _utterance_bootstrap(numerators: np.ndarray, denominators: np.ndarray, seed: int,
                         resamples: int) -> Interval:
  def ratio(num, den, axis=-1):
    return 100.0 * num.sum(axis=axis) / den.sum(axis=axis)

  result = scipy.stats.bootstrap(
      (numerators, denominators), ratio, paired=True, vectorized=True, axis=-1,
      n_resamples=resamples, batch=1000, confidence_level=CONFIDENCE, method="percentile",
      rng=np.random.default_rng(seed))
  interval = result.confidence_interval
  return Interval(float(ratio(numerators, denominators)), float(interval.low),
                  float(interval.high))


def seed_and_utterance_bootstrap(errors_a, errors_b, words, *, seed: int = 0,
                                 resamples: int = RESAMPLES, chunk: int = 500) -> Interval:
  """Percentile interval of WER_A - WER_B, resampling seed pairs and utterances.

  Resample b draws seed counts ``c[b]`` (S draws from the S seed pairs) and
  utterance counts ``w[b]`` (U draws from the U utterances) independently:
  ``100 * c[b] @ (E_A - E_B) @ w[b] / (S * N @ w[b])``.
  """
  errors_a, errors_b, words = _check(errors_a, errors_b, words)
  difference = errors_a - errors_b
  seeds, utterances = difference.shape
  rng = np.random.default_rng(seed)
  statistics = []
  for start in range(0, resamples, chunk):
    size = min(chunk, resamples - start)
    seed_counts = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=size)
    utterance_counts = rng.multinomial(utterances, np.full(utterances, 1.0 / utterances),
                                       size=size)
    numerator = np.einsum("bs,su,bu->b", seed_counts, difference, utterance_counts)
    statistics.append(100.0 * numerator / (seeds * (utterance_counts @ words)))
  statistics = np.concatenate(statistics)
  tail = 100.0 * (1.0 - CONFIDENCE) / 2
  low, high = np.percentile(statistics, [tail, 100.0 - tail])
  return Interval(wer_difference(errors_a, errors_b, words), float(low), float(high))


def sign_test(errors_a, errors_b, words: Optional[np.ndarray] = None) -> SignTest:
  """Exact two-sided sign test on the per-utterance error sums over seeds."""
  errors_a, errors_b = np.asarray(errors_a), np.asarray(errors_b)
  if words is None:
    words = np.ones(errors_a.shape[-1])
  errors_a, errors_b, _ = _check(errors_a, errors_b, words)
  difference = (errors_a - errors_b).sum(0)
  better, worse = int((difference < 0).sum()), int((difference > 0).sum())
  ties = int(difference.size - better - worse)
  p_value = 1.0 if better + worse == 0 else float(
      scipy.stats.binomtest(better, better + worse, 0.5).pvalue)
  return SignTest(better, worse, ties, p_value)
