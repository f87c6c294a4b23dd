"""Everything the report shows, read back from the run folders (results.json).

``summarize(out, plan, invocations)`` returns JSON-ready data::

  {"methods": ["sld", "sld_reference", "multimodal_ce", "loss_masking"],
   "labels": {"sld": "SLD (paper KL target)", ...},
   "runs": [{"method", "seed", "status", "selected_step", "stop_reason",
             "dev_curve": [[step, WER], ...], "eval": {"task/split": {...}}, ...}],
   "splits": {"<task>/test": {
       "ids": [...], "word_count": [...],              per utterance
       "errors": {method: {seed: [word errors per utterance]}},
       "methods": {method: {"seeds", "wer": [pooled, low, high], "per_seed"}},
       "pairs": [{"a", "b", "seeds", "difference": [est, low, high],
                  "seed_and_utterance": [...], "sign_test": {...},
                  "per_seed": {seed: WER_a - WER_b}, "verdict", "conclusion"}]}},
   "curves": {method: {"steps", "mean", "min", "max", "n"}}}   dev WER by step

Every finished run must have scored the same utterances of a split (same ids,
same reference lengths); otherwise ``summarize`` raises naming the run, so no
utterance leaves a comparison unnoticed.
"""

from __future__ import annotations

import json
import os
import statistics as py_statistics
from typing import Any, Optional, Sequence

import numpy as np

from sld_jax.comparison import gin_values
from sld_jax.comparison import plan as plan_lib
from sld_jax.comparison import run_files
from sld_jax.comparison import runner
from sld_jax.comparison import statistics
from sld_jax.comparison import stopping

BUDGET_KEYS = ("TASK", "TRAIN_STEPS", "EVAL_EVERY", "EVAL_BATCHES", "BATCH_SIZE",
               "SEQUENCE_LENGTH", "LEARNING_RATE", "WARMUP_STEPS",
               "GRADIENT_ACCUMULATION_STEPS")
LOSS_PREFIX = "LossConfig."
TIME_MASK = "SpeechTextLM.time_mask_prob"
NAMES = {"loss_masking": "Loss Masking", "multimodal_ce": "Multimodal CE"}
KL_TARGETS = {"paper": "paper KL target", "reference": "released KL target"}
# Pair order: SLD variants first, then Multimodal CE, then Loss Masking, so
# that each difference reads "SLD - MCE", "SLD - LM", "MCE - LM".
RANK = {"sld": 0, "multimodal_ce": 1, "loss_masking": 2}


def label(loss_config: dict[str, Any], method: str) -> str:
  kind = loss_config.get("method")
  if kind == "sld":
    target = KL_TARGETS.get(loss_config.get("kl_target"), loss_config.get("kl_target"))
    normalization = loss_config.get("kl_normalization")
    extra = f", KL per {normalization}" if normalization else ""
    return f"SLD ({target}{extra})" if target else "SLD"
  return NAMES.get(kind, method)


def split_order(name: str) -> tuple:
  split = name.rsplit("/", 1)[-1]
  return (0 if split.startswith("test") else 1 if split.startswith(("dev", "valid")) else 2,
          name)


def _run_record(out: str, spec: plan_lib.RunSpec) -> dict[str, Any]:
  run_dir = os.path.join(out, spec.run_dir)
  state = runner.read_state(run_dir)
  config = gin_values.operative_values(run_dir)
  step = state.get("selected_step")
  scored = run_files.scored_splits(run_dir, step) if step is not None else {}
  finished = state.get("status") == "done" and bool(scored)
  train_rows = run_files.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  times = [row["step_time"] for row in train_rows[1:] if row.get("step_time")]
  return {
      **spec.to_json(), "run_dir": spec.run_dir,
      "status": state.get("status") or "missing", "finished": finished,
      "selected_step": step, "stopped_at": state.get("stopped_at"),
      "stop_reason": state.get("stop_reason"), "patience": state.get("patience"),
      "best_dev_wer": state.get("best_dev_wer"),
      "dev_curve": [list(p) for p in stopping.dev_curve(
          run_files.read_jsonl(os.path.join(run_dir, "eval_metrics.jsonl")))],
      "eval": {f"{task}/{split}": {k: row.get(k) for k in (
          "step", "wer", "cer", "num_utterances", "word_errors", "reference_words")}
               for (task, split), row in scored.items()},
      "loss_config": {k[len(LOSS_PREFIX):]: v for k, v in config.items()
                      if k.startswith(LOSS_PREFIX) and not isinstance(
                          v, (gin_values.Macro, gin_values.Reference))},
      "time_mask_prob": gin_values.lookup(config, TIME_MASK),
      "seeds": {k: gin_values.lookup(config, k) for k in ("SEED", "DATA_SEED")},
      "budget": {k: gin_values.lookup(config, k) for k in BUDGET_KEYS},
      "mean_step_time": py_statistics.fmean(times) if times else None,
      "train_seconds": state.get("train_seconds"), "eval_seconds": state.get("eval_seconds"),
      "train_command": state.get("train_command"), "eval_command": state.get("eval_command"),
      "failed_stage": state.get("failed_stage"), "log": state.get("log"),
  }


