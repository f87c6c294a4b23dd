"""Where a traced program spent its device time, from a ``jax.profiler`` trace.

Reads the ``.xplane.pb`` that ``jax.profiler.trace`` writes (through
``jax.profiler.ProfileData``, no TensorBoard needed) and sums event
durations per XLA op (the ``hlo_op`` stat, else the event name) on the
planes whose name starts with ``plane_prefix`` ("/device:GPU" on a GPU,
"/host:CPU" on a CPU), per line (a GPU stream, a CPU thread)::

  python benchmarks/profile_summary.py /tmp/trace --plane /device:GPU --top 30

Each op is also put in a coarse category by its name (``CATEGORIES``), so a
step's time reads as "matmuls x ms, attention y ms, the rest z ms".
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
from typing import Any, Optional, Sequence

# First match wins; matched against the lower-cased kernel name, then the
# op name (an XLA op name such as "custom-call.12" says nothing: cuBLAS GEMMs
# and cuDNN attention are both custom calls, their kernels tell them apart).
CATEGORIES = (
    ("attention", ("cudnn", "fmha", "flash", "sdpa", "dot_product_attention")),
    ("matmul", ("gemm", "cublas", "nvjet", "cutlass", "xmma", "matmul", "dot")),
    ("collectives", ("all-reduce", "all-gather", "reduce-scatter", "nccl")),
    ("random bits", ("rng", "philox", "threefry", "random")),
    ("copies and transposes", ("copy", "transpose", "memcpy", "memset")),
    ("reductions (norms, softmax, loss)", ("reduce", "logsumexp", "softmax")),
)


# Lines a profiler may derive from the kernel lines; counted in their own
# totals only, so that no kernel's time is summed twice.
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework Ops", "Framework Name Scope",
                 "Source code", "XLA TraceMe", "Launch Stats", "Async XLA Ops")


def category(op: str, kernel: str = "") -> str:
  """A coarse category for an op: by its kernel's name first, then its own.

  >>> category("custom-call.12", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n")
  'matmul'
  >>> category("custom-call.3", "cudnn_generated_fort_native_sdpa_sm90_knob_7")
  'attention'
  """
  for text in (kernel.lower(), op.lower()):
    for name, needles in CATEGORIES:
      if any(needle in text for needle in needles):
        return name
  return "other fusions and kernels"


def find_trace(directory: str) -> str:
  paths = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {directory}")
  return paths[-1]


def summarize(trace_dir: str, plane_prefix: str = "/device:GPU", top: int = 25,
              steps: int = 1) -> dict[str, Any]:
  """Per-line totals and the ``top`` ops by time, in ms per step."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  path = find_trace(trace_dir)
  data = ProfileData.from_file(path)
  per_op: dict[str, float] = collections.defaultdict(float)
  counts: dict[str, int] = collections.defaultdict(int)
  kernels: dict[str, str] = {}
  per_category: dict[str, float] = collections.defaultdict(float)
  lines = {}
  for plane in data.planes:
    if not plane.name.startswith(plane_prefix):
      continue
    for line in plane.lines:
      total = 0.0
      derived = line.name in DERIVED_LINES
      for event in line.events:
        if derived:
          total += event.duration_ns / 1e6
          continue
        stats = dict(event.stats)
        op = str(stats.get("hlo_op") or event.name)
        duration = event.duration_ns / 1e6
        total += duration
        per_op[op] += duration
        counts[op] += 1
        kernels.setdefault(op, event.name)
        per_category[category(op, event.name)] += duration
      lines[f"{plane.name} / {line.name}"] = total / steps
  ranked = sorted(per_op, key=per_op.get, reverse=True)[:top]
  return {
      "trace": path, "plane_prefix": plane_prefix, "steps": steps,
      "lines_ms_per_step": lines,
      "categories_ms_per_step": {k: v / steps for k, v in sorted(
          per_category.items(), key=lambda kv: -kv[1])},
      "top_ops": [{"op": op, "ms_per_step": per_op[op] / steps, "calls": counts[op],
                   "kernel": kernels[op][:160], "category": category(op, kernels[op])}
                  for op in ranked],
  }


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("trace_dir")
  parser.add_argument("--plane", default="/device:GPU")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--steps", type=int, default=1, help="steps in the trace (divides times)")
  args = parser.parse_args(argv)
  print(json.dumps(summarize(args.trace_dir, args.plane, args.top, args.steps), indent=1))


if __name__ == "__main__":
  main()
