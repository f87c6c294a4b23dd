r"""The markdown report of one ``gpu_step_comparison.sh`` run, for docs/benchmarks.md.

Reads the JSON files the script leaves in its output folder (whichever
stages ran) and writes, in this order:

  1. sld_jax (its packed step, ``main_variant``) beside the PyTorch peer
     (compiled, and eager if it ran) at each size: step time, tokens/s, MFU
     against the datasheet, peak device memory;
  2. issue #13's goals, each measured value against its bound ("not
     measured" where the stage did not run);
  3. gpt2_medium's other variants against that one (what each lever is
     worth), with the XLA flags they ran under;
  4. attention alone (``attention.json``): forward + backward time and the
     largest relative error against the float32 reference;
  5. where the step's time goes: its parts timed alone (``--breakdown``),
     and the profile's device time per category and top ops;
  6. every configuration that did not finish, with its error.

::

  python benchmarks/gpu_report.py /work/.device/.../out > report.md

Nothing here touches a device; the numbers are the files'.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from typing import Any, Optional, Sequence

# Issue #13's bounds.
MEDIUM_MFU_GOAL = 0.45
SMALL_MFU_GOAL = 0.35
MEDIUM_PEAK_GIB_GOAL = 30.0
SLD_OVER_MCE_GOAL = 1.03
# The packed step is "packed" (cuDNN's attention) or, where the run's
# attention check timed the Pallas Triton kernel faster
# (faster_packed_variant), "packed_" + the check's name for it: "triton" ->
# "packed_triton", "triton_blocks_64" -> "packed_triton_blocks_64", ...
PACKED_VARIANT = "packed"
TRITON_VARIANT_PREFIX = "packed_triton"
# The Triton kernel's largest relative error (output, gradients) against the
# float32 reference that still lets it stand in for cuDNN's: bf16 attention
# errs by about 1%.
TRITON_ERROR_BOUND = 0.05


def _load(directory: str, name: str) -> Optional[dict[str, Any]]:
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _results(payload: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
  return [] if payload is None else list(payload.get("results", []))


def _find(results: Sequence[dict[str, Any]], **fields) -> Optional[dict[str, Any]]:
  for result in results:
    if "error" not in result and all(result.get(k) == v for k, v in fields.items()):
      return result
  return None


def _jax_peak_gib(result: dict[str, Any]) -> Optional[float]:
  peak = result.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def _number(value: Optional[float], pattern: str) -> str:
  return "-" if value is None else format(value, pattern)


def faster_packed_variant(directory: str) -> str:
  """The packed variant whose attention the run's ``attention.json`` timed
  fastest: the quickest Triton block choice within ``TRITON_ERROR_BOUND``
  where it beat cuDNN's packed attention as training calls it (host
  offsets, ``cudnn_packed_host_pow2``) or cuDNN's failed, else ``"packed"``
  (also without that file)."""
  payload = _load(directory, "attention.json") or {}
  best, best_ms = PACKED_VARIANT, payload.get("cudnn_packed_host_pow2_fwd_bwd_ms", math.inf)
  for name, ms in payload.items():
    if not (name.startswith("triton") and name.endswith("_fwd_bwd_ms")):
      continue
    name = name[:-len("_fwd_bwd_ms")]
    errors = payload.get(f"{name}_relative_error")
    if errors and max(errors.values()) <= TRITON_ERROR_BOUND and ms < best_ms:
      best, best_ms = f"packed_{name}", ms
  return best


def main_variant(directory: str) -> str:
  """The packed variant the run's main stage timed (``jax_main.json``)."""
  for result in _results(_load(directory, "jax_main.json")):
    variant = result.get("variant", "")
    if variant == PACKED_VARIANT or variant.startswith(TRITON_VARIANT_PREFIX):
      return variant
  return PACKED_VARIANT


