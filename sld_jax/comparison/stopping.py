"""When a run stops training, and which checkpoint it is scored at.

Training evaluates the dev WER every ``EVAL_EVERY`` steps (``DecodingEvaluator``,
rows of ``MODEL_DIR/eval_metrics.jsonl``) and checkpoints at the same steps.
The driver trains in segments that end at those steps and, after each, asks
``decide``: the *selected* step is the one with the lowest dev WER (the
earliest of equals); training stops once ``patience`` evaluations after it
have not improved on it, or at ``TRAIN_STEPS``. With dev WER by step::

  steps  100   200   300   400   500
  WER   30.0  21.0  22.5  21.0  24.0     patience 3
  -> selected 200; stopped after 500 (300, 400, 500 did not improve)

``patience = 0`` never stops early (the best checkpoint is still selected).
The checkpoints of the last ``patience + 2`` saves are kept, so the selected
one is still on disk when training stops.

Training cannot stop before ``patience`` evaluations after the best one, so
a segment runs straight to that step (``next_stop``): in the example, the
first segment ends at 400 (no evaluation yet: 1 + 3 evaluations), the second
at 500 (200 + 3 x 100), and the rule then stops. The result is the same as
deciding after every evaluation, with fewer restarts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

DEV_WER = "dev/wer"


@dataclasses.dataclass(frozen=True)
class Decision:
  """``done``: stop training; ``selected``: the best step so far (None before any
  evaluation); ``reason``: why it stopped, for the report."""

  done: bool
  selected: Optional[int]
  best_wer: Optional[float]
  reason: str


def dev_curve(rows: Sequence[dict[str, Any]], metric: str = DEV_WER) -> list[tuple[int, float]]:
  """``[(step, dev WER)]`` from eval_metrics.jsonl rows, by step (last row of a step wins)."""
  by_step = {int(row["step"]): float(row[metric]) for row in rows
             if "step" in row and isinstance(row.get(metric), (int, float))}
  return sorted(by_step.items())


def decide(curve: Sequence[tuple[int, float]], last_step: Optional[int], total_steps: int,
           patience: int) -> Decision:
  """Whether training is over and the step to score, from the dev curve so far.

  Args:
    curve: ``[(step, dev WER)]`` evaluated so far.
    last_step: the latest checkpoint (None before the first).
    total_steps: TRAIN_STEPS.
    patience: evaluations without improvement before stopping (0: never).
  """
  if not curve:
    return Decision(last_step == total_steps, last_step, None,
                    "no dev evaluation" if last_step == total_steps else "")
  best_step, best_wer = min(curve, key=lambda point: (point[1], point[0]))
  since = sum(1 for step, _ in curve if step > best_step)
  if patience and since >= patience:
    return Decision(True, best_step, best_wer,
                    f"dev WER did not improve for {since} evaluations after step {best_step}")
  if last_step is not None and last_step >= total_steps:
    still = " (still improving at the budget)" if best_step == curve[-1][0] else ""
    return Decision(True, best_step, best_wer, f"reached TRAIN_STEPS {total_steps}{still}")
  return Decision(False, best_step, best_wer, "")


def next_stop(curve: Sequence[tuple[int, float]], start: int, total_steps: int,
              eval_every: int, patience: int) -> int:
  """The step the next training segment should end at (an evaluation step).

  >>> next_stop([], 0, 3000, 100, 3), next_stop([(100, 30.0), (200, 21.0)], 400, 3000, 100, 3)
  (400, 500)
  """
  following = (start // eval_every + 1) * eval_every
  if not patience:
    return total_steps
  if curve:
    best_step = min(curve, key=lambda point: (point[1], point[0]))[0]
    earliest = best_step + patience * eval_every
  else:
    earliest = (patience + 1) * eval_every
  return min(max(earliest, following), total_steps)