def _split_errors(out: str, runs: Sequence[dict[str, Any]], split: str) -> dict[str, Any]:
  """Per-utterance errors of every finished run on one split, aligned by id."""
  task, name = split.rsplit("/", 1)
  reference: Optional[dict[str, int]] = None
  reference_run = None
  errors: dict[str, dict[str, list[int]]] = {}
  for run in runs:
    if not run["finished"] or split not in run["eval"]:
      continue
    per_id = run_files.per_utterance_errors(os.path.join(out, run["run_dir"]),
                                            run["selected_step"], task, name)
    words = {i: count for i, (_, count) in per_id.items()}
    if reference is None:
      reference, reference_run = dict(sorted(words.items())), run["run_dir"]
    elif words != reference:
      only_here = sorted(set(words) - set(reference))
      only_there = sorted(set(reference) - set(words))
      lengths = sorted(i for i in set(words) & set(reference) if words[i] != reference[i])
      raise ValueError(
          f"{run['run_dir']} scored other utterances of {split} than {reference_run}: "
          f"{len(only_here)} ids only in it (e.g. {only_here[:3]}), {len(only_there)} only in "
          f"{reference_run} (e.g. {only_there[:3]}), {len(lengths)} with other reference "
          f"lengths (e.g. {lengths[:3]}); score both with the same eval settings")
    errors.setdefault(run["method"], {})[str(run["seed"])] = [per_id[i][0] for i in reference]
  if reference is None:
    return {}
  return {"ids": list(reference), "word_count": list(reference.values()), "errors": errors}


def _verdict(interval: statistics.Interval) -> str:
  return "lower" if interval.high < 0 else "higher" if interval.low > 0 else "no difference"


def _pair(a: str, b: str, data: dict[str, Any], labels: dict[str, str], seed: int
          ) -> Optional[dict[str, Any]]:
  seeds = sorted(set(data["errors"][a]) & set(data["errors"][b]), key=int)
  if not seeds:
    return None
  words = np.asarray(data["word_count"])
  errors_a = np.asarray([data["errors"][a][s] for s in seeds])
  errors_b = np.asarray([data["errors"][b][s] for s in seeds])
  utterance = statistics.paired_bootstrap(errors_a, errors_b, words, seed=seed)
  both = statistics.seed_and_utterance_bootstrap(errors_a, errors_b, words, seed=seed)
  sign = statistics.sign_test(errors_a, errors_b, words)
  wer_b = 100.0 * errors_b.sum() / (len(seeds) * words.sum())
  return {
      "a": a, "b": b, "seeds": [int(s) for s in seeds],
      "difference": utterance.to_json(), "seed_and_utterance": both.to_json(),
      "relative": utterance.estimate / wer_b if wer_b else None,
      "sign_test": {"better": sign.better, "worse": sign.worse, "ties": sign.ties,
                    "p_value": sign.p_value},
      "per_seed": {s: statistics.wer_difference(errors_a[i:i + 1], errors_b[i:i + 1], words)
                   for i, s in enumerate(seeds)},
      "verdict": _verdict(utterance), "seeds_verdict": _verdict(both),
      "conclusion": conclusion(labels[a], labels[b], utterance, both, sign, len(seeds),
                               wer_b),
  }


