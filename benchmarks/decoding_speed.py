r"""Decoding speed: KV-cache vs naive full-forward decoding, greedy vs beam search.

Random parameters (no checkpoint needed) for the named model sizes; a batch
of right-padded prompts ``0 units <speech_end>`` (as training feeds them) whose lengths are drawn from
``[prompt_length / 2, prompt_length]`` (LibriSpeech utterances average about
12 s: 600 units at 50 units/s, 150-250 tokens once the units are turned into
SentencePiece pieces); every row generates up to ``decode_length`` text
tokens (random models rarely emit <text_end>, so nearly all of them).

Modes:
  cached greedy    prefill the prompt once (next-token logits at the last
                   prompt position only), then one position per step, the
                   output projection restricted to the text ids
                   (``decoding.cached_fns(module, params, layout)``, as
                   ``sld_jax.scoring`` decodes)
  naive greedy     rerun the full forward pass over the sequence every step
  cached beam      beam search (``--beam_size``) over the KV cache
  naive beam       beam search rerunning the full forward pass

Each row of the table is one jitted call, compiled first (``compile s``),
then timed over ``--repeats`` runs (best). ``tok/s`` counts generated text
tokens of all rows (the best beam per row); ``speedup`` is against naive
decoding of the same size and search.

  python benchmarks/decoding_speed.py --sizes tiny,gpt2_small --batch_size 8 \
      --prompt_length 192 --decode_length 32
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from sld_jax import decoding
from sld_jax import model_inputs
from sld_jax import partitioning
from sld_jax.model import decoder
from sld_jax.model.config import decoder_config
from sld_jax.vocab import VocabLayout

MODES = ("cached_greedy", "naive_greedy", "cached_beam", "naive_beam")


def random_params(module: decoder.Decoder, seed: int = 0):
  """GPT-2-like random parameters (N(0, 0.02) matrices) without compiling the init."""
  shapes, _ = partitioning.abstract_state(functools.partial(decoder.init_params, module),
                                         jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if "scale" in jax.tree_util.keystr(path):
      return np.ones(leaf.shape, leaf.dtype)
    if leaf.ndim >= 2:
      return (rng.standard_normal(leaf.shape, np.float32) * 0.02).astype(leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def make_prompts(layout: VocabLayout, batch: int, length: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(length // 2, 2), length + 1, size=batch).astype(np.int32)
  prompts = np.zeros((batch, length), np.int32)
  for row, prompt_length in enumerate(lengths):
    units = rng.integers(0, layout.speech_size, prompt_length - 2)
    prompts[row, :prompt_length] = model_inputs.prompt_from_units(units, layout)
  return prompts, lengths


def decode_fn(module, layout, mode: str, width: int, decode_length: int, beam_size: int):
  """A jitted ``(params, prompts, lengths) -> DecodeResult`` for one mode."""
  cached, search = mode.split("_")

  def run(params, prompts, lengths):
    batch = prompts.shape[0]
    if cached == "cached":
      cache = decoder.init_cache(module, batch, width + decode_length)
      fns = decoding.cached_fns(module, params, layout)
      axes = decoding.decoder_cache_batch_axes(module, batch, width + decode_length)
    else:
      cache = decoding.init_uncached_state(batch, width + decode_length)
      fns = decoding.uncached_fns(module, params)
      axes = None
    return decoding.decode(*fns, cache, prompts, lengths, layout=layout,
                           max_decode_length=decode_length, method=search,
                           beam_size=beam_size, cache_batch_axes=axes)
  return jax.jit(run)


def bench(size: str, mode: str, args, layout: VocabLayout) -> dict:
  config = decoder_config(size=size, vocab_size=layout.size, dropout_rate=0.0, dtype=args.dtype)
  module = decoder.Decoder(config)
  params = jax.device_put(random_params(module))
  prompts, lengths = make_prompts(layout, args.batch_size, args.prompt_length)
  fn = decode_fn(module, layout, mode, args.prompt_length, args.decode_length, args.beam_size)
  start = time.perf_counter()
  compiled = fn.lower(params, prompts, lengths).compile()
  compile_seconds = time.perf_counter() - start
  best = float("inf")
  for _ in range(args.repeats):
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(params, prompts, lengths))
    best = min(best, time.perf_counter() - start)
  generated = int(np.asarray(result.lengths).sum())
  params_m = sum(x.size for x in jax.tree.leaves(params)) / 1e6
  return {"size": size, "mode": mode, "params_m": params_m,
          "compile": compile_seconds, "seconds": best, "tokens": generated,
          "utt_per_s": args.batch_size / best, "tok_per_s": generated / best}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="tiny,gpt2_small")
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--prompt_length", type=int, default=192)
  parser.add_argument("--decode_length", type=int, default=32)
  parser.add_argument("--beam_size", type=int, default=4)
  parser.add_argument("--text_size", type=int, default=1000)
  parser.add_argument("--speech_size", type=int, default=6000,
                      help="K: 6000 unit pieces as in the paper")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--skip", default="",
                      help="size:mode pairs to leave out, e.g. gpt2_small:naive_beam")
  args = parser.parse_args(argv)
  layout = VocabLayout(args.text_size, args.speech_size)
  skip = set(filter(None, args.skip.split(",")))

  rows = []
  for size in args.sizes.split(","):
    for mode in args.modes.split(","):
      if f"{size}:{mode}" in skip:
        continue
      row = bench(size, mode, args, layout)
      print(f"{size} {mode}: {row['seconds']:.3f} s, {row['tok_per_s']:.0f} tok/s", flush=True)
      rows.append(row)

  naive = {(r["size"], r["mode"].split("_")[1]): r["seconds"] for r in rows
           if r["mode"].startswith("naive")}
  print()
  print(f"{jax.devices()[0].platform} ({len(jax.devices())} device, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}), jax {jax.__version__}, "
        f"{args.dtype}; batch {args.batch_size}, prompts {args.prompt_length // 2}-"
        f"{args.prompt_length} tokens, {args.decode_length} new tokens, beam {args.beam_size}, "
        f"vocabulary {layout.size}")
  print()
  print("| size | params | mode | compile s | decode s | utt/s | tok/s | speedup |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    base = naive.get((r["size"], r["mode"].split("_")[1]))
    speedup = f"{base / r['seconds']:.1f}x" if base else "-"
    print(f"| {r['size']} | {r['params_m']:.0f}M | {r['mode'].replace('_', ' ')} | "
          f"{r['compile']:.1f} | {r['seconds']:.3f} | {r['utt_per_s']:.1f} | "
          f"{r['tok_per_s']:.0f} | {speedup} |")
  print()
  print("command: python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]))


if __name__ == "__main__":
  main()
