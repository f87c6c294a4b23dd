"""Reading what the training and scoring mains wrote into a run folder.

Nothing here parses console output: every number comes from
``metrics.jsonl`` / ``eval_metrics.jsonl`` (training), ``eval/metrics.jsonl``
and ``eval/step_<N>/<task>/<split>/predictions*.jsonl`` (``sld_jax.eval``),
``checkpoints/<step>/`` and the operative ``config.gin``.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional

from sld_jax import checkpointing

PER_UTTERANCE_FIELDS = ("id", "word_errors", "word_count")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The rows of a JSON-lines file ([] if missing); a bad line raises naming it."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON line ({e}): {line[:120]!r}") from None
  return rows


def latest_checkpoint(run_dir: str) -> Optional[int]:
  """The highest complete-looking checkpoint step (a ``checkpoints/<step>`` dir)."""
  directory = os.path.join(run_dir, checkpointing.CHECKPOINT_SUBDIR)
  if not os.path.isdir(directory):
    return None
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
  return max(steps) if steps else None


def scored_splits(run_dir: str, step: int) -> dict[tuple[str, str], dict[str, Any]]:
  """``{(task, split): row}`` of ``eval/metrics.jsonl`` at ``step`` (last row wins)."""
  path = os.path.join(run_dir, "eval", "metrics.jsonl")
  rows = {}
  for number, row in enumerate(read_jsonl(path), 1):
    missing = [key for key in ("step", "task", "split", "wer", "cer") if key not in row]
    if missing:
      raise ValueError(f"{path}:{number}: no {missing} (written by python -m sld_jax.eval?)")
    if row["step"] == step:
      rows[(row["task"], row["split"])] = row
  return rows


def per_utterance_errors(run_dir: str, step: int, task: str, split: str
                         ) -> dict[str, tuple[int, int]]:
  """``{utterance id: (word errors, reference words)}`` of one scored split.

  Raises:
    ValueError: no predictions file, a record without the fields, or an id
      that appears twice.
  """
  directory = os.path.join(run_dir, "eval", f"step_{step}", task, split)
  paths = sorted(glob.glob(os.path.join(directory, "predictions*.jsonl")))
  if not paths:
    raise ValueError(f"{directory}: no predictions*.jsonl (scored by python -m sld_jax.eval?)")
  errors = {}
  for path in paths:
    for number, record in enumerate(read_jsonl(path), 1):
      missing = [key for key in PER_UTTERANCE_FIELDS if key not in record]
      if missing:
        raise ValueError(f"{path}:{number}: no {missing}")
      if record["id"] in errors:
        raise ValueError(f"{path}:{number}: utterance id {record['id']!r} appears twice")
      errors[record["id"]] = (int(record["word_errors"]), int(record["word_count"]))
  return errors
