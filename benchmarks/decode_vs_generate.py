r"""Greedy decoding: sld_jax KV-cache decoding vs transformers ``generate``.

The same network on both sides: random sld_jax parameters, exported with
``sld_jax.hf_gpt2.export_hf_gpt2`` (sld id order) and loaded by
``transformers.GPT2LMHeadModel.from_pretrained``. The same prompts
(``0 units <speech_end>`` as training feeds them, ``U[50, 150]`` units), the same amount of work:
every row generates exactly ``--max_new_tokens`` tokens, because both sides
restrict the next token to text ids other than ``<text_end>`` (sld_jax:
``greedy_decode``'s text-only bias plus a -inf on <text_end> in the step
function; transformers: a ``LogitsProcessor`` adding the same bias). So both
run one prefill and ``max_new_tokens - 1`` cached steps, and their tokens
should agree (reported; float rounding can flip a near-tie).

  sld_jax   ``jax.jit`` of init_cache + ``decoding.greedy_decode`` over
            ``decoding.cached_fns`` (right-padded prompts, per-row cache index;
            the prefill projects each row's last position only; with
            ``--text_logits``, the default, prefill and steps project onto
            the text ids only, as ``sld_jax.scoring`` decodes;
            ``--no-text_logits`` projects onto the whole vocabulary as
            ``generate`` does)
  generate  ``model.generate(do_sample=False, num_beams=1, use_cache=True)``
            on left-padded prompts with an attention mask, as the release
            decodes; ``torch.set_num_threads(--torch_threads)``

Calls alternate (sld_jax, generate, sld_jax, ...) after one warm-up call each
(sld_jax compiles there); utterances/s = batch size / median call time; the
best (shortest) calls are compared too, since on a shared machine torch's
OpenMP threads sometimes stall for whole calls when another process takes a
core. The
prompt pass alone is timed the same way (sld_jax: ``--max_new_tokens 1``
decoding, i.e. prefill + the first token; generate: ``max_new_tokens=1``), so
the table splits each call into prefill and the cached steps.

  python benchmarks/decode_vs_generate.py                  # tiny, ~1 min
  python benchmarks/decode_vs_generate.py --size gpt2_small --text_size 50259 \
      --speech_size 6000 --reps 3
  (add --no-text_logits to either for the whole-vocabulary projection)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Optional, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from sld_jax import decoding  # pylint: disable=g-import-not-at-top
from sld_jax import hf_gpt2
from sld_jax import model_inputs
from sld_jax.model import decoder as decoder_lib
from sld_jax.model.config import decoder_config
from sld_jax.vocab import EOS_ID, PAD_ID, VocabLayout


def make_prompts(layout: VocabLayout, batch_size: int, units: tuple[int, int],
                 seed: int) -> list[np.ndarray]:
  """``0 units <speech_end>`` prompts (``model_inputs.prompt_from_units``), ``U[units]`` units."""
  rng = np.random.default_rng([seed, 3])
  prompts = []
  for _ in range(batch_size):
    count = int(rng.integers(units[0], units[1] + 1))
    prompts.append(model_inputs.prompt_from_units(
        rng.integers(0, layout.speech_size, count), layout))
  return prompts


def no_eos_bias(layout: VocabLayout, vocab_size: int) -> np.ndarray:
  """[V]: 0 on text ids other than PAD and <text_end>, -inf elsewhere."""
  bias = np.asarray(decoding.text_only_bias(layout, vocab_size)).copy()
  bias[EOS_ID] = -np.inf
  return bias


def sld_jax_decoder(module: decoder_lib.Decoder, layout: VocabLayout, batch_size: int,
                    cache_length: int, max_new_tokens: int, text_logits: bool = True):
  """A jitted ``(params, prompts [B, P], lengths [B]) -> tokens [B, N]``.

  ``text_logits``: project onto the text ids only (``cached_fns(..., layout)``,
  as ``sld_jax.scoring`` decodes); else onto the whole vocabulary, as
  ``generate`` does.
  """
  ban_eos = jnp.zeros((module.config.vocab_size,), jnp.float32).at[EOS_ID].set(-jnp.inf)

  @jax.jit
  def decode(params, prompts, lengths):
    prefill_fn, step_fn = decoding.cached_fns(module, params, layout if text_logits else None)

    def prefill_no_eos(cache, tokens, prompt_lengths):
      logits, cache = prefill_fn(cache, tokens, prompt_lengths)
      return logits + ban_eos[:logits.shape[-1]], cache

    def step_no_eos(cache, tokens):
      logits, cache = step_fn(cache, tokens)
      return logits + ban_eos[:logits.shape[-1]], cache

    cache = decoder_lib.init_cache(module, batch_size, cache_length)
    return decoding.greedy_decode(prefill_no_eos, step_no_eos, cache, prompts, lengths,
                                  layout=layout, max_decode_length=max_new_tokens).tokens
  return decode


class AddBias(transformers.LogitsProcessor):
  """``scores + bias``: the text-only, no-<text_end> restriction for ``generate``."""

  def __init__(self, bias: np.ndarray):
    self.bias = torch.from_numpy(bias)

  def __call__(self, input_ids, scores):
    return scores + self.bias


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--text_size", type=int, default=1000)
  parser.add_argument("--speech_size", type=int, default=2000)
  parser.add_argument("--batch_size", type=int, default=16,
                      help="utterances per call (the release: per_device_eval_batch_size=16)")
  parser.add_argument("--units", type=int, nargs=2, default=(50, 150))
  parser.add_argument("--max_new_tokens", type=int, default=20)
  parser.add_argument("--reps", type=int, default=5, help="timed calls per implementation")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--text_logits", action=argparse.BooleanOptionalAction, default=True,
                      help="sld_jax projects onto the text ids only, as sld_jax.scoring "
                           "decodes (--no-text_logits: the whole vocabulary, as generate)")
  args = parser.parse_args(argv)
  torch.set_num_threads(args.torch_threads)

  layout = VocabLayout(args.text_size, args.speech_size)
  prompts = make_prompts(layout, args.batch_size, tuple(args.units), args.seed)
  lengths = np.array([len(p) for p in prompts], np.int32)
  longest = int(lengths.max())
  cache_length = longest + args.max_new_tokens
  config = decoder_config(args.size, vocab_size=layout.size,
                          max_length=max(cache_length, 64), dropout_rate=0.0)
  module = decoder_lib.Decoder(config)
  params = nn.meta.unbox(decoder_lib.init_params(module, jax.random.key(args.seed)))

  right = np.zeros((args.batch_size, longest), np.int32)
  left = np.full((args.batch_size, longest), PAD_ID, np.int64)
  mask = np.zeros((args.batch_size, longest), np.int64)
  for row, prompt in enumerate(prompts):
    right[row, :len(prompt)] = prompt
    left[row, longest - len(prompt):] = prompt
    mask[row, longest - len(prompt):] = 1

  decode = sld_jax_decoder(module, layout, args.batch_size, cache_length, args.max_new_tokens,
                           args.text_logits)
  decode_first = sld_jax_decoder(module, layout, args.batch_size, cache_length, 1,
                                 args.text_logits)
  with tempfile.TemporaryDirectory() as directory:
    hf_gpt2.export_hf_gpt2(params, config, layout, directory)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(directory)
  hf_model.eval()
  processors = transformers.LogitsProcessorList([AddBias(no_eos_bias(layout, layout.size))])
  hf_inputs = {"input_ids": torch.from_numpy(left), "attention_mask": torch.from_numpy(mask)}

  def run_sld_jax():
    return np.asarray(jax.block_until_ready(decode(params, right, lengths)))

  def run_generate(max_new_tokens=args.max_new_tokens):
    with torch.inference_mode():
      out = hf_model.generate(
          **hf_inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
          do_sample=False, num_beams=1, use_cache=True, pad_token_id=PAD_ID,
          logits_processor=processors)
    return out[:, longest:].numpy()

  def run_sld_jax_prefill():
    return np.asarray(jax.block_until_ready(decode_first(params, right, lengths)))

  def run_generate_prefill():
    return run_generate(1)

  start = time.perf_counter()
  jax_tokens = run_sld_jax()
  jax_first = time.perf_counter() - start
  start = time.perf_counter()
  hf_tokens = run_generate()
  hf_first = time.perf_counter() - start
  run_sld_jax_prefill()
  run_generate_prefill()
  if hf_tokens.shape != jax_tokens.shape:
    raise AssertionError(f"generate returned {hf_tokens.shape}, sld_jax {jax_tokens.shape}")

  times = {"sld_jax": [], "generate": [], "sld_jax prefill": [], "generate prefill": []}
  load_start = os.getloadavg()[0]
  for rep in range(args.reps):
    order = (("sld_jax", run_sld_jax), ("generate", run_generate),
             ("sld_jax prefill", run_sld_jax_prefill), ("generate prefill", run_generate_prefill))
    for name, fn in (order if rep % 2 == 0 else order[::-1]):
      time.sleep(0.2)  # let the other runtime's worker threads go idle
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  load_end = os.getloadavg()[0]

  same_rows = float(np.mean(np.all(jax_tokens == hf_tokens, axis=1)))
  same_tokens = float(np.mean(jax_tokens == hf_tokens))
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"load average {load_start:.2f} -> {load_end:.2f}")
  print(f"{args.size}, VocabLayout({args.text_size}, {args.speech_size}) ({layout.size} rows); "
        f"{args.batch_size} prompts of {lengths.min()}-{longest} tokens, "
        f"{args.max_new_tokens} new tokens each; identical rows {same_rows:.0%}, "
        f"identical tokens {same_tokens:.1%}; sld_jax logits over "
        f"{'the text ids' if args.text_logits else 'the whole vocabulary'}")
  print()
  print("| implementation | utterances/s | vs generate | median call (s) | "
        "ms per generated token (batch) | best call (s) | best vs best | first call (s) | "
        "calls (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, first in (("sld_jax", jax_first), ("generate", hf_first),
                      ("sld_jax prefill", None), ("generate prefill", None)):
    base_name = "generate prefill" if "prefill" in name else "generate"
    base = statistics.median(times[base_name])
    median = statistics.median(times[name])
    best = min(times[name])
    tokens = 1 if "prefill" in name else args.max_new_tokens
    print(f"| {name} | {args.batch_size / median:,.1f} | {base / median:.2f}x | {median:.3f} | "
          f"{1000 * median / tokens:.1f} | {best:.3f} | {min(times[base_name]) / best:.2f}x | "
          f"{'-' if first is None else f'{first:.1f}'} | "
          f"{[round(t, 3) for t in times[name]]} |")
  steps = {name: statistics.median(times[name]) - statistics.median(times[name + " prefill"])
           for name in ("sld_jax", "generate")}
  print()
  print(f"cached steps only ({args.max_new_tokens - 1} per call, call minus prefill): "
        f"sld_jax {1000 * steps['sld_jax'] / max(args.max_new_tokens - 1, 1):.1f} ms/step, "
        f"generate {1000 * steps['generate'] / max(args.max_new_tokens - 1, 1):.1f} ms/step "
        f"({steps['generate'] / max(steps['sld_jax'], 1e-9):.1f}x)")
  print()
  print("command: python " + " ".join(["benchmarks/decode_vs_generate.py"] + sys.argv[1:]))


if __name__ == "__main__":
  main()
