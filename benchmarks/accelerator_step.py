r"""Training step time and model FLOPs utilisation (MFU) on one accelerator.

Times ``Trainer.train_step`` (the jitted, donated step that ``sld_jax.train``
runs) on packed rows of synthetic ``units <speech_end> text <text_end>``
sequences (``U[50, 150]`` units, ``U[5, 20]`` text tokens, the training
throughput benchmark's stream), for each ``--sizes`` x ``--methods``, and
reports

  step time        median over ``--steps`` timed steps (each blocked)
  tokens / s       rows x length / step time (every position is computed,
                   padding included)
  model TFLOP/s    model FLOPs / step time
  MFU              model TFLOP/s / peak, against two peaks: the bf16 matmul
                   rate measured in the same run (an 8192^3 ``jnp.dot``,
                   median of 10) and the datasheet's dense bf16 rate
                   (``--datasheet_tflops``, 989 for H100/H200 SXM)

Model FLOPs follow PaLM (appendix B): per token ``6 N + 12 L d S``, with
``N`` the matmul parameters (every layer's kernels plus the ``V x d`` output
projection; no embedding lookup, norms or biases), ``L`` layers, ``d`` the
model width and ``S`` the row length. Rematerialisation is not counted
(model FLOPs, not hardware FLOPs).

  python benchmarks/accelerator_step.py --sizes gpt2_small gpt2_medium \
      --dtype bfloat16 --rows 16 --length 1024 --out results.json \
      --variants reference cudnn cudnn_chunked cudnn_chunked_bf16logits

``--variants`` names implementation choices (``VARIANTS``): the reference
(written-out attention with dropout, ``[B, L, V]`` float32 logits), cuDNN
flash attention (no attention dropout), plus the chunked loss, plus the
output projection in bfloat16. ``--memory_only`` compiles each step ahead of
time (``Trainer.lower_train_step``) and reports XLA's memory and cost
analysis without running it: the check to make on a CPU before spending
accelerator time ("xla" stands in for "cudnn" off GPUs).

On a CPU (``--sizes tiny --rows 2 --length 256 --steps 2``) it checks the
script; its MFU there is meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "benchmarks")):
  if path not in sys.path:
    sys.path.insert(1, path)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import train_throughput  # pylint: disable=g-import-not-at-top
from sld_jax.vocab import VocabLayout  # pylint: disable=g-import-not-at-top


def measured_matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
  """Median bf16 ``[size, size] @ [size, size]`` rate on the default device."""
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (size, size), jnp.bfloat16)
  b = jax.random.normal(keys[1], (size, size), jnp.bfloat16)
  matmul = jax.jit(jnp.dot)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times) / 1e12


def model_flops_per_token(params: Any, num_layers: int, embed_dim: int,
                          length: int) -> tuple[float, int]:
  """PaLM's ``6 N + 12 L d S`` and ``N`` (kernels + output projection)."""
  matmul_params = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = "/".join(str(getattr(key, "key", key)) for key in path)
    if leaf.ndim >= 2 and not names.endswith("bias") and "position" not in names:
      matmul_params += int(np.prod(leaf.shape))
  return 6 * matmul_params + 12 * num_layers * embed_dim * length, matmul_params


# name -> (DecoderConfig overrides, SpeechTextLM.loss_chunk_size)
VARIANTS: dict[str, tuple[dict[str, Any], Optional[int]]] = {
    "reference": ({}, None),
    "no_attention_dropout": (dict(attention_dropout_rate=0.0), None),
    "cudnn": (dict(attention_implementation="cudnn", attention_dropout_rate=0.0), None),
    "cudnn_chunked": (dict(attention_implementation="cudnn", attention_dropout_rate=0.0), 256),
    "cudnn_chunked_bf16logits": (dict(attention_implementation="cudnn", attention_dropout_rate=0.0,
                                      logits_via_embedding_dtype="bfloat16"), 256),
    "xla_chunked": (dict(attention_implementation="xla", attention_dropout_rate=0.0), 256),
}


def variant_options(name: str) -> tuple[dict[str, Any], Optional[int]]:
  """A variant's options; "cudnn" becomes "xla" where there is no GPU."""
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
  overrides, chunk = VARIANTS[name]
  if overrides.get("attention_implementation") == "cudnn" and jax.default_backend() != "gpu":
    overrides = dict(overrides, attention_implementation="xla")
  return overrides, chunk


