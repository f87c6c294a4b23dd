"""results.md from the data of ``results.summarize``: every sentence of
"What it shows" is generated from the intervals, none written by hand."""

from __future__ import annotations

import statistics as py_statistics
from typing import Any, Sequence

from sld_jax.comparison import runner

FIGURES = {"dev_wer_curves.png": "Dev WER against training steps (mean over seeds, shaded "
                                 "min–max; dots: the selected checkpoints)",
           "wer_intervals.png": "Pooled WER per method with its 95% bootstrap interval "
                                "(dots: seeds)",
           "pairwise_differences.png": "WER differences of each pair: thick, the utterance "
                                       "bootstrap 95% CI; thin, seeds resampled too"}


def _interval(values: Sequence[float]) -> str:
  estimate, low, high = values
  return f"{estimate:.2f} [{low:.2f}, {high:.2f}]"


def _difference(values: Sequence[float]) -> str:
  estimate, low, high = values
  return f"{estimate:+.2f} [{low:+.2f}, {high:+.2f}]"


def _mean_std(values: Sequence[float]) -> str:
  if len(values) < 2:
    return f"{values[0]:.2f}" if values else "–"
  return f"{py_statistics.fmean(values):.2f} ± {py_statistics.stdev(values):.2f}"


def render(results: dict[str, Any], figures_dir: str) -> str:
  labels = results["labels"]
  runs = results["runs"]
  finished = [r for r in runs if r["finished"]]
  lines = ["# Loss Masking vs Multimodal CE vs SLD", "",
           f"Written by `python -m sld_jax.comparison` on {results['created']} from "
           f"{len(finished)} finished runs of {len(runs)} in `{results['out']}`. "
           "Commands (oldest first):", "", "```text"]
  lines += [f"{inv['command']}    # {inv['time']}" for inv in results["invocations"]]
  lines += ["```", ""]
  lines += _conclusions(results)
  lines += _setup(results, finished)
  for split, data in results["splits"].items():
    lines += _split_tables(split, data, labels)
  lines += _training_table(results)
  unfinished = [r for r in runs if not r["finished"]]
  if unfinished:
    lines += ["## Runs not finished", ""]
    for run in unfinished:
      stage = f" in {run['failed_stage']}" if run.get("failed_stage") else ""
      log = f"; log: `{run['log']}`" if run.get("log") else ""
      lines.append(f"- `{run['run_dir']}`: {run['status']}{stage}{log}")
    lines.append("")
  lines += ["## Plots", ""]
  for name, caption in FIGURES.items():
    lines += [f"{caption}:", "", f"![{name[:-4]}]({figures_dir}/{name})", ""]
  lines += ["`results.json` holds every number above, each run's commands and dev curve, "
            "and the per-utterance word errors of every run (`splits.<split>.errors`), from "
            "which each interval can be recomputed.", ""]
  return "\n".join(lines)


def _conclusions(results: dict[str, Any]) -> list[str]:
  lines = ["## What it shows", ""]
  tests = [s for s in results["splits"] if s.rsplit("/", 1)[-1].startswith("test")]
  if not tests:
    return lines + ["No test split has been scored yet.", ""]
  for split in tests:
    data = results["splits"][split]
    lines.append(f"On `{split}` ({len(data['ids'])} utterances, "
                 f"{sum(data['word_count'])} words per seed), WER differences in points:")
    lines.append("")
    lines += [f"- {pair['conclusion']}" for pair in data["pairs"]]
    lines.append("")
  still = [r for r in results["runs"] if r["finished"] and "still improving" in
           (r.get("stop_reason") or "")]
  if still:
    lines += ["Still improving when TRAIN_STEPS ran out (their WER may be an artefact of the "
              "budget): " + ", ".join(f"`{r['run_dir']}`" for r in still) + ".", ""]
  lines += ["Dev WER chose each run's checkpoint, so the dev rows below are optimistic; the "
            "conclusions use test only.", ""]
  return lines


