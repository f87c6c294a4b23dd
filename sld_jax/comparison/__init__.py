"""Loss Masking vs Multimodal CE vs SLD: train every objective over seeds, score
them on the same utterances, and report paired intervals of the differences.

``python -m sld_jax.comparison`` (``main``; ``scripts/compare_objectives.py``
is the same). One job per module:

  plan        which runs, their folders and gin (seed = init + data order)
  gin_values  literal values of gin files and operative configs, read by gin
  stopping    when training stops (dev WER patience), which step is scored
  runner      the train / score subprocesses, resumable, run.json per run
  run_files   reading metrics.jsonl, eval rows and predictions.jsonl
  statistics  paired bootstrap intervals and the sign test
  results     results.json: every run's numbers and per-utterance errors
  markdown    results.md, its conclusions generated from the intervals
  plots       the figures

It lives in the package (not under scripts/) so that tests and notebooks
import it like any other module and it reuses ``sld_jax.gin_utils``; it
imports no JAX model code: training and scoring run as ``python -m
sld_jax.train`` / ``sld_jax.eval`` subprocesses.
"""
