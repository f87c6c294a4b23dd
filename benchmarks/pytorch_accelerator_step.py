r"""The released PyTorch step on one GPU, the peer of ``accelerator_step.py``.

The same shapes as ``accelerator_step.py`` (``--rows`` x ``--length`` tokens,
vocabulary ``--text_size + --speech_size``): Hugging Face ``GPT2LMHeadModel``
with SDPA attention, the released loss with its one-hot ``[B, L, K]`` KL
target (``released_pytorch.released_loss``), time masking, fused AdamW, bf16
autocast; eager and ``torch.compile``. Rows are random ids with every
position real (the release pads one utterance per row; a full row is the
packed stream's cost). Reports the median step time over ``--steps``, tokens
per second, MFU against ``--datasheet_tflops`` with the same model-FLOPs
count as ``accelerator_step.py`` (PaLM: ``6 N + 12 L d S``), and the peak of
``torch.cuda.max_memory_allocated``::

  python benchmarks/pytorch_accelerator_step.py --sizes gpt2_small gpt2_medium \
      --modes eager compile --out torch.json

Every configuration is written to ``--out`` as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "benchmarks")):
  if path not in sys.path:
    sys.path.insert(1, path)

import torch  # pylint: disable=g-import-not-at-top

import released_pytorch  # pylint: disable=g-import-not-at-top


def model_flops_per_token(model: torch.nn.Module, num_layers: int, embed_dim: int,
                          length: int) -> float:
  """PaLM's ``6 N + 12 L d S``; N: 2-D weights except positions (tied head once)."""
  matmul_params = sum(p.numel() for name, p in model.named_parameters()
                      if p.ndim >= 2 and "wpe" not in name)
  return 6 * matmul_params + 12 * num_layers * embed_dim * length


def time_size(size: str, mode: str, args) -> dict[str, Any]:
  vocab = released_pytorch.ReleasedVocab(gpt_vocab_size=args.text_size - 1,
                                         speech_size=args.speech_size)
  model = released_pytorch.build_model(size, vocab, args.length, dropout_rate=args.dropout)
  model.config._attn_implementation = "sdpa"  # pylint: disable=protected-access
  config = model.config
  flops = model_flops_per_token(model, config.n_layer, config.n_embd, args.length)
  trainer = released_pytorch.ReleasedTrainer(
      model, vocab, device=args.device, autocast_dtype=torch.bfloat16,
      compile_model=mode == "compile")
  generator = torch.Generator().manual_seed(0)
  batches = []
  for _ in range(args.steps + args.warmup):
    ids = torch.randint(0, vocab.vocab_size, (args.rows, args.length), generator=generator)
    batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
  cuda = torch.device(args.device).type == "cuda"
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  for batch in batches[:args.warmup]:
    trainer.step(batch)
  if cuda:
    torch.cuda.synchronize()
  warmup_seconds = time.perf_counter() - start
  times = []
  for batch in batches[args.warmup:]:
    start = time.perf_counter()
    loss = trainer.step(batch)      # float(loss) synchronises
    times.append(time.perf_counter() - start)
  step = statistics.median(times)
  tokens = args.rows * args.length
  return {"size": size, "mode": mode, "rows": args.rows, "length": args.length,
          "vocab": vocab.vocab_size, "warmup_seconds": warmup_seconds, "step_seconds": step,
          "tokens_per_second": tokens / step,
          "mfu_datasheet": flops * tokens / step / 1e12 / args.datasheet_tflops,
          "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
          "loss": loss}


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", nargs="+", default=["gpt2_small", "gpt2_medium"])
  parser.add_argument("--modes", nargs="+", default=["eager", "compile"],
                      choices=["eager", "compile"])
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--text_size", type=int, default=50259)
  parser.add_argument("--speech_size", type=int, default=6000)
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--datasheet_tflops", type=float, default=989.0)
  parser.add_argument("--device", default="cuda")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  results = []
  for size in args.sizes:
    for mode in args.modes:
      try:
        result = time_size(size, mode, args)
      except Exception as error:  # pylint: disable=broad-except  (keep the other configurations)
        result = {"size": size, "mode": mode, "error": f"{type(error).__name__}: {error}"[:2000]}
      results.append(result)
      print(json.dumps(result), flush=True)
      if args.out:
        with open(args.out, "w") as f:
          json.dump({"torch": torch.__version__, "results": results}, f, indent=1)
      if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
  main()
