"""Where training scalars go: a JSON-lines file, TensorBoard and the console.

``MetricsWriter("run/metrics.jsonl", "run/tensorboard/train")`` appends one
line per logged step, e.g.::

  {"step": 20, "loss": 4.91, "ce_text": 3.2, ..., "learning_rate": 0.00028}

and writes the same scalars as TensorBoard events (``tensorboardX``, no
TensorFlow import). Only the primary process writes; the others get a writer
that does nothing.

When a run resumes from a checkpoint at step S, lines of steps after S (from
the interrupted run, logged after its last checkpoint) are removed from the
JSON-lines file, with a logged count, so that the file holds each step once.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any, Mapping, Optional

from absl import logging
import numpy as np

from sld_jax import atomic_files


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim:
    raise ValueError(f"metrics must be scalars, got shape {value.shape}")
  value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; "nan" / "inf" stay readable.
  return value


class MetricsWriter:
  """Appends ``{"step": s, name: value, ...}`` lines and TensorBoard scalars."""

  def __init__(self, jsonl_path: str, tensorboard_dir: Optional[str] = None,
               enabled: bool = True):
    self.jsonl_path = jsonl_path
    self.enabled = enabled
    self._tensorboard = None
    if not enabled:
      return
    os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
    if tensorboard_dir:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(tensorboard_dir, flush_secs=30)

  def truncate_after(self, step: int) -> int:
    """Drops lines with ``"step" > step`` (a resumed run redoes them); returns how many."""
    if not self.enabled or not os.path.exists(self.jsonl_path):
      return 0
    with open(self.jsonl_path) as f:
      lines = [line for line in f if line.strip()]
    kept, unterminated = [], False
    for number, line in enumerate(lines, 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("%s:%d: dropping an unreadable line (a run killed mid-write?)",
                        self.jsonl_path, number)
        continue
      if record.get("step", -1) <= step:
        unterminated |= not line.endswith("\n")
        kept.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(kept)
    if dropped or unterminated:
      atomic_files.write_text(self.jsonl_path, "".join(kept))
      logging.info("%s: removed %d lines after step %d (the run resumes from there)",
                   self.jsonl_path, dropped, step)
    return dropped

  def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, Any]:
    """Writes one record; returns it (values as Python numbers)."""
    record = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
    if not self.enabled:
      return record
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tensorboard is not None:
      for name, value in record.items():
        if name != "step" and isinstance(value, (int, float)):
          self._tensorboard.add_scalar(name, value, global_step=int(step))
    return record

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def format_progress(step: int, total_steps: int, record: Mapping[str, Any],
                    seconds_per_step: float) -> str:
  """One console line, e.g.

  ``step 120/1000 (12%) loss 3.2104 ce_text 2.80 ... lr 2.6e-04 | 0.41 s/step
  52.3k tok/s | ETA 0:06:01``
  """
  def number(name, fmt):
    value = record.get(name)
    return f" {name} {value:{fmt}}" if isinstance(value, (int, float)) else ""

  remaining = max(total_steps - step, 0) * seconds_per_step
  eta = str(datetime.timedelta(seconds=int(remaining)))
  tokens = record.get("tokens_per_second")
  rate = f" {tokens / 1000:.1f}k tok/s" if isinstance(tokens, (int, float)) else ""
  return (f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)"
          f"{number('loss', '.4f')}{number('ce_text', '.3f')}{number('ce_speech', '.3f')}"
          f"{number('kl_speech', '.3f')}{number('accuracy_text', '.3f')}"
          f"{number('grad_norm', '.3f')}{number('learning_rate', '.2e')}"
          f" | {seconds_per_step:.3f} s/step{rate} | ETA {eta}")
