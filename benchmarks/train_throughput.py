r"""Training throughput: sld_jax packed rows vs the released PyTorch step.

Both train the same model dimensions on the same token sequences with the
same objective (SLD as the release computes it: ``kl_target="reference"``,
alpha 0.008, eps 0.1, T 1, time masking 0.3, dropout 0.1, AdamW 3e-4 with
linear decay), in float32 on the CPU:

  sld_jax        ``Trainer.train_step`` on packed rows ``[rows, block_size]``
                 (several sequences per row, segment ids; host batch ->
                 ``shard_batch`` -> jitted step, blocked each step)
  torch/block    ``released_pytorch.ReleasedTrainer``: GPT2LMHeadModel, one
                 sequence per row padded to ``block_size`` (as released)
  torch/longest  the same step with rows padded to the batch's longest
                 sequence (a stronger peer than the release; ``--peers``)

Sequences are ``units <speech_end> text <text_end>`` with ``U[50, 150]``
units and ``U[5, 20]`` text tokens (``--units`` / ``--text``), or with the
unit / text lengths of a prepared task's train split (``--lengths_from``);
ids are random in the benchmark's vocabulary (``--text_size``,
``--speech_size``). Every implementation consumes the same sequence stream.

Each implementation runs in its own process (so that its memory is its
own), ``--runs`` times, interleaved (A B C, then C B A, ...). A run warms up
(sld_jax: compile + 1 step), resets the RSS high-water mark
(``/proc/self/clear_refs``), times ``--steps`` steps and reports:

  real target tokens / s   tokens with a loss (sld_jax: weight > 0; the
                           release: shifted labels != -100, i.e. n - 1 per
                           sequence of n tokens) / step time, summed over
                           the timed steps
  step time                median over the timed steps
  steady peak RSS          VmHWM during the timed steps (after the reset)
  warm-up peak RSS         VmHWM before the reset: start-up, model build,
                           compilation and the warm-up steps
  RSS after imports        VmRSS once the libraries are imported

The table shows the median over runs. torch uses ``--torch_threads`` (2)
threads; jax uses XLA's default CPU client.

  python benchmarks/train_throughput.py                      # tiny, ~5 min
  python benchmarks/train_throughput.py --sizes gpt2_small --text_size 50259 \
      --speech_size 6000 --sequences_per_step 2 --steps 2 --runs 2 \
      --no-check_equivalence                                 # ~15 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Iterator, Optional, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The seqio tasks live in the repository's top-level ``tasks`` package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(1, REPO_ROOT)

import numpy as np  # pylint: disable=g-import-not-at-top

from sld_jax.model_inputs import FEATURES  # pylint: disable=g-import-not-at-top
from sld_jax.vocab import EOS_ID, VocabLayout  # pylint: disable=g-import-not-at-top

IMPLEMENTATIONS = ("sld_jax", "torch/block", "torch/longest")
RESULT_PREFIX = "RESULT "


# ----------------------------------------------------------------------------
# Sequences and rows (shared with the other benchmarks).
# ----------------------------------------------------------------------------


def sequence_lengths(count: int, seed: int, units: tuple[int, int] = (50, 150),
                     text: tuple[int, int] = (5, 20),
                     lengths_from: Optional[str] = None) -> list[tuple[int, int]]:
  """``count`` (units, text tokens) pairs: uniform ranges or a task's train split.

  With ``lengths_from`` the pairs cycle through the task's examples in file
  order (units = ``speech_length - 1``, text = ``len(targets) - speech_length - 1``).
  """
  if lengths_from is None:
    rng = np.random.default_rng([seed, 1])
    return list(zip(rng.integers(units[0], units[1] + 1, count).tolist(),
                    rng.integers(text[0], text[1] + 1, count).tolist()))
  pairs = task_lengths(lengths_from)
  return [pairs[i % len(pairs)] for i in range(count)]


def task_lengths(task_name: str, split: str = "train") -> list[tuple[int, int]]:
  """(units, text tokens) of every example of a prepared task's split."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  dataset = seqio.get_mixture_or_task(task_name).get_dataset(
      sequence_length=None, split=split, shuffle=False, use_cached=False, num_epochs=1)
  pairs = []
  for example in dataset.as_numpy_iterator():
    speech = int(example["speech_length"])
    pairs.append((speech - 1, len(example["targets"]) - speech - 1))
  if not pairs:
    raise ValueError(f"task {task_name!r} split {split!r} has no examples")
  return pairs


