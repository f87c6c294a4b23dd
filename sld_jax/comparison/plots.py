"""The report's figures (matplotlib, Agg), drawn from ``results.summarize``'s data."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from sld_jax import atomic_files


def _save(fig, path: str) -> str:
  fig.tight_layout()
  with atomic_files.replacing(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)
  return path


def dev_wer_curves(results: dict[str, Any], path: str) -> str:
  """Dev WER by step per method: mean over seeds, min–max band, selected steps."""
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for index, method in enumerate(results["methods"]):
    curve = results["curves"][method]
    if not curve["steps"]:
      continue
    color = f"C{index}"
    ax.plot(curve["steps"], curve["mean"], color=color, marker=".",
            label=f"{results['labels'][method]} (n={curve['n']})")
    ax.fill_between(curve["steps"], curve["min"], curve["max"], color=color, alpha=0.2,
                    linewidth=0)
    chosen = [(r["selected_step"], r["best_dev_wer"]) for r in results["runs"]
              if r["method"] == method and r["finished"] and r.get("best_dev_wer") is not None]
    if chosen:
      ax.scatter(*zip(*chosen), color=color, edgecolor="black", zorder=3, s=18)
  ax.set_xlabel("training step")
  ax.set_ylabel("dev WER % (training evaluation)")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  ax.set_title("Dev WER during training: mean over seeds, shaded min–max, dots selected")
  return _save(fig, path)


def wer_intervals(results: dict[str, Any], path: str) -> str:
  """Per split, each method's pooled WER with its 95% interval and the seeds' WERs."""
  splits = list(results["splits"])
  fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(4.8 * max(1, len(splits)), 4),
                           squeeze=False)
  for ax, split in zip(axes.flat, splits):
    data = results["splits"][split]
    methods = [m for m in results["methods"] if m in data["methods"]]
    for x, method in enumerate(methods):
      summary = data["methods"][method]
      estimate, low, high = summary["wer"]
      color = f"C{results['methods'].index(method)}"
      ax.errorbar([x], [estimate], yerr=[[estimate - low], [high - estimate]], fmt="o",
                  color=color, capsize=5, markersize=7)
      seeds = list(summary["per_seed"].values())
      offsets = [0.15 + 0.2 * i / max(1, len(seeds) - 1) for i in range(len(seeds))]
      ax.scatter([x + o for o in offsets], seeds, color=color, s=10, alpha=0.6)
    ax.set_xticks(range(len(methods)), [results["labels"][m] for m in methods], rotation=20,
                  ha="right", fontsize=8)
    ax.set_ylabel("WER %")
    ax.set_title(split, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)


def pairwise_differences(results: dict[str, Any], path: str) -> str:
  """Per split, each pair's WER difference: utterance CI thick, seeds-too CI thin."""
  splits = list(results["splits"])
  rows = max([len(results["splits"][s]["pairs"]) for s in splits] + [1])
  fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(5.5 * max(1, len(splits)),
                                                            1.0 + 0.55 * rows), squeeze=False)
  labels = results["labels"]
  for ax, split in zip(axes.flat, splits):
    pairs = results["splits"][split]["pairs"]
    for y, pair in enumerate(pairs):
      estimate, low, high = pair["difference"]
      _, wide_low, wide_high = pair["seed_and_utterance"]
      color = {"lower": "C2", "higher": "C3"}.get(pair["verdict"], "0.4")
      ax.plot([wide_low, wide_high], [y, y], color=color, linewidth=1)
      ax.plot([low, high], [y, y], color=color, linewidth=5, alpha=0.7, solid_capstyle="butt")
      ax.plot([estimate], [y], "o", color="black", markersize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(pairs)), [f"{labels[p['a']]} − {labels[p['b']]}" for p in pairs],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("WER difference, points (95% CI)")
    ax.set_title(split, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
  return _save(fig, path)


def write_all(results: dict[str, Any], directory: str) -> list[str]:
  os.makedirs(directory, exist_ok=True)
  return [dev_wer_curves(results, os.path.join(directory, "dev_wer_curves.png")),
          wer_intervals(results, os.path.join(directory, "wer_intervals.png")),
          pairwise_differences(results, os.path.join(directory, "pairwise_differences.png"))]