def comparison_rows(directory: str) -> list[dict[str, Any]]:
  """One row per (size, implementation): sld_jax's main variant and the peers."""
  jax_main = _results(_load(directory, "jax_main.json"))
  variant = main_variant(directory)
  rows = []
  peers = {mode: _results(_load(directory, f"torch_{mode}.json")) for mode in ("compile", "eager")}
  sizes = dict.fromkeys([r["size"] for r in jax_main]
                        + [r["size"] for mode in peers for r in peers[mode]])
  for size in sizes:
    ours = _find(jax_main, size=size, method="sld", variant=variant)
    if ours is not None:
      rows.append({"size": size, "implementation": f"sld_jax `{variant}`",
                   "step_ms": 1e3 * ours["step_seconds"],
                   "tokens_per_second": ours["tokens_per_second"],
                   "mfu": ours.get("mfu_datasheet"), "peak_gib": _jax_peak_gib(ours)})
    for mode, label in (("compile", "PyTorch, `torch.compile`"), ("eager", "PyTorch, eager")):
      peer = _find(peers[mode], size=size, mode=mode)
      if peer is not None:
        rows.append({"size": size, "implementation": label,
                     "step_ms": 1e3 * peer["step_seconds"],
                     "tokens_per_second": peer["tokens_per_second"],
                     "mfu": peer.get("mfu_datasheet"), "peak_gib": peer.get("peak_gib")})
  return rows


def goals(directory: str) -> list[tuple[str, str, str]]:
  """``(goal, measured, verdict)`` for each of issue #13's bounds."""
  jax_main = _results(_load(directory, "jax_main.json"))
  variant = main_variant(directory)
  medium = _find(jax_main, size="gpt2_medium", method="sld", variant=variant)
  small = _find(jax_main, size="gpt2_small", method="sld", variant=variant)
  mce = _find(_results(_load(directory, "jax_mce.json")), size="gpt2_medium",
              method="multimodal_ce", variant=variant)
  peer = _find(_results(_load(directory, "torch_compile.json")), size="gpt2_medium",
               mode="compile")

  def verdict(value, bound, at_most=False):
    if value is None:
      return "not measured"
    return "met" if (value <= bound if at_most else value >= bound) else "not met"

  medium_mfu = medium and medium.get("mfu_datasheet")
  small_mfu = small and small.get("mfu_datasheet")
  medium_peak = medium and _jax_peak_gib(medium)
  ratio = mce and medium and medium["step_seconds"] / mce["step_seconds"]
  speedup = peer and medium and peer["step_seconds"] / medium["step_seconds"]
  return [
      (f"gpt2_medium MFU >= {MEDIUM_MFU_GOAL:.0%}", _number(medium_mfu, ".1%"),
       verdict(medium_mfu, MEDIUM_MFU_GOAL)),
      (f"gpt2_medium peak <= {MEDIUM_PEAK_GIB_GOAL:.0f} GiB",
       _number(medium_peak, ".1f") + (" GiB" if medium_peak is not None else ""),
       verdict(medium_peak, MEDIUM_PEAK_GIB_GOAL, at_most=True)),
      (f"gpt2_small MFU >= {SMALL_MFU_GOAL:.0%}", _number(small_mfu, ".1%"),
       verdict(small_mfu, SMALL_MFU_GOAL)),
      (f"SLD step / Multimodal CE step <= {SLD_OVER_MCE_GOAL:.2f} (gpt2_medium)",
       _number(ratio, ".3f"), verdict(ratio, SLD_OVER_MCE_GOAL, at_most=True)),
      ("compiled peer's step / sld_jax's step (gpt2_medium, > 1: sld_jax faster)",
       _number(speedup, ".2f"), "-" if speedup is not None else "not measured"),
  ]


def lever_rows(directory: str) -> list[dict[str, Any]]:
  """gpt2_medium SLD variants against the main one, measured in this run."""
  main = _find(_results(_load(directory, "jax_main.json")), size="gpt2_medium", method="sld",
               variant=main_variant(directory))
  others = (_results(_load(directory, "jax_more.json"))
            + _results(_load(directory, "jax_xla_flags.json")))
  rows = []
  for result in others:
    if result.get("size") != "gpt2_medium" or result.get("method") != "sld":
      continue
    row = {"variant": result.get("variant"), "xla_flags": result.get("xla_flags") or "",
           "step_ms": None, "vs_main": None, "peak_gib": None,
           "error": result.get("error", "")[:160]}
    if "error" not in result:
      row.update(step_ms=1e3 * result["step_seconds"], peak_gib=_jax_peak_gib(result))
      if main is not None:
        row["vs_main"] = result["step_seconds"] / main["step_seconds"]
    rows.append(row)
  return rows