def conclusion(name_a: str, name_b: str, utterance: statistics.Interval,
               both: statistics.Interval, sign: statistics.SignTest, seeds: int,
               wer_b: float) -> str:
  """One sentence read off the intervals (never written by hand)."""
  ci = f"95% CI [{utterance.low:+.2f}, {utterance.high:+.2f}]"
  relative = f", {100 * utterance.estimate / wer_b:+.1f}% relative" if wer_b else ""
  pooled = f"{seeds} seeds pooled" if seeds > 1 else "1 seed"
  test = (f"sign test {sign.better} better / {sign.worse} worse utterances, "
          f"p = {sign.p_value:.2g}")
  if utterance.excludes_zero():
    direction = "lower" if utterance.high < 0 else "higher"
    text = (f"{name_a} has a {direction} WER than {name_b}: {utterance.estimate:+.2f} points"
            f"{relative} ({ci}, {pooled}; {test}).")
    if not both.excludes_zero():
      text += (f" Resampling the seeds too widens the interval to [{both.low:+.2f}, "
               f"{both.high:+.2f}], which includes 0: the difference is within the spread "
               "between training runs.")
    return text
  return (f"No difference between {name_a} and {name_b} is detected: {utterance.estimate:+.2f} "
          f"points ({ci} includes 0, {pooled}; {test}); differences outside that interval "
          "are unlikely at this size.")


def _curves(runs: Sequence[dict[str, Any]], method: str) -> dict[str, Any]:
  """Dev WER by step over the seeds of a method: mean, min, max where all seeds have one."""
  series = [dict((int(s), float(w)) for s, w in run["dev_curve"]) for run in runs
            if run["method"] == method and run["dev_curve"]]
  if not series:
    return {"steps": [], "mean": [], "min": [], "max": [], "n": 0}
  steps = sorted(set().union(*series))
  rows = [[s[t] for s in series if t in s] for t in steps]
  return {"steps": steps, "n": len(series), "count": [len(r) for r in rows],
          "mean": [py_statistics.fmean(r) for r in rows], "min": [min(r) for r in rows],
          "max": [max(r) for r in rows]}


def summarize(out: str, plan: Sequence[plan_lib.RunSpec], invocations: Sequence[dict[str, Any]],
              seed: int = 0) -> dict[str, Any]:
  """Reads every run folder of ``plan`` and computes the tables (module docstring)."""
  runs = [_run_record(out, spec) for spec in plan]
  # A stable sort: within a rank, the order of --methods.
  def rank(method: str) -> int:
    kind = next((r["loss_config"].get("method") for r in runs
                 if r["method"] == method and r["loss_config"]), None)
    return RANK.get(kind or ("sld" if method.startswith("sld") else method), 3)

  methods = sorted(dict.fromkeys(spec.method for spec in plan), key=rank)
  labels = {}
  for method in methods:
    config = next((r["loss_config"] for r in runs if r["method"] == method and r["loss_config"]),
                  {})
    labels[method] = label(config, method)
  if len(set(labels.values())) != len(labels):
    labels = {m: f"{labels[m]} [{m}]" for m in methods}
  split_names = sorted({s for run in runs if run["finished"] for s in run["eval"]},
                       key=split_order)
  splits = {}
  for split in split_names:
    data = _split_errors(out, runs, split)
    if not data:
      continue
    words = np.asarray(data["word_count"])
    present = [m for m in methods if m in data["errors"]]
    data["errors"] = {m: data["errors"][m] for m in present}
    data["methods"] = {}
    for method, per_seed in data["errors"].items():
      matrix = np.asarray([per_seed[s] for s in sorted(per_seed, key=int)])
      data["methods"][method] = {
          "seeds": sorted((int(s) for s in per_seed)),
          "wer": statistics.pooled_wer_interval(matrix, words, seed=seed).to_json(),
          "per_seed": {s: 100.0 * sum(v) / words.sum() for s, v in per_seed.items()}}
    data["pairs"] = [pair for i, a in enumerate(present) for b in present[i + 1:]
                     if (pair := _pair(a, b, data, labels, seed)) is not None]
    splits[split] = data
  budgets = {json.dumps(r["budget"], sort_keys=True, default=str) for r in runs if r["finished"]}
  return {"created": runner.now(), "out": out, "invocations": list(invocations),
          "methods": methods, "labels": labels, "runs": runs, "splits": splits,
          "same_budget": len(budgets) <= 1,
          "budgets": [json.loads(b) for b in sorted(budgets)],
          "bootstrap": {"resamples": statistics.RESAMPLES, "confidence": statistics.CONFIDENCE,
                        "seed": seed},
          "curves": {m: _curves(runs, m) for m in methods}}
