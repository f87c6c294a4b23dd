r"""Objective overhead: SLD vs Multimodal CE vs Loss Masking train steps.

GPT-2-small dimensions and the paper's vocabulary (GPT-2 text + 6000 speech
units: ``VocabLayout(50259, 6000)``, 56320 rows) on packed rows of realistic
sequences (``train_throughput.make_sequences``). One ``Trainer`` per
objective (same model, optimizer, mesh); each train step is compiled ahead of
time (``lower().compile()``) so that its memory can be read:

  temp bytes       ``compiled.memory_analysis().temp_size_in_bytes``: the
                   step's scratch memory (activations, gradients, logits)
  flops, bytes     ``compiled.cost_analysis()``: XLA's count of floating
                   point operations and bytes accessed per step; unlike
                   step times they do not depend on the machine's load
  unit buffers     buffers that XLA materialises (results of instructions
                   outside fused computations, in the entry computation and
                   loop / branch bodies) with a K = speech_size sized axis;
                   a ``[batch, length, units]`` buffer would show up here

The steps are timed round-robin (LM, MCE, SLD, ..., then the next round) on
one training state passed from step to step (the objectives share the state
structure), so that load changes on this machine hit every objective alike;
the table shows median step times and, per objective, the median over rounds
of its step time divided by Multimodal CE's in the same round (robust to the
load drifting between rounds).

  python benchmarks/objective_overhead.py                 # ~5 min on 2 cores
  python benchmarks/objective_overhead.py --length 1024 --rounds 8

With ``--loss_chunk_size C`` the steps use the chunked loss, and
``--loss_backwards recompute,in_forward`` times both ways of getting its
gradient side by side (configurations ``<objective>/<loss_backward>``; each
is compared with Multimodal CE of the same loss path).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

import train_throughput  # pylint: disable=g-import-not-at-top
from sld_jax.vocab import VocabLayout

OBJECTIVES = {
    "loss_masking": ("loss_masking", "paper"),
    "multimodal_ce": ("multimodal_ce", "paper"),
    "sld": ("sld", "paper"),
    "sld_reference": ("sld", "reference"),
}
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) ")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\S+?)\(")
_ALIASING_OPS = ("parameter", "bitcast", "get-tuple-element", "constant", "tuple")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "pred": 1, "s8": 1, "u8": 1,
          "f64": 8, "s64": 8}


def materialised_buffers(hlo_text: str) -> list[tuple[str, str, tuple[int, ...], int]]:
  """(instruction, opcode, shape, bytes) of every non-fused instruction result.

  Instructions inside fused computations (``calls=%fused_...``) live in
  registers / loops of their fusion, not in memory; aliasing ops (bitcast,
  get-tuple-element, parameter, ...) allocate nothing.
  """
  fused = set(re.findall(r"calls=%([\w.\-]+)", hlo_text))
  buffers, skip = [], False
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and line.rstrip().endswith("{"):
      skip = header.group(2) in fused
      continue
    if skip:
      continue
    match = _INSTRUCTION.match(line)
    if not match or match.group(5) in _ALIASING_OPS:
      continue
    dtype, dims = match.group(3), match.group(4)
    shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    buffers.append((match.group(2), match.group(5), shape,
                    int(np.prod(shape, dtype=np.int64)) * _BYTES.get(dtype, 4)))
  return buffers


def unit_buffers(hlo_text: str, num_units: int) -> dict[str, Any]:
  """Materialised buffers with an axis of ``num_units``: count, bytes, shapes."""
  found = [b for b in materialised_buffers(hlo_text) if num_units in b[2]]
  shapes = collections.Counter(f"{op}{list(shape)}" for _, op, shape, _ in found)
  return {"count": len(found), "bytes": sum(b[3] for b in found),
          "shapes": dict(shapes.most_common(6))}


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="gpt2_small")
  parser.add_argument("--text_size", type=int, default=50259)
  parser.add_argument("--speech_size", type=int, default=6000)
  parser.add_argument("--rows", type=int, default=1)
  parser.add_argument("--length", type=int, default=512, help="tokens per packed row")
  parser.add_argument("--rounds", type=int, default=5,
                      help="timed steps per objective (after one warm-up round)")
  parser.add_argument("--objectives", default="loss_masking,multimodal_ce,sld,sld_reference",
                      help=f"comma-separated subset of {tuple(OBJECTIVES)}")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--loss_chunk_size", type=int, default=None,
                      help="positions per chunk of the chunked loss (default: full logits)")
  parser.add_argument("--loss_backwards", default="recompute",
                      help="comma-separated SpeechTextLM.loss_backward values (chunked loss)")
  args = parser.parse_args(argv)

  objectives = args.objectives.split(",")
  unknown = [n for n in objectives if n not in OBJECTIVES]
  if unknown:
    raise ValueError(f"--objectives: unknown {unknown}; choose from {tuple(OBJECTIVES)}")
  backwards = args.loss_backwards.split(",") if args.loss_chunk_size else ["recompute"]
  # configuration name -> (objective, loss_backward)
  configurations = {(o if len(backwards) == 1 else f"{o}/{b}"): (o, b)
                    for b in backwards for o in objectives}
  names = list(configurations)
  layout = VocabLayout(args.text_size, args.speech_size)
  lengths = train_throughput.sequence_lengths(4000, args.seed)
  stream = iter(train_throughput.make_sequences(layout, lengths, args.seed))
  pending: list[np.ndarray] = []
  batches = [train_throughput.packed_batch(stream, args.rows, args.length, pending)[0]
             for _ in range(args.rounds + 1)]

  load_start = os.getloadavg()[0]
  trainers, compiled, analysis = {}, {}, {}
  state = None
  for name in names:
    objective, backward = configurations[name]
    method, kl_target = OBJECTIVES[objective]
    trainer = train_throughput.build_sld_jax_trainer(
        args.size, layout, max(args.length, 64), method=method, kl_target=kl_target,
        loss_chunk_size=args.loss_chunk_size, loss_backward=backward)
    if state is None:
      state = trainer.init_state()
    start = time.perf_counter()
    # The Trainer's jitted step (in_shardings, donation) compiled ahead of time.
    executable = trainer.lower_train_step(batches[0]).compile()
    memory = executable.memory_analysis()
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = executable.as_text()
    analysis[name] = {
        "compile_seconds": time.perf_counter() - start,
        "temp_bytes": memory.temp_size_in_bytes,
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "argument_bytes": memory.argument_size_in_bytes,
        "units": unit_buffers(text, layout.speech_size),
        "vocab": unit_buffers(text, layout.size),
    }
    trainers[name], compiled[name] = trainer, executable

  times: dict[str, list[float]] = {name: [] for name in names}
  for round_index, batch in enumerate(batches):
    order = names if round_index % 2 == 0 else names[::-1]
    for name in order:
      start = time.perf_counter()
      state, metrics = compiled[name](state, trainers[name].shard_batch(batch))
      jax.block_until_ready(metrics)
      if round_index:  # round 0 warms up
        times[name].append(time.perf_counter() - start)
  load_end = os.getloadavg()[0]

  tokens = statistics.mean(int(np.sum(b["decoder_loss_weights"])) for b in batches)
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"load average {load_start:.2f} -> {load_end:.2f}")
  print(f"{args.size}, VocabLayout({args.text_size}, {args.speech_size}) = {layout.size} rows; "
        f"packed rows [{args.rows}, {args.length}], {tokens:.0f} real target tokens per step; "
        f"{args.rounds} timed rounds; loss: "
        + (f"chunks of {args.loss_chunk_size}" if args.loss_chunk_size else "full logits"))
  print()
  print("| objective | median step (s) | vs multimodal_ce (median of per-round ratios) | "
        "XLA GFLOP / step (vs MCE) | XLA GB accessed / step (vs MCE) | temp memory (MiB) | "
        "materialised [.., K] buffers: count / MiB | [.., V] buffers: count / MiB | "
        "steps (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in names:
    median = statistics.median(times[name])
    info = analysis[name]
    base = name.replace(configurations[name][0], "multimodal_ce", 1)
    ratio = "-"
    if base in times:
      ratio = f"{statistics.median(t / b for t, b in zip(times[name], times[base])):.3f}"
    ref = analysis.get(base, info)
    print(f"| {name} | {median:.3f} | {ratio} | "
          f"{info['flops'] / 1e9:,.1f} ({info['flops'] / ref['flops']:.4f}) | "
          f"{info['bytes_accessed'] / 1e9:,.2f} "
          f"({info['bytes_accessed'] / ref['bytes_accessed']:.4f}) | "
          f"{info['temp_bytes'] / 2**20:,.1f} | "
          f"{info['units']['count']} / {info['units']['bytes'] / 2**20:,.1f} | "
          f"{info['vocab']['count']} / {info['vocab']['bytes'] / 2**20:,.1f} | "
          f"{[round(t, 2) for t in times[name]]} |")
  print()
  for objective in objectives if len(backwards) > 1 else []:
    first, *others = (f"{objective}/{b}" for b in backwards)
    for other in others:
      ratio = statistics.median(t / b for t, b in zip(times[other], times[first]))
      print(f"{other} / {first}: {ratio:.3f} (median of per-round step-time ratios)")
  print()
  for name in names:
    print(f"{name}: [.., K={layout.speech_size}] buffers {analysis[name]['units']['shapes']}; "
          f"[.., V={layout.size}] buffers {analysis[name]['vocab']['shapes']}; "
          f"compile {analysis[name]['compile_seconds']:.0f} s")
  print()
  print("command: python " + " ".join(["benchmarks/objective_overhead.py"] + sys.argv[1:]))


if __name__ == "__main__":
  main()