def make_sequences(layout: VocabLayout, lengths: Sequence[tuple[int, int]],
                   seed: int) -> list[np.ndarray]:
  """``units <speech_end> text <text_end>`` with random unit / text ids.

  ``VocabLayout(8, 4)``, lengths (3, 2) -> e.g. ``[11 9 12 8 5 3 1]``.
  """
  rng = np.random.default_rng([seed, 2])
  sequences = []
  for num_units, num_text in lengths:
    units = layout.units_to_ids(rng.integers(0, layout.speech_size, num_units))
    text = rng.integers(3, layout.text_size, num_text)
    sequences.append(np.concatenate(
        [units, [layout.speech_end_id], text, [EOS_ID]]).astype(np.int32))
  return sequences


def packed_batch(stream: Iterator[np.ndarray], rows: int, length: int,
                 pending: list[np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
  """Fills ``rows`` rows of ``length`` with whole sequences, in stream order.

  A sequence that does not fit the current row starts the next one (as
  seqio's packing keeps sequences whole); ``pending`` carries the one that
  did not fit the last row into the next batch. Packing stops early when the
  stream ends. Returns the seqio decoder features and the number of
  sequences packed::

    sequences [9 10 8 5 1] [11 8 4 1], length 10 ->
    targets   [ 9 10  8  5  1 11  8  4  1  0]
    inputs    [ 0  9 10  8  5  0 11  8  4  0]
    segments  [ 1  1  1  1  1  2  2  2  2  0]
    positions [ 0  1  2  3  4  0  1  2  3  0]
  """
  batch = {name: np.zeros((rows, length), np.int32) for name in FEATURES}
  count = 0
  for row in range(rows):
    used, segment = 0, 0
    while True:
      sequence = pending.pop() if pending else next(stream, None)
      if sequence is None:
        return batch, count
      if len(sequence) > length:
        raise ValueError(f"a sequence of {len(sequence)} tokens does not fit rows of {length}")
      if used + len(sequence) > length:
        pending.append(sequence)
        break
      segment += 1
      span = slice(used, used + len(sequence))
      batch["decoder_target_tokens"][row, span] = sequence
      batch["decoder_input_tokens"][row, span] = np.concatenate([[0], sequence[:-1]])
      batch["decoder_loss_weights"][row, span] = 1
      batch["decoder_segment_ids"][row, span] = segment
      batch["decoder_positions"][row, span] = np.arange(len(sequence))
      used += len(sequence)
      count += 1
  return batch, count


# ----------------------------------------------------------------------------
# Memory.
# ----------------------------------------------------------------------------


def reset_peak_rss() -> bool:
  """Resets this process's RSS high-water mark (VmHWM); False if unsupported."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int:
  """VmHWM of this process (since start or the last ``reset_peak_rss``)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def rss_bytes() -> int:
  """VmRSS of this process now."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def load_average() -> float:
  return os.getloadavg()[0]


# ----------------------------------------------------------------------------
# Workers (one implementation per process).
# ----------------------------------------------------------------------------


def _layout(args) -> VocabLayout:
  return VocabLayout(args.text_size, args.speech_size)


def _sequences(args) -> list[np.ndarray]:
  count = args.sequences_per_step * (args.steps + 4) * 2 + 64
  lengths = sequence_lengths(count, args.seed, tuple(args.units), tuple(args.text),
                             args.lengths_from)
  return make_sequences(_layout(args), lengths, args.seed)


def build_sld_jax_trainer(size: str, layout: VocabLayout, block_size: int, method: str = "sld",
                          kl_target: str = "reference", time_mask_prob: float = 0.3,
                          total_steps: int = 1000, loss_chunk_size=None,
                          loss_backward: str = "recompute",
                          dropout_rng_impl: str = "threefry2x32", devices=None,
                          **config_overrides):
  """A single-device ``Trainer`` with the released recipe (AdamW 3e-4, linear).

  ``devices``: the mesh's device (first of ``jax.devices()`` by default; a
  compile-only device for ``accelerator_step.py --target``).
  """
  import functools  # pylint: disable=g-import-not-at-top
  from sld_jax import losses, optim, partitioning  # pylint: disable=g-import-not-at-top
  from sld_jax.lm import SpeechTextLM  # pylint: disable=g-import-not-at-top
  from sld_jax.model.config import decoder_config  # pylint: disable=g-import-not-at-top
  from sld_jax.trainer import Trainer  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model = SpeechTextLM(
      layout, decoder=functools.partial(decoder_config, size, max_length=block_size,
                                        **config_overrides),
      loss_config=losses.LossConfig(method=method, kl_target=kl_target),
      time_mask_prob=time_mask_prob, loss_chunk_size=loss_chunk_size,
      loss_backward=loss_backward, dropout_rng_impl=dropout_rng_impl)
  schedule = optim.learning_rate_schedule(total_steps=total_steps, kind="linear",
                                          peak_value=3e-4)
  mesh = partitioning.make_mesh(devices=(jax.devices() if devices is None else devices)[:1])
  return Trainer(model, optim.make_optimizer(learning_rate=schedule), schedule, mesh)


def run_sld_jax(args) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import sld_jax.trainer  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  rss_after_imports = rss_bytes()
  layout = _layout(args)
  stream = iter(_sequences(args))
  pending: list[np.ndarray] = []
  batches = [packed_batch(stream, args.packed_rows, args.packed_length or args.block_size,
                          pending)
             for _ in range(args.steps + 1)]
  trainer = build_sld_jax_trainer(args.size, layout, args.block_size)
  state = trainer.init_state()
  compile_start = time.perf_counter()
  state, metrics = trainer.train_step(state, trainer.shard_batch(batches[0][0]))
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - compile_start
  state, metrics = trainer.train_step(state, trainer.shard_batch(batches[0][0]))
  jax.block_until_ready(metrics)
  warmup_peak_rss = peak_rss_bytes()
  reset_peak_rss()
  times, tokens, sequences = [], [], []
  for batch, count in batches[1:]:
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    tokens.append(int(metrics["num_target_tokens"]))
    sequences.append(count)
  return {"times": times, "tokens": tokens, "sequences": sequences,
          "first_step_seconds": compile_seconds, "loss": float(metrics["loss"]),
          "rss_after_imports": rss_after_imports, "warmup_peak_rss": warmup_peak_rss}


def run_torch(args, padding: str) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  import released_pytorch as released  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads)
  torch.manual_seed(args.seed)
  rss_after_imports = rss_bytes()
  layout = _layout(args)
  vocab = released.released_vocab_of(layout)
  sequences = [released.to_released_ids(s, layout) for s in _sequences(args)]
  per_step = args.sequences_per_step
  length = args.block_size if padding == "block" else None
  batches = [released.padded_rows(sequences[i * per_step:(i + 1) * per_step], vocab, length)
             for i in range(args.steps + 1)]
  trainer = released.ReleasedTrainer(
      released.build_model(args.size, vocab, args.block_size), vocab, seed=args.seed)
  start = time.perf_counter()
  trainer.step(batches[0])
  first = time.perf_counter() - start
  warmup_peak_rss = peak_rss_bytes()
  reset_peak_rss()
  times, tokens = [], []
  loss = 0.0
  for batch in batches[1:]:
    start = time.perf_counter()
    loss = trainer.step(batch)
    times.append(time.perf_counter() - start)
    tokens.append(released.real_targets(batch))
  return {"times": times, "tokens": tokens, "sequences": [per_step] * len(times),
          "first_step_seconds": first, "loss": loss, "rss_after_imports": rss_after_imports,
          "warmup_peak_rss": warmup_peak_rss}


def worker(args) -> None:
  load_before = load_average()
  if args.worker == "sld_jax":
    result = run_sld_jax(args)
  else:
    result = run_torch(args, args.worker.split("/")[1])
  result.update(
      implementation=args.worker, size=args.size,
      steady_peak_rss=peak_rss_bytes(),
      load=[load_before, load_average()])
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------
# Equivalence check: the same weights and rows give the same loss.
# ----------------------------------------------------------------------------


def check_equivalence(args, size: str = "tiny", count: int = 4) -> dict[str, float]:
  """Released loss (torch) vs sld_jax ``kl_target="reference"`` on the same net.

  Deterministic (no dropout, no time masking). The release feeds a sequence
  without a leading BOS and never predicts its first token, so the sld_jax
  row here holds the released pairs (input ``s[:-1]``, target ``s[1:]``)
  instead of seqio's (``[0] + s[:-1]``, ``s``)::

    sequence [9 10 8 5 1]  ->  inputs [9 10 8 5], targets [10 8 5 1]
  """
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import released_pytorch as released  # pylint: disable=g-import-not-at-top
  layout = _layout(args)
  trainer = build_sld_jax_trainer(size, layout, args.block_size, time_mask_prob=0.0)
  params = nn.meta.unbox(trainer.model.init_params(jax.random.key(args.seed)))
  sequences = make_sequences(layout, sequence_lengths(count, args.seed + 7), args.seed + 7)
  batch, packed = packed_batch(iter([s[1:] for s in sequences]), 1, args.block_size, [])
  if packed != count:
    raise AssertionError(f"packed {packed} of {count} sequences")
  starts = np.flatnonzero(batch["decoder_positions"][0] == 0)
  for start, sequence in zip(starts, sequences):
    batch["decoder_input_tokens"][0, start:start + len(sequence) - 1] = sequence[:-1]
  _, aux = jax.jit(trainer.model.loss_fn)(params, batch)
  vocab = released.released_vocab_of(layout)
  model = released.released_from_sld(params, trainer.model.config, layout, args.block_size)
  model.eval()
  rows = released.padded_rows([released.to_released_ids(s, layout) for s in sequences], vocab,
                              args.block_size)
  with torch.no_grad():
    loss, parts = released.released_loss(model, rows, vocab, time_mask=0.0,
                                         hf_internal_loss=False)
    # The release's KL also runs at the position fed <text_end> (its label is
    # padding, so its target is uniform): KL(uniform || p_units) per sequence.
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    last = torch.tensor([len(s) - 1 for s in sequences])
    log_p = torch.log_softmax(logits[torch.arange(count), last, -layout.speech_size:], -1)
    after_end = float((-np.log(layout.speech_size) - log_p.mean(-1)).sum() / count)
  out = {"torch_loss": float(loss), "sld_jax_loss": float(aux["loss"])}
  for name in ("ce_text", "ce_speech", "kl_speech"):
    out[f"torch_{name}"] = float(parts[name])
    out[f"sld_jax_{name}"] = float(aux[name])
  out["torch_kl_after_text_end"] = after_end
  out["torch_kl_speech_without_it"] = float(parts["kl_speech"]) - after_end
  return out


# ----------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------


def _worker_command(args, implementation: str, size: str) -> list[str]:
  command = [sys.executable, os.path.abspath(__file__), "--worker", implementation,
             "--size", size]
  for name in ("block_size", "packed_length", "sequences_per_step", "packed_rows", "steps",
               "seed",
               "text_size", "speech_size", "torch_threads"):
    command += [f"--{name}", str(getattr(args, name))]
  command += ["--units", *map(str, args.units), "--text", *map(str, args.text)]
  if args.lengths_from:
    command += ["--lengths_from", args.lengths_from]
  return command


def run_worker(command: list[str]) -> dict[str, Any]:
  """Runs one worker process and returns its RESULT record."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      filter(None, [os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH")]))
  completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  for line in completed.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(f"worker {' '.join(command)} failed ({completed.returncode}):\n"
                     f"{completed.stderr[-4000:]}")


