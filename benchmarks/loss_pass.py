r"""The fused output projection + loss, its value and gradient, against an earlier commit's.

Times ``jax.value_and_grad`` of ``fused_loss.compute_loss_fused`` (the
training path of ``loss_backward="in_forward"``) for each objective, with
this tree's ``sld_jax/losses.py`` and ``sld_jax/fused_loss.py`` and with
those two files as they were at ``--baseline_rev`` (read with ``git show``
and imported under other names; the rest of the package is this tree's),
interleaved in one process (A B, then B A, ...). Reports the median step of
each, the median of per-round ratios, XLA's bytes accessed, and the largest
difference in value and gradients between the two::

  python benchmarks/loss_pass.py --baseline_rev 428914b --objectives sld multimodal_ce

Shapes default to a gpt2_small chunked pass: ``[2, 512, 768]`` hidden states,
the paper's vocabulary ``VocabLayout(50259, 6000)``, chunks of 256
positions, bfloat16 logits with float32 accumulation, 80% unit targets.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(1, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from sld_jax import fused_loss  # pylint: disable=g-import-not-at-top
from sld_jax.vocab import VocabLayout  # pylint: disable=g-import-not-at-top


def modules_at(rev: str, directory: str):
  """``fused_loss`` as of ``rev``, importing ``losses`` as of ``rev``."""
  def load(name: str, text: str):
    path = os.path.join(directory, f"{name}_at_rev.py")
    with open(path, "w") as f:
      f.write(text)
    spec = importlib.util.spec_from_file_location(f"{name}_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

  def show(path: str) -> str:
    return subprocess.run(["git", "-C", REPO_ROOT, "show", f"{rev}:{path}"], check=True,
                          capture_output=True, text=True).stdout

  load("losses", show("sld_jax/losses.py"))
  fused = show("sld_jax/fused_loss.py").replace("from sld_jax import losses\n",
                                                "import losses_at_rev as losses\n")
  return load("fused_loss", fused)


def inputs(args, layout: VocabLayout):
  rng = np.random.default_rng(0)
  shape = (args.rows, args.length)
  hidden = jnp.asarray(rng.normal(size=shape + (args.embed_dim,)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(layout.real_size, args.embed_dim)) * 0.05, jnp.float32)
  units = rng.integers(layout.speech_offset, layout.real_size, shape)
  text = rng.integers(0, layout.speech_offset, shape)
  targets = jnp.asarray(np.where(rng.uniform(size=shape) < args.unit_fraction, units, text),
                        jnp.int32)
  segments = jnp.asarray(np.repeat(np.arange(1, 5), -(-args.length // 4))[:args.length]
                         [None].repeat(args.rows, 0), jnp.int32)
  return hidden, table, targets, jnp.ones(shape, jnp.float32), segments


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--baseline_rev", required=True, help="git revision to compare with")
  parser.add_argument("--objectives", nargs="+", default=["sld", "multimodal_ce"])
  parser.add_argument("--rows", type=int, default=2)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--embed_dim", type=int, default=768)
  parser.add_argument("--chunk_size", type=int, default=256)
  parser.add_argument("--unit_fraction", type=float, default=0.8)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args(argv)
  layout = VocabLayout(50259, 6000)
  hidden, table, targets, weights, segments = inputs(args, layout)
  with tempfile.TemporaryDirectory() as directory:
    implementations = {"baseline": modules_at(args.baseline_rev, directory), "tree": fused_loss}
    for objective in args.objectives:
      steps = {}
      for name, module in implementations.items():
        def loss(h, t, module=module, objective=objective):
          return module.compute_loss_fused(h, t, targets, weights, segments, layout=layout,
                                           chunk_size=args.chunk_size, method=objective,
                                           logits_dtype=jnp.bfloat16)[0]
        steps[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
      outputs = {name: step(hidden, table) for name, step in steps.items()}
      result: dict[str, Any] = {"objective": objective, "baseline_rev": args.baseline_rev}
      (value_a, grads_a), (value_b, grads_b) = outputs.values()
      result["value_difference"] = abs(float(value_a) - float(value_b))
      result["max_gradient_difference"] = max(
          float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads_a, grads_b))
      result["max_gradient"] = max(float(jnp.max(jnp.abs(a))) for a in grads_a)
      for name, step in steps.items():
        cost = step.lower(hidden, table).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        result[f"{name}_gb_accessed"] = (cost or {}).get("bytes accessed", 0) / 1e9
      times: dict[str, list[float]] = {name: [] for name in steps}
      for round_index in range(args.rounds):
        order = list(steps) if round_index % 2 == 0 else list(steps)[::-1]
        for name in order:
          start = time.perf_counter()
          jax.block_until_ready(steps[name](hidden, table))
          times[name].append(time.perf_counter() - start)
      for name, values in times.items():
        result[f"{name}_median_seconds"] = statistics.median(values)
      result["tree_over_baseline"] = statistics.median(
          b / a for a, b in zip(times["baseline"], times["tree"]))
      print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