def _setup(results: dict[str, Any], finished: list[dict[str, Any]]) -> list[str]:
  lines = ["## Setup", ""]
  if results["budgets"]:
    shown = ", ".join(f"{k} {v}" for k, v in results["budgets"][0].items() if v is not None)
    same = ("the same for every run" if results["same_budget"] else
            "**differs between runs** (see `budgets` in results.json)")
    lines.append(f"- Budget (each run's operative `config.gin`): {shown}; {same}.")
  patience = {r.get("patience") for r in finished} - {None}
  lines.append("- Each run trains until its dev WER has not improved for "
               f"{'/'.join(map(str, sorted(patience))) or '?'} evaluations (or TRAIN_STEPS) "
               "and is scored at its best dev-WER checkpoint, greedy decoding of the full "
               "splits.")
  seeds = sorted({(r["seeds"].get("SEED"), r["seeds"].get("DATA_SEED")) for r in finished},
                 key=str)
  if seeds:
    lines.append("- Seeds (SEED: initialisation, dropout, time masking / DATA_SEED: data "
                 "order): " + ", ".join(f"{s}/{d}" for s, d in seeds) + ".")
  for method in results["methods"]:
    run = next((r for r in finished if r["method"] == method), None)
    if run:
      knobs = ", ".join(f"{k}={v}" for k, v in sorted(run["loss_config"].items()))
      lines.append(f"- {results['labels'][method]} (`{method}`): LossConfig {knobs}; "
                   f"time_mask_prob {run['time_mask_prob']}.")
  step_times = [r["mean_step_time"] for r in finished if r["mean_step_time"]]
  train = [r["train_seconds"] for r in finished if r.get("train_seconds")]
  scoring = [r["eval_seconds"] for r in finished if r.get("eval_seconds")]
  if step_times and train:
    lines.append(f"- Time per run (means): training {runner.clock(py_statistics.fmean(train))} "
                 f"at {py_statistics.fmean(step_times):.3f} s/step, scoring "
                 f"{runner.clock(py_statistics.fmean(scoring) if scoring else 0)}.")
  bootstrap = results["bootstrap"]
  lines += [f"- Intervals: percentile bootstrap, {bootstrap['resamples']} resamples, "
            f"{100 * bootstrap['confidence']:.0f}%. *Utterance* CI: utterances resampled with "
            "all their seeds (the per-utterance errors pooled over seeds); *seeds too*: the "
            "seed pairs resampled as well. Sign test: utterances where the first method makes "
            "fewer / more errors summed over seeds, exact two-sided binomial p.", ""]
  return lines


def _split_tables(split: str, data: dict[str, Any], labels: dict[str, str]) -> list[str]:
  lines = [f"## `{split}`: {len(data['ids'])} utterances, {sum(data['word_count'])} words", "",
           "| method | seeds | pooled WER % [95% CI] | per-seed WER % (mean ± std) |",
           "|---|---|---|---|"]
  for method, summary in data["methods"].items():
    per_seed = [summary["per_seed"][str(s)] for s in summary["seeds"]]
    lines.append(f"| {labels[method]} | {len(summary['seeds'])} | "
                 f"{_interval(summary['wer'])} | {_mean_std(per_seed)} |")
  lines += ["", "| difference (points) | seeds | A − B [utterance 95% CI] | "
                "[seeds too] | per seed | sign test (better/worse/ties, p) | verdict |",
            "|---|---|---|---|---|---|---|"]
  for pair in data["pairs"]:
    per_seed = ", ".join(f"{v:+.2f}" for v in pair["per_seed"].values())
    sign = pair["sign_test"]
    _, low, high = pair["seed_and_utterance"]
    lines.append(f"| {labels[pair['a']]} − {labels[pair['b']]} | {len(pair['seeds'])} | "
                 f"{_difference(pair['difference'])} | [{low:+.2f}, {high:+.2f}] | {per_seed} | "
                 f"{sign['better']}/{sign['worse']}/{sign['ties']}, {sign['p_value']:.2g} | "
                 f"{pair['verdict']} |")
  lines.append("")
  return lines


def _training_table(results: dict[str, Any]) -> list[str]:
  lines = ["## Training", "",
           "| method | seed | selected step | stopped at | why | best dev WER % (training "
           "eval) | s/step | training | run |", "|---|---|---|---|---|---|---|---|---|"]
  for run in results["runs"]:
    if not run["finished"]:
      continue
    best = run.get("best_dev_wer")
    step_time = run.get("mean_step_time")
    lines.append(
        f"| {results['labels'][run['method']]} | {run['seed']} | {run['selected_step']} | "
        f"{run.get('stopped_at')} | {run.get('stop_reason') or '–'} | "
        f"{'–' if best is None else f'{best:.2f}'} | "
        f"{'–' if not step_time else f'{step_time:.3f}'} | "
        f"{runner.clock(run.get('train_seconds') or 0)} | `{run['run_dir']}` |")
  lines.append("")
  return lines