def summarise(records: list[dict[str, Any]]) -> dict[str, float]:
  """Medians over runs of per-run figures."""
  def median(fn):
    return statistics.median(fn(r) for r in records)
  return {
      "step_seconds": median(lambda r: statistics.median(r["times"])),
      "tokens_per_step": median(lambda r: statistics.mean(r["tokens"])),
      "sequences_per_step": median(lambda r: statistics.mean(r["sequences"])),
      "tokens_per_second": median(lambda r: sum(r["tokens"]) / sum(r["times"])),
      "best_tokens_per_second": max(sum(r["tokens"]) / sum(r["times"]) for r in records),
      "steady_peak_rss_mib": median(lambda r: r["steady_peak_rss"] / 2**20),
      "warmup_peak_rss_mib": median(lambda r: r["warmup_peak_rss"] / 2**20),
      "first_step_seconds": median(lambda r: r["first_step_seconds"]),
      "rss_after_imports_mib": median(lambda r: r["rss_after_imports"] / 2**20),
      "runs": len(records),
      "per_run_tokens_per_second": [round(sum(r["tokens"]) / sum(r["times"]), 1)
                                    for r in records],
  }


def print_table(size: str, summaries: dict[str, dict[str, float]], baseline: str) -> None:
  print(f"\n### {size}\n")
  print(f"| implementation | real target tokens/s | vs {baseline} | best run tokens/s | "
        f"best vs best {baseline} | step time (s) | "
        "sequences/step | real tokens/step | steady peak RSS (MiB) | RSS after imports (MiB) |"
        " warm-up peak RSS (MiB) | first step (s) | per-run tokens/s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  base = summaries[baseline]["tokens_per_second"]
  best_base = summaries[baseline]["best_tokens_per_second"]
  for name, s in summaries.items():
    print(f"| {name} | {s['tokens_per_second']:,.0f} | {s['tokens_per_second'] / base:.2f}x | "
          f"{s['best_tokens_per_second']:,.0f} | "
          f"{s['best_tokens_per_second'] / best_base:.2f}x | "
          f"{s['step_seconds']:.2f} | {s['sequences_per_step']:.1f} | "
          f"{s['tokens_per_step']:,.0f} | {s['steady_peak_rss_mib']:,.0f} | "
          f"{s['rss_after_imports_mib']:,.0f} | {s['warmup_peak_rss_mib']:,.0f} | "
          f"{s['first_step_seconds']:.1f} | "
          f"{s['per_run_tokens_per_second']} |")


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="tiny", help="comma-separated: tiny,gpt2_small")
  parser.add_argument("--peers", default=",".join(IMPLEMENTATIONS),
                      help=f"comma-separated subset of {IMPLEMENTATIONS}")
  parser.add_argument("--block_size", type=int, default=1024,
                      help="released padding length and sld_jax packed row length")
  parser.add_argument("--sequences_per_step", type=int, default=4,
                      help="torch: sequences (rows) per step")
  parser.add_argument("--packed_rows", type=int, default=1, help="sld_jax: rows per step")
  parser.add_argument("--packed_length", type=int, default=0,
                      help="sld_jax: tokens per packed row (0: --block_size)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
  parser.add_argument("--runs", type=int, default=3, help="processes per implementation")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--text_size", type=int, default=1000)
  parser.add_argument("--speech_size", type=int, default=2000)
  parser.add_argument("--units", type=int, nargs=2, default=(50, 150))
  parser.add_argument("--text", type=int, nargs=2, default=(5, 20))
  parser.add_argument("--lengths_from", default=None,
                      help="a prepared task whose train split gives the lengths")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--check_equivalence", action=argparse.BooleanOptionalAction,
                      default=True, help="compare the two losses on the same weights first")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    worker(args)
    return

  peers = args.peers.split(",")
  unknown = [p for p in peers if p not in IMPLEMENTATIONS]
  if unknown:
    raise ValueError(f"--peers: unknown {unknown}; choose from {IMPLEMENTATIONS}")
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"load average at start {load_average():.2f}")
  lengths = sequence_lengths(2000, args.seed, tuple(args.units), tuple(args.text),
                             args.lengths_from)
  totals = [u + t + 2 for u, t in lengths]
  print(f"sequences: {args.lengths_from or f'units U{list(args.units)}, text U{list(args.text)}'}"
        f"; length mean {np.mean(totals):.1f}, min {min(totals)}, max {max(totals)}; "
        f"VocabLayout({args.text_size}, {args.speech_size})")
  if args.check_equivalence:
    check = check_equivalence(args)
    print("equivalence (tiny, same weights, 4 sequences, eval mode): " +
          ", ".join(f"{k} {v:.6f}" for k, v in check.items()))

  for size in args.sizes.split(","):
    records: dict[str, list] = {p: [] for p in peers}
    for run in range(args.runs):
      order = peers if run % 2 == 0 else peers[::-1]
      for implementation in order:
        record = run_worker(_worker_command(args, implementation, size))
        records[implementation].append(record)
        print(f"  {size} run {run} {implementation}: "
              f"{sum(record['tokens']) / sum(record['times']):,.0f} tokens/s, "
              f"median step {statistics.median(record['times']):.2f} s, "
              f"load {record['load'][0]:.1f}->{record['load'][1]:.1f}", flush=True)
    if not args.runs:
      continue
    summaries = {p: summarise(records[p]) for p in peers}
    print_table(size, summaries, "torch/block" if "torch/block" in peers else peers[0])
  print(f"\nload average at end {load_average():.2f}")
  print("command: python " + " ".join(["benchmarks/train_throughput.py"] + sys.argv[1:]))


if __name__ == "__main__":
  main()
