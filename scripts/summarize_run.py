"""Prints the WER table of a run and where its checkpoint, metrics and predictions are.

  python scripts/summarize_run.py runs/demo

Reads ``MODEL_DIR/eval/metrics.jsonl`` (written by ``python -m sld_jax.eval``)
and ``MODEL_DIR/metrics.jsonl`` (written by training).
"""

from __future__ import annotations

import glob
import json
import os
import sys

# What each split of the embedded tasks measures.
SPLIT_NOTES = {
    "dev": "held-out synthetic voices (espeak en-029, flite slt)",
    "test": "held-out synthetic voices (espeak en-gb-scotland, flite kal16)",
    "real": "real human speech (Asterisk prompt voice, 8 kHz), never trained on",
}


def main(model_dir: str) -> int:
  eval_log = os.path.join(model_dir, "eval", "metrics.jsonl")
  if not os.path.exists(eval_log):
    print(f"no evaluation found: {eval_log} is missing (run python -m sld_jax.eval)")
    return 1
  rows = [json.loads(line) for line in open(eval_log) if line.strip()]
  print(f"\n{'step':>6}  {'split':<12} {'utts':>6} {'WER %':>7} {'CER %':>7}  what")
  for row in rows:
    print(f"{row.get('step', '?'):>6}  {row.get('split', '?'):<12} "
          f"{row.get('num_utterances', 0):>6} {row.get('wer', float('nan')):>7.2f} "
          f"{row.get('cer', float('nan')):>7.2f}  {SPLIT_NOTES.get(row.get('split'), '')}")
  checkpoints = sorted(glob.glob(os.path.join(model_dir, "checkpoints", "*")))
  predictions = sorted(glob.glob(os.path.join(model_dir, "eval", "step_*", "*", "*",
                                              "predictions.jsonl")))
  print(f"\ncheckpoint:  {checkpoints[-1] if checkpoints else '(none)'}")
  print(f"metrics:     {os.path.join(model_dir, 'metrics.jsonl')}  (TensorBoard: "
        f"{os.path.join(model_dir, 'tensorboard')})")
  for path in predictions:
    print(f"predictions: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