def _batches(layout: VocabLayout, args) -> list[dict[str, np.ndarray]]:
  count = args.rows * (args.steps + 2) * (args.length // 60 + 2)
  lengths = train_throughput.sequence_lengths(count, seed=0)
  stream = iter(train_throughput.make_sequences(layout, lengths, seed=0))
  pending: list[np.ndarray] = []
  return [train_throughput.packed_batch(stream, args.rows, args.length, pending)[0]
          for _ in range(args.steps + 2)]


def _trainer(size: str, method: str, variant: str, layout: VocabLayout, args):
  overrides, chunk = variant_options(variant)
  return train_throughput.build_sld_jax_trainer(
      size, layout, args.length, method=method, dtype=args.dtype, remat=args.remat,
      scan_layers=args.scan_layers, loss_chunk_size=chunk, **overrides)


def analyse_size(size: str, method: str, variant: str, args) -> dict[str, Any]:
  """XLA's memory and cost analysis of the compiled step; nothing is run."""
  layout = VocabLayout(args.text_size, args.speech_size)
  batch = _batches(layout, args)[0]
  trainer = _trainer(size, method, variant, layout, args)
  start = time.perf_counter()
  compiled = trainer.lower_train_step(batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      "size": size, "method": method, "variant": variant, "dtype": args.dtype,
      "rows": args.rows, "length": args.length, "vocab": layout.size,
      "compile_seconds": time.perf_counter() - start,
      "temp_bytes": memory.temp_size_in_bytes,
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "hlo_flops": (cost or {}).get("flops"),
  }


def time_size(size: str, method: str, args, variant: str = "reference") -> dict[str, Any]:
  layout = VocabLayout(args.text_size, args.speech_size)
  batches = _batches(layout, args)
  trainer = _trainer(size, method, variant, layout, args)
  state = trainer.init_state()
  config = trainer.model.config
  flops_per_token, matmul_params = model_flops_per_token(
      state.params, config.num_layers, config.embed_dim, args.length)

  start = time.perf_counter()
  state, metrics = trainer.train_step(state, trainer.shard_batch(batches[0]))
  jax.block_until_ready(metrics)
  first_step = time.perf_counter() - start
  state, metrics = trainer.train_step(state, trainer.shard_batch(batches[1]))
  jax.block_until_ready(metrics)
  device_batches = [trainer.shard_batch(batch) for batch in batches[2:]]
  times = []
  for batch in device_batches:
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step = statistics.median(times)
  tokens = args.rows * args.length
  memory = jax.devices()[0].memory_stats() or {}
  return {
      "size": size, "method": method, "variant": variant, "dtype": args.dtype,
      "remat": args.remat, "rows": args.rows, "length": args.length, "vocab": layout.size,
      "matmul_params": matmul_params, "first_step_seconds": first_step,
      "step_seconds": step, "step_seconds_all": times,
      "tokens_per_second": tokens / step,
      "model_tflops_per_second": flops_per_token * tokens / step / 1e12,
      "loss": float(metrics["loss"]),
      "peak_bytes_in_use": memory.get("peak_bytes_in_use"),
  }


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", nargs="+", default=["gpt2_small", "gpt2_medium"])
  parser.add_argument("--methods", nargs="+", default=["sld"])
  parser.add_argument("--variants", nargs="+", default=["reference"], choices=sorted(VARIANTS))
  parser.add_argument("--memory_only", action="store_true",
                      help="compile each step and print XLA's memory/cost analysis, run nothing")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--scan_layers", action="store_true")
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--text_size", type=int, default=50259)
  parser.add_argument("--speech_size", type=int, default=6000)
  parser.add_argument("--datasheet_tflops", type=float, default=989.0)
  parser.add_argument("--matmul_size", type=int, default=8192)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"python {platform.python_version()}", flush=True)
  if args.memory_only:
    for size in args.sizes:
      for method in args.methods:
        for variant in args.variants:
          print(json.dumps(analyse_size(size, method, variant, args)), flush=True)
    return
  peak = measured_matmul_tflops(args.matmul_size)
  print(f"measured bf16 matmul {args.matmul_size}^3: {peak:.0f} TFLOP/s", flush=True)
  results = []
  for size in args.sizes:
    for method, variant in [(m, v) for m in args.methods for v in args.variants]:
      try:
        result = time_size(size, method, args, variant)
      except Exception as error:  # pylint: disable=broad-except  (keep the other configurations)
        print(json.dumps({"size": size, "method": method, "variant": variant,
                          "error": f"{type(error).__name__}: {error}"[:2000]}), flush=True)
        continue
      result["mfu_measured_peak"] = result["model_tflops_per_second"] / peak
      result["mfu_datasheet"] = result["model_tflops_per_second"] / args.datasheet_tflops
      results.append(result)
      print(json.dumps({k: v for k, v in result.items() if k != "step_seconds_all"}),
            flush=True)
      if args.out:  # after every configuration, so that a time limit loses none
        with open(args.out, "w") as f:
          json.dump({"device": device.device_kind, "jax": jax.__version__,
                     "measured_matmul_tflops": peak, "results": results}, f, indent=1)

  print(f"\n| size | method | variant | dtype | rows x length | step (ms) | tokens/s | "
        f"model TFLOP/s | MFU (measured {peak:.0f}) | MFU (datasheet "
        f"{args.datasheet_tflops:.0f}) | peak GiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    peak_gib = (r["peak_bytes_in_use"] or 0) / 2**30
    print(f"| {r['size']} | {r['method']} | {r['variant']} | {r['dtype']}{' remat' if r['remat'] else ''} | "
          f"{r['rows']}x{r['length']} | {1e3 * r['step_seconds']:.1f} | "
          f"{r['tokens_per_second']:,.0f} | {r['model_tflops_per_second']:.1f} | "
          f"{100 * r['mfu_measured_peak']:.1f}% | {100 * r['mfu_datasheet']:.1f}% | "
          f"{peak_gib:.1f} |")


if __name__ == "__main__":
  main()
