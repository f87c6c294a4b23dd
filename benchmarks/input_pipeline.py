r"""Input pipeline: train steps on real seqio batches vs one constant batch.

The smoke run's setup (``gin_configs/experiments/smoke.gin``): the
``sld_embedded_digits_whisper_smoke`` task (built on first use, not timed),
``SeqioSource(global_batch_size=8, sequence_length=256, pack=True)``, the
2-layer 128-wide tiny decoder, SLD, time masking 0.3. Each step does what the
training loop does (``sld_jax.trainer._loop``): take the host batch,
``model.check_batch``, ``shard_batch``, dispatch ``train_step``; steps are
not blocked one by one (dispatch is asynchronous, so host work overlaps the
step), only at the end of a block of ``--block_steps`` steps.

  real      host batches from ``SeqioSource.batches`` (tf.data: read, seqio
            preprocess, pack, batch, prefetch)
  constant  the first real batch, reused every step (no data loading)

Blocks alternate (constant, real, real, constant, ...); the table gives the
median per-step time of each and their ratio. The pipeline alone
(``next(batches)`` in a loop, no training) is timed too.

  python benchmarks/input_pipeline.py                      # ~2 min
  python benchmarks/input_pipeline.py --batch_size 32 --sequence_length 1024 \
      --num_layers 4 --embed_dim 256 --mlp_dim 1024
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from typing import Optional, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The seqio tasks live in the repository's top-level ``tasks`` package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(1, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

import train_throughput  # pylint: disable=g-import-not-at-top
from sld_jax import input_pipeline as pipeline_lib


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--task", default="sld_embedded_digits_whisper_smoke")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--sequence_length", type=int, default=256)
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--embed_dim", type=int, default=128)
  parser.add_argument("--mlp_dim", type=int, default=512)
  parser.add_argument("--block_steps", type=int, default=20, help="steps per timed block")
  parser.add_argument("--blocks", type=int, default=6, help="timed blocks per mode")
  parser.add_argument("--pipeline_batches", type=int, default=200,
                      help="batches pulled when timing the pipeline alone")
  args = parser.parse_args(argv)

  source = pipeline_lib.SeqioSource(
      task_name=args.task, global_batch_size=args.batch_size,
      sequence_length=args.sequence_length, pack=True, shuffle=True, seed=0)
  layout = source.layout  # prepares the task on first use
  trainer = train_throughput.build_sld_jax_trainer(
      "tiny", layout, args.sequence_length, method="sld", kl_target="paper",
      num_layers=args.num_layers, embed_dim=args.embed_dim, mlp_dim=args.mlp_dim)
  model = trainer.model

  # The pipeline alone, on a fresh iterator (its first batch builds the dataset).
  start = time.perf_counter()
  alone = source.batches(0)
  first = next(alone)
  build_seconds = time.perf_counter() - start
  start = time.perf_counter()
  real_tokens = []
  for batch in itertools.islice(alone, args.pipeline_batches):
    real_tokens.append(int(np.sum(batch["decoder_loss_weights"])))
  pipeline_seconds = (time.perf_counter() - start) / args.pipeline_batches
  del alone

  batches = source.batches(0)
  constant = next(batches)
  state = trainer.init_state()
  state, metrics = trainer.train_step(state, trainer.shard_batch(constant))
  jax.block_until_ready(metrics)  # compile

  def run_block(mode: str) -> float:
    nonlocal state
    start = time.perf_counter()
    for step in range(args.block_steps):
      host = next(batches) if mode == "real" else constant
      model.check_batch(host, args.sequence_length, where=f"batch of step {step}")
      state, step_metrics = trainer.train_step(state, trainer.shard_batch(host))
    jax.block_until_ready(step_metrics)
    return (time.perf_counter() - start) / args.block_steps

  run_block("real")
  run_block("constant")  # warm-up of both paths
  load_start = os.getloadavg()[0]
  per_step = {"constant": [], "real": []}
  for block in range(args.blocks):
    order = ("constant", "real") if block % 2 == 0 else ("real", "constant")
    for mode in order:
      per_step[mode].append(run_block(mode))
  load_end = os.getloadavg()[0]

  constant_step = statistics.median(per_step["constant"])
  real_step = statistics.median(per_step["real"])
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"load average {load_start:.2f} -> {load_end:.2f}")
  print(f"task {args.task}: [{args.batch_size}, {args.sequence_length}] packed rows, "
        f"{statistics.mean(real_tokens):.0f} real target tokens per batch (constant batch: "
        f"{int(np.sum(constant['decoder_loss_weights']))}); decoder {args.num_layers} layers x "
        f"{args.embed_dim} ({trainer.num_params / 1e6:.2f}M parameters), SLD")
  print()
  print("| mode | median step (ms) | vs constant | per-block step times (ms) |")
  print("|---|---|---|---|")
  for mode, median in (("constant", constant_step), ("real", real_step)):
    print(f"| {mode} | {1000 * median:.1f} | {median / constant_step:.3f} | "
          f"{[round(1000 * t, 1) for t in per_step[mode]]} |")
  print()
  print(f"pipeline alone: {1000 * pipeline_seconds:.1f} ms per batch "
        f"({1 / pipeline_seconds:,.0f} batches/s, "
        f"{statistics.mean(real_tokens) / pipeline_seconds:,.0f} real tokens/s); "
        f"first batch (builds the dataset) {build_seconds:.1f} s; first batch tokens "
        f"{int(np.sum(first['decoder_loss_weights']))}")
  print()
  print("command: python " + " ".join(["benchmarks/input_pipeline.py"] + sys.argv[1:]))


if __name__ == "__main__":
  main()
