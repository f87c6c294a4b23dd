"""Word and character error rates, computed by jiwer 4.0.

Each reference/hypothesis pair is aligned by jiwer (a Levenshtein alignment,
unit costs for substitution, deletion and insertion, ties broken as jiwer's
rapidfuzz opcodes break them), so the S/D/I split, not only the total, is
jiwer's. Corpus-level rates sum the edit counts over all pairs and divide by
the total reference length::

  WER = (S + D + I) / (H + S + D)        H + S + D = number of reference words

Worked example, reference "one two three", hypothesis "one too three four":
H=2 ("one", "three"), S=1 ("two"->"too"), D=0, I=1 ("four"), WER = 2/3.

Tokenisation follows jiwer's defaults: for words, runs of two or more
whitespace characters become one space, the string is stripped and split on
" " (empty pieces dropped); for characters, the string is stripped and every
character (spaces included) is a token.

Empty references: when the whole corpus has no reference token, jiwer 4.0
returns the number of inserted tokens as the "rate" (0 if the hypotheses are
empty too). ``ErrorCounts.rate`` follows the same convention, so an empty
reference with a three-word hypothesis has WER 3.0 (300%). A single empty
reference inside a corpus with other words simply adds its insertions to the
numerator.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Hashable, Sequence

import jiwer

_MULTIPLE_WHITESPACE = re.compile(r"\s\s+")
# Inputs already split into tokens: jiwer's transforms leave them as they are.
_PRE_TOKENIZED = jiwer.Compose([])


@dataclasses.dataclass(frozen=True)
class ErrorCounts:
  """Alignment counts of one or more reference/hypothesis pairs."""

  hits: int = 0
  substitutions: int = 0
  deletions: int = 0
  insertions: int = 0

  @property
  def errors(self) -> int:
    return self.substitutions + self.deletions + self.insertions

  @property
  def reference_length(self) -> int:
    return self.hits + self.substitutions + self.deletions

  @property
  def rate(self) -> float:
    """Errors per reference token; insertions count when there is none."""
    if self.reference_length == 0:
      return float(self.insertions)
    return self.errors / self.reference_length

  def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
    return ErrorCounts(
        hits=self.hits + other.hits,
        substitutions=self.substitutions + other.substitutions,
        deletions=self.deletions + other.deletions,
        insertions=self.insertions + other.insertions)


def words(text: str) -> list[str]:
  """jiwer's default word tokens: collapse whitespace runs, strip, split."""
  text = _MULTIPLE_WHITESPACE.sub(" ", text).strip()
  return [w for w in text.split(" ") if w]


def characters(text: str) -> list[str]:
  """jiwer's default character tokens: strip, then every character."""
  return list(text.strip())


def align_counts(reference: Sequence[Hashable],
                 hypothesis: Sequence[Hashable]) -> ErrorCounts:
  """Levenshtein alignment counts of two token sequences, by jiwer itself.

  The error total (S + D + I) is the edit distance whichever minimum-cost
  alignment is kept, but the split between S, D and I depends on how ties
  are broken, so the alignment is jiwer's own (rapidfuzz's opcodes), not a
  re-implementation. Tokens may be any hashables; equal tokens are hits.

  Worked tie, reference ["one", "two"], hypothesis ["two", "one"]: two
  substitutions and "delete one, keep two, insert one" both cost 2; jiwer
  keeps the second, so H=1, S=0, D=1, I=1.

  Args:
    reference: reference tokens.
    hypothesis: hypothesis tokens.

  Returns:
    The hits, substitutions, deletions and insertions of the alignment.
  """
  # jiwer aligns lists of strings; give every distinct token its own string.
  names: dict[Hashable, str] = {}
  ref = [names.setdefault(t, str(len(names))) for t in reference]
  hyp = [names.setdefault(t, str(len(names))) for t in hypothesis]
  output = jiwer.process_words([ref], [hyp],
                               reference_transform=_PRE_TOKENIZED,
                               hypothesis_transform=_PRE_TOKENIZED)
  return ErrorCounts(output.hits, output.substitutions, output.deletions,
                     output.insertions)


def word_errors(reference: str, hypothesis: str) -> ErrorCounts:
  """Word-level alignment counts of one utterance."""
  return align_counts(words(reference), words(hypothesis))


def char_errors(reference: str, hypothesis: str) -> ErrorCounts:
  """Character-level alignment counts of one utterance."""
  return align_counts(characters(reference), characters(hypothesis))


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]):
  if isinstance(references, str) or isinstance(hypotheses, str):
    raise TypeError("references and hypotheses must be sequences of strings, "
                    "not a single string")
  if len(references) != len(hypotheses):
    raise ValueError(
        f"got {len(references)} references but {len(hypotheses)} hypotheses")
  for name, texts in (("references", references), ("hypotheses", hypotheses)):
    for index, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(
            f"{name}[{index}] is {type(text).__name__}, expected str: {text!r}")


def corpus_word_errors(references: Sequence[str],
                       hypotheses: Sequence[str]) -> ErrorCounts:
  """Word-level counts summed over a corpus."""
  _check_pairs(references, hypotheses)
  total = ErrorCounts()
  for reference, hypothesis in zip(references, hypotheses):
    total += word_errors(reference, hypothesis)
  return total


def corpus_char_errors(references: Sequence[str],
                       hypotheses: Sequence[str]) -> ErrorCounts:
  """Character-level counts summed over a corpus."""
  _check_pairs(references, hypotheses)
  total = ErrorCounts()
  for reference, hypothesis in zip(references, hypotheses):
    total += char_errors(reference, hypothesis)
  return total


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
  """Corpus word error rate as a fraction (``jiwer.wer``)."""
  return corpus_word_errors(references, hypotheses).rate


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
  """Corpus character error rate as a fraction (``jiwer.cer``)."""
  return corpus_char_errors(references, hypotheses).rate
