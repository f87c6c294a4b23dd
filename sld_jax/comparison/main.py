r"""``python -m sld_jax.comparison`` (also ``scripts/compare_objectives.py``).

  # The comparison: SLD, Multimodal CE and Loss Masking x 5 seeds on the 2,000-utterance test set
  python -m sld_jax.comparison --out runs/compare --seeds 0 1 2 3 4

  # Rebuild the report from finished runs, and publish it as docs/results.md
  # (+ docs/results.json, docs/results/*.png)
  python -m sld_jax.comparison --out runs/compare --report_only --publish docs

  # Another base experiment, with gin bindings for training and scoring
  python -m sld_jax.comparison --out /ckpt/ls_compare \
    --base_gin gin_configs/experiments/librispeech_wavlm_sld.gin \
    --gin.WAVLM_UNITS_DIR=\"/data/wavlm\" --gin.TRAIN_STEPS=20000 --seeds 0 1 2 3 4

Writes ``OUT/plan.json`` (the runs and every invocation), the run folders
(``sld_jax.comparison.runner``), and ``OUT/results.md``, ``OUT/results.json``
and ``OUT/results/*.png`` after every run. The same command resumes.
Exit status: 0 when every run finished, 1 when one failed, 130 when stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from typing import Any, Optional, Sequence

from sld_jax import atomic_files
from sld_jax import gin_utils
from sld_jax.comparison import gin_values
from sld_jax.comparison import markdown
from sld_jax.comparison import plan as plan_lib
from sld_jax.comparison import plots
from sld_jax.comparison import results as results_lib
from sld_jax.comparison import runner
from sld_jax.comparison import stopping

PLAN_FILE = "plan.json"
FIGURES_DIR = "results"
EXIT_INTERRUPTED = 130


def load_plan(out: str) -> tuple[list[plan_lib.RunSpec], list[dict[str, Any]]]:
  path = os.path.join(out, PLAN_FILE)
  if not os.path.exists(path):
    return [], []
  with open(path) as f:
    try:
      data = json.load(f)
      return ([plan_lib.RunSpec(**spec) for spec in data["runs"]], list(data["invocations"]))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: not a plan written by sld_jax.comparison ({e!r})") from None


def save_plan(out: str, plan: Sequence[plan_lib.RunSpec],
              invocations: Sequence[dict[str, Any]]) -> None:
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, PLAN_FILE)
  with atomic_files.replacing(path) as tmp, open(tmp, "w") as f:
    json.dump({"runs": [s.to_json() for s in plan], "invocations": list(invocations)}, f,
              indent=1)


def compact_json(data: Any) -> str:
  """Indented JSON with each list of numbers on one line (per-utterance errors
  would otherwise take a line per number)."""
  text = json.dumps(data, indent=1, default=str)
  numbers = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")
  return numbers.sub(lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]", text) + "\n"


def write_report(directory: str, results: dict[str, Any], figures: bool = True) -> list[str]:
  """``directory/results.md``, ``results.json`` and (``figures``) ``results/*.png``."""
  os.makedirs(directory, exist_ok=True)
  written = []
  for name, text in (("results.md", markdown.render(results, FIGURES_DIR)),
                     ("results.json", compact_json(results))):
    path = os.path.join(directory, name)
    atomic_files.write_text(path, text)
    written.append(path)
  if figures:
    written += plots.write_all(results, os.path.join(directory, FIGURES_DIR))
  return written


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m sld_jax.comparison", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Examples: python -c 'import sld_jax.comparison.main as m; print(m.__doc__)'")
  parser.add_argument("--out", default="runs/compare", help="comparison folder")
  parser.add_argument("--base_gin", action="append", default=None,
                      help=f"base experiment gin file(s), before the objective file "
                           f"(default {plan_lib.DEFAULT_BASE})")
  parser.add_argument("--methods", nargs="+", default=list(plan_lib.DEFAULT_METHODS),
                      help="objective files gin_configs/objectives/<method>.gin "
                           "(default: %(default)s)")
  parser.add_argument("--seeds", nargs="+", type=int, default=list(range(plan_lib.MIN_SEEDS)),
                      help="each run's SEED and DATA_SEED (default %(default)s)")
  parser.add_argument("--patience", type=int, default=3,
                      help="dev evaluations without improvement before a run stops; 0 trains "
                           "to TRAIN_STEPS (default %(default)s)")
  parser.add_argument("--gin_bindings", action="append", default=[], metavar="NAME=VALUE",
                      help="gin binding for training and scoring; --gin.NAME=VALUE is the same")
  parser.add_argument("--eval_gin_bindings", action="append", default=[], metavar="NAME=VALUE",
                      help="gin binding for scoring only, e.g. evaluate.max_batches=2")
  parser.add_argument("--report_only", action="store_true",
                      help="rebuild the report from the runs in --out; train nothing")
  parser.add_argument("--publish", metavar="DIR",
                      help="also write the report to DIR/results.md, DIR/results.json and "
                           "DIR/results/*.png (e.g. docs)")
  parser.add_argument("--dry_run", action="store_true", help="print the plan; run nothing")
  parser.add_argument("--bootstrap_seed", type=int, default=0,
                      help="seed of the bootstrap resampling (default 0)")
  parser.add_argument("--compilation_cache", default=None,
                      help="JAX persistent compilation cache of the runs (default "
                           "OUT/jax_cache unless JAX_COMPILATION_CACHE_DIR is set; '' turns "
                           "it off)")
  args = parser.parse_args(gin_utils.rewrite_gin_args(argv))
  if args.patience < 0:
    parser.error(f"--patience must be >= 0, got {args.patience}")
  return args


def child_env(out: str, cache: Optional[str]) -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if cache is None and "JAX_COMPILATION_CACHE_DIR" not in env:
    cache = os.path.join(out, "jax_cache")
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(cache)
  elif cache == "":
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _report(out: str, plan, invocations, args, figures: bool = True) -> list[str]:
  results = results_lib.summarize(out, plan, invocations, seed=args.bootstrap_seed)
  written = write_report(out, results, figures)
  if args.publish and figures:
    published = dict(results, out=os.path.relpath(out))
    written += write_report(args.publish, published, figures)
  return written


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  out = os.path.abspath(args.out)
  old_plan, invocations = load_plan(out)
  if args.report_only:
    if not old_plan:
      raise SystemExit(f"--report_only: no {PLAN_FILE} in {out}; nothing to report")
    for path in _report(out, old_plan, invocations, args):
      print(f"[compare] wrote {path}")
    return 0
  try:
    plan = plan_lib.build_plan(args.methods, args.seeds)
    base = tuple(args.base_gin or [plan_lib.DEFAULT_BASE])
    for path in base:
      gin_values.resolve_path(path)
    recipe = plan_lib.Recipe(base, tuple(plan_lib.check_bindings(args.gin_bindings, "--gin")),
                             tuple(plan_lib.check_bindings(args.eval_gin_bindings,
                                                           "--eval_gin_bindings")),
                             args.patience)
    for method in args.methods:
      recipe.schedule(method)
    runner.check_same_training(out, plan, recipe)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"sld_jax.comparison: {e}") from None
  if len(args.seeds) < plan_lib.MIN_SEEDS:
    print(f"[compare] note: {len(args.seeds)} seeds; the comparison's intervals are meant for "
          f"at least {plan_lib.MIN_SEEDS}", flush=True)
  if args.dry_run:
    for spec in plan:
      run_dir = os.path.join(out, spec.run_dir)
      steps, every = recipe.schedule(spec.method)
      first = stopping.next_stop([], 0, steps, every, recipe.patience)
      print(f"# {spec.method} seed {spec.seed} -> {run_dir}: dev WER every {every} steps, "
            f"stop after {recipe.patience or 'no'} evaluations without improvement or at "
            f"{steps}; the first segment, and scoring (at the selected step, here {first}):")
      print(shlex.join(recipe.train_command(spec, run_dir, stop_after_steps=first)))
      print(shlex.join(recipe.eval_command(spec, run_dir, step=first)))
    return 0

  command = shlex.join(["python", "-m", "sld_jax.comparison", *argv])
  invocations = [*invocations, {"command": command, "time": runner.now()}]
  plan_all = list(dict.fromkeys([*old_plan, *plan]))
  save_plan(out, plan_all, invocations)
  todo = [spec for spec in plan if not runner.is_done(out, spec, recipe)]
  print(f"[compare] {len(plan)} runs ({len(args.methods)} methods x {len(args.seeds)} seeds); "
        f"{len(plan) - len(todo)} already done, {len(todo)} to run; out: {out}", flush=True)
  run_all = runner.Runner(out, recipe, child_env(out, args.compilation_cache))
  run_all.install_signal_handlers()
  failed, interrupted = [], False
  try:
    for index, spec in enumerate(todo, 1):
      state = run_all.run(spec, index, len(todo))
      if state.get("status") != "done":
        failed.append((spec, state))
      _report(out, plan_all, invocations, args, figures=False)
  except runner.Interrupted as e:
    interrupted = True
    print(f"[compare] interrupted: {e}; rerun the same command to continue", flush=True)
  finally:
    written = _report(out, plan_all, invocations, args)
  print(f"[compare] report: {written[0]}; total time {runner.clock(time.time() - run_all.started)}")
  for spec, state in failed:
    print(f"[compare] failed: {spec.run_dir} in {state.get('failed_stage')} "
          f"(exit {state.get('returncode')}); log: {state.get('log')}")
  if interrupted:
    return EXIT_INTERRUPTED
  return 1 if failed else 0


def run() -> None:
  sys.exit(main(sys.argv[1:]))