def attention_rows(directory: str) -> list[tuple[str, float, Optional[float]]]:
  """``(implementation, fwd+bwd ms, largest relative error)`` from attention.json."""
  payload = _load(directory, "attention.json") or {}
  rows = []
  for key, value in payload.items():
    if key.endswith("_fwd_bwd_ms"):
      name = key[:-len("_fwd_bwd_ms")]
      errors = payload.get(f"{name}_relative_error")
      rows.append((name, value, max(errors.values()) if errors else None))
  return rows


BREAKDOWN_ORDER = ("step", "gradients", "forward", "backward", "loss_pass",
                   "decoder_without_loss", "optimizer_and_metrics")


def roofline_rows(directory: str) -> list[dict[str, Any]]:
  """Each timed sld_jax step beside the roofline of its own compiled program."""
  rows = []
  for name in ("jax_main.json", "jax_mce.json"):
    for result in _results(_load(directory, name)):
      if "roofline_ms" in result and "step_seconds" in result:
        step_ms = 1e3 * result["step_seconds"]
        rows.append(dict(size=result["size"], method=result["method"],
                         variant=result["variant"], step_ms=step_ms,
                         roofline_ms=result["roofline_ms"],
                         of_roofline=result["roofline_ms"] / step_ms,
                         categories=result.get("roofline_ms_by_category", {})))
  return rows


def roofline_sections(directory: str) -> list[str]:
  rows = roofline_rows(directory)
  if not rows:
    return []
  lines = ["### Each step against the roofline of its own compiled program", "",
           "The roofline (`benchmarks/hlo_roofline.py`, the program XLA compiled and "
           "autotuned here): every kernel at max(flops / datasheet peak, bytes / "
           "bandwidth), a lower bound on the step time.", "",
           "| size | method | variant | step (ms) | roofline (ms) | roofline / step |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {r['size']} | {r['method']} | `{r['variant']}` | {r['step_ms']:.1f} | "
            f"{r['roofline_ms']:.1f} | {r['of_roofline']:.0%} |" for r in rows]
  first = rows[0]
  lines += ["", f"Roofline by category, {first['size']} {first['method']}:", "",
            "| category | roofline ms |", "|---|---|"]
  lines += [f"| {name} | {ms:.2f} |" for name, ms in first["categories"].items()]
  return lines + [""]


def breakdown_sections(directory: str) -> list[str]:
  """Each ``breakdown_ms`` of jax_breakdown.json: the step's parts timed alone."""
  lines = []
  for result in _results(_load(directory, "jax_breakdown.json")):
    parts = result.get("breakdown_ms")
    if not parts:
      continue
    step = parts.get("step")
    lines += [f"#### The step's parts timed alone: {result['size']} {result['method']} "
              f"`{result['variant']}`", "", "| part | ms | of the step |", "|---|---|---|"]
    lines += [f"| {name} | {parts[name]:.1f} | "
              f"{_number(parts[name] / step if step else None, '.0%')} |"
              for name in BREAKDOWN_ORDER if name in parts]
    lines.append("")
  return lines


def profile_sections(directory: str, top: int = 10) -> list[str]:
  lines = []
  for path in sorted(glob.glob(os.path.join(directory, "profile_*.json"))):
    with open(path) as f:
      summary = json.load(f)
    categories = summary.get("categories_ms_per_step", {})
    total = sum(categories.values())
    lines += [f"#### Profile: {os.path.basename(path)} ({summary.get('steps')} traced steps, "
              f"device time per step)", "", "| category | ms per step | share |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / total:.0%} |" for name, ms in categories.items()]
    lines += [f"| all | {total:.1f} | |", "", "| op | ms per step | calls | category |",
              "|---|---|---|---|"]
    lines += [f"| `{op['op'][:60]}` | {op['ms_per_step']:.2f} | {op['calls']} | "
              f"{op['category']} |" for op in summary.get("top_ops", [])[:top]]
    lines.append("")
  return lines


def failures(directory: str) -> list[str]:
  """``file: configuration: error`` for every configuration that did not finish."""
  found = []
  for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
    with open(path) as f:
      payload = json.load(f)
    for result in payload.get("results", []) if isinstance(payload, dict) else []:
      if "error" in result:
        name = " ".join(str(result.get(k)) for k in ("size", "method", "mode", "variant")
                        if result.get(k) is not None)
        found.append(f"{os.path.basename(path)}: {name}: {result['error'][:300]}")
  return found


def report(directory: str) -> str:
  """The whole markdown report of the run in ``directory``."""
  main_payload = _load(directory, "jax_main.json") or {}
  peer_payload = _load(directory, "torch_compile.json") or {}
  lines = [f"### sld_jax beside the PyTorch peer ({main_payload.get('device', 'device ?')}, "
           f"jax {main_payload.get('jax', '?')}, torch {peer_payload.get('torch', '?')})", "",
           "| size | implementation | step (ms) | tokens/s | MFU (datasheet) | peak GiB |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {r['size']} | {r['implementation']} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_second']:,.0f} | {_number(r['mfu'], '.1%')} | "
            f"{_number(r['peak_gib'], '.1f')} |" for r in comparison_rows(directory)]
  lines += ["", "MFU: PaLM's model FLOPs (`6 N + 12 L d S` per token, the same count on "
            "both sides) against the datasheet's 989 TFLOP/s. Peak: the largest device "
            "memory in use, `peak_bytes_in_use` of sld_jax's process (one configuration "
            "each), `torch.cuda.max_memory_allocated` for PyTorch."]
  lines += ["", "### Issue #13's goals", "", "| goal | measured | |", "|---|---|---|"]
  lines += [f"| {goal} | {measured} | {verdict} |" for goal, measured, verdict in goals(directory)]
  levers = lever_rows(directory)
  variant = main_variant(directory)
  if levers:
    lines += ["", f"### gpt2_medium variants against `{variant}` (same run)", "",
              f"| variant | XLA flags | step (ms) | step / `{variant}` | peak GiB |",
              "|---|---|---|---|---|"]
    for r in levers:
      if r["error"]:
        lines.append(f"| {r['variant']} | {r['xla_flags']} | error: {r['error']} | | |")
      else:
        lines.append(f"| {r['variant']} | {r['xla_flags']} | {r['step_ms']:.1f} | "
                     f"{_number(r['vs_main'], '.3f')} | {_number(r['peak_gib'], '.1f')} |")
  attention = attention_rows(directory)
  if attention:
    lines += ["", "### Attention alone (one layer, forward + backward)", "",
              "| implementation | ms | largest relative error vs float32 |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {_number(error, '.2%')} |" for name, ms, error in attention]
    fraction = (_load(directory, "attention.json") or {}).get("triton_visited_block_fraction")
    if fraction is not None:
      lines += ["", f"The Triton kernel's forward pass visits {fraction:.1%} of causal "
                "attention's 128 x 128 block pairs on these rows (`visited_block_fraction`)."]
    lines += ["", "The packed step this check picks: "
              f"`{faster_packed_variant(directory)}` (`--faster_packed_variant`)."]
  profile = (roofline_sections(directory) + breakdown_sections(directory)
             + profile_sections(directory))
  if profile:
    lines += [""] + profile
  failed = failures(directory)
  if failed:
    lines += ["", "### Configurations that did not finish", ""]
    lines += [f"- {line}" for line in failed]
  return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("directory", help="the folder gpu_step_comparison.sh wrote ($OUT)")
  parser.add_argument("--faster_packed_variant", action="store_true",
                      help="print the packed variant to time (faster_packed_variant), "
                           "not the report")
  args = parser.parse_args(argv)
  if args.faster_packed_variant:
    print(faster_packed_variant(args.directory))
    return
  print(report(args.directory), end="")


if __name__ == "__main__":
  main()
