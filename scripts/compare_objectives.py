#!/usr/bin/env python3
r"""Loss Masking vs Multimodal CE vs SLD, at the same budget, over seeds.

The paper's experiment at our scale: every method (an objective file
``gin_configs/objectives/<method>.gin``) is trained on the same base
experiment with the same steps, batch and learning rate, once per seed, then
scored on every eval split; the report gives each method's WER/CER as
mean +- standard deviation (min-max) over seeds, the per-seed values, the
training curves and one-factor SLD sweeps.

  # The full comparison on the embedded digits corpus
  # (gin_configs/experiments/objective_comparison_digits.gin: 200 steps of
  # 8 x 256 tokens; 2 CPU cores: 5-9 min a run)
  python scripts/compare_objectives.py --out runs/compare --seeds 0 1 2

  # Plus one-factor sweeps of SLD around alpha 0.008, eps 0.1, T 1
  python scripts/compare_objectives.py --out runs/compare --seeds 0 1 2 \
    --sweep alpha=0.008,0.08,0.8 --sweep epsilon=0.1,0.3 \
    --sweep temperature=1,2 --sweep_seeds 0

  # Another task: a base experiment (its objective is overridden) and gin
  python scripts/compare_objectives.py --out /ckpt/ls_compare \
    --base_gin gin_configs/experiments/librispeech_wavlm_sld.gin \
    --gin.WAVLM_UNITS_DIR=\"/data/wavlm\" --steps 20000 --seeds 0 1

  # Rebuild results.md / results.json / the PNGs from the finished runs
  python scripts/compare_objectives.py --out runs/compare --report_only

Each run is ``python -m sld_jax.train`` then ``python -m sld_jax.eval`` (as in
scripts/demo.sh), as subprocesses with their logs in the run folder::

  OUT/<method>/seed<k>/               MODEL_DIR: checkpoints/, metrics.jsonl,
                                      eval_metrics.jsonl, config.gin
  OUT/<method>/seed<k>/eval/          metrics.jsonl (one row per split), predictions
  OUT/<method>/seed<k>/train.log, eval.log, run.json (commands, status, times)
  OUT/sweeps/<method>_<param>_<value>/seed<k>/   sweep points (a sweep's default
                                      value is the method's own run, trained once)
  OUT/plan.json                       every run asked for and the command lines
  OUT/results.md, results.json, training_curves.png, wer_per_method.png, sweeps.png

Gin composition of a run: ``--gin_file`` for each ``--base_gin`` then the
objective file; then the budget flags (``--steps`` -> TRAIN_STEPS,
``--batch_size`` -> BATCH_SIZE, ``--learning_rate`` -> LEARNING_RATE,
``--warmup_steps`` -> WARMUP_STEPS, ``--eval_every`` -> EVAL_EVERY; unset
flags keep the base's values), the
``--gin`` bindings, the sweep value, and last MODEL_DIR, SEED (parameter init,
dropout) and DATA_SEED (the training data order). ``--eval_gin`` bindings go
to the evaluation only (e.g. ``evaluate.max_batches=2``).

Runs are resumable: a finished run (run.json "done" and eval rows at its last
step) is skipped, an interrupted one continues from its last checkpoint (or
is only re-scored), and a run folder holding checkpoints of another training
command stops the script before anything runs (one that failed before its
first checkpoint starts again). A failed run is reported with its log and the
others go on; the exit status is then 1. Ctrl-C (or SIGTERM) stops the
current run at a checkpoint, writes the report so far and exits 130.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTIVES_DIR = os.path.join("gin_configs", "objectives")
DEFAULT_BASE = os.path.join("gin_configs", "experiments", "objective_comparison_digits.gin")
DEFAULT_METHODS = ("loss_masking", "multimodal_ce", "sld", "sld_reference")
SWEEP_PARAMETERS = ("alpha", "epsilon", "temperature")
SWEEP_SYMBOLS = {"alpha": "α", "epsilon": "ε", "temperature": "T"}
# Bindings the script owns; --gin may not set them.
OWNED_MACROS = {"MODEL_DIR": "--out", "SEED": "--seeds", "DATA_SEED": "--seeds / --fixed_data_seed",
                "TRAIN_STEPS": "--steps", "BATCH_SIZE": "--batch_size",
                "LEARNING_RATE": "--learning_rate", "WARMUP_STEPS": "--warmup_steps",
                "EVAL_EVERY": "--eval_every",
                "CHECKPOINT_PATH": "(the run folder)", "EVAL_OUTPUT_DIR": "(the run folder)"}
# Operative-config values that make up the budget every method must share.
BUDGET_KEYS = ("TRAIN_STEPS", "BATCH_SIZE", "SEQUENCE_LENGTH", "LEARNING_RATE", "WARMUP_STEPS",
               "GRADIENT_ACCUMULATION_STEPS", "TASK")
CURVE_METRICS = ("ce_text", "ce_speech", "kl_speech", "loss")
PLAN_FILE = "plan.json"
STATE_FILE = "run.json"
EXIT_INTERRUPTED = 130

# ----------------------------------------------------------------------------
# The plan: which runs, in which folders, with which gin.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One entry of the comparison; several entries may share a run folder.

  ``group`` is "method" (a row of the main table) or "sweep" (a sweep point);
  ``overrides`` are the LossConfig bindings that differ from the objective
  file's, e.g. ``(("alpha", 0.004),)``; ``run_dir`` is relative to OUT.
  """

  group: str
  method: str
  seed: int
  run_dir: str
  sweep_param: Optional[str] = None
  sweep_value: Optional[float] = None
  overrides: tuple = ()

  @property
  def label(self) -> str:
    if self.group == "sweep":
      return f"{self.method} {self.sweep_param}={_number(self.sweep_value)}"
    return self.method

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "overrides": [list(o) for o in self.overrides]}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "RunSpec":
    return cls(**{**data, "overrides": tuple(tuple(o) for o in data.get("overrides", ()))})


def _number(value: float) -> str:
  """``0.004 -> "0.004"``, ``1.0 -> "1"``, ``2e-05 -> "2e-05"``."""
  return format(float(value), "g")


def parse_gin_values(text: str) -> dict[str, Any]:
  r"""Single-line ``NAME = value`` bindings of gin text, blocks expanded.

  >>> parse_gin_values("losses.LossConfig:\n  alpha = 0.008\nX = 'a'  # c")
  {'losses.LossConfig.alpha': 0.008, 'X': 'a'}

  Values that are not Python literals (references, macros, the first line of
  a multi-line value) are kept as text; continuation lines are skipped.
  """
  values, block = {}, None
  for raw in text.splitlines():
    line = raw.split("#", 1)[0].rstrip()
    if not line.strip():
      continue
    indented = raw[:1] in (" ", "\t")
    if not indented:
      block = None
      if line.endswith(":"):
        block = line[:-1].strip()
        continue
    elif block is None:
      continue   # a continuation line of a multi-line value
    if "=" not in line or line.lstrip().startswith(("import ", "include ", "from ")):
      continue
    name, value = (part.strip() for part in line.split("=", 1))
    if indented:
      name = f"{block}.{name}"
    try:
      values[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      values[name] = value
  return values


def gin_file_values(path: str, seen: Optional[set] = None) -> dict[str, Any]:
  """``parse_gin_values`` of a file and, first, of the files it includes."""
  seen = set() if seen is None else seen
  full = resolve_gin_path(path)
  if full in seen:
    return {}
  seen.add(full)
  with open(full) as f:
    text = f.read()
  values = {}
  for include in re.findall(r"^include\s+'([^']+)'", text, re.M):
    values.update(gin_file_values(include, seen))
  values.update(parse_gin_values(text))
  return values


def resolve_gin_path(path: str) -> str:
  """A gin file as the mains find it: relative to the cwd, then the repo root."""
  for candidate in (path, os.path.join(REPO_ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(f"gin file {path!r} not found (looked in {os.getcwd()} and "
                          f"{REPO_ROOT})")


def loss_config_defaults(method: str, bindings: Sequence[str]) -> dict[str, Any]:
  """The LossConfig knobs a method's runs get: its objective file, then --gin."""
  values = gin_file_values(objective_file(method))
  for binding in bindings:
    name, _, value = binding.partition("=")
    values.update(parse_gin_values(f"{name.strip()} = {value.strip()}"))
  defaults = {}
  for parameter in SWEEP_PARAMETERS:
    for key in (f"losses.LossConfig.{parameter}", f"LossConfig.{parameter}"):
      if key in values:
        defaults[parameter] = values[key]
  return defaults


def objective_file(method: str) -> str:
  path = os.path.join(OBJECTIVES_DIR, f"{method}.gin")
  if not os.path.isfile(os.path.join(REPO_ROOT, path)):
    available = sorted(name[:-4] for name in os.listdir(os.path.join(REPO_ROOT, OBJECTIVES_DIR))
                       if name.endswith(".gin"))
    raise ValueError(f"unknown method {method!r}: there is no {path}; methods: {available}")
  return path


def parse_sweep(spec: str) -> tuple[str, list[float]]:
  """``"alpha=0.004,0.008" -> ("alpha", [0.004, 0.008])``."""
  name, sep, values = spec.partition("=")
  name = name.strip()
  if not sep or name not in SWEEP_PARAMETERS or not values.strip():
    raise ValueError(f"--sweep {spec!r}: want PARAM=V1,V2,... with PARAM one of "
                     f"{SWEEP_PARAMETERS}, e.g. --sweep alpha=0.004,0.008,0.016")
  parsed = []
  for value in values.split(","):
    try:
      number = float(value)
    except ValueError:
      raise ValueError(f"--sweep {spec!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
      raise ValueError(f"--sweep {spec!r}: {value!r} is not finite")
    if number not in parsed:
      parsed.append(number)
  return name, parsed


def build_plan(methods: Sequence[str], seeds: Sequence[int],
               sweeps: Sequence[tuple[str, list[float]]] = (), sweep_method: str = "sld",
               sweep_seeds: Sequence[int] = (0,), bindings: Sequence[str] = ()
               ) -> list[RunSpec]:
  """The runs, main methods first; a sweep point at the default value is the
  method's own run (same folder, trained once).

  >>> [s.run_dir for s in build_plan(["sld"], [0], [("alpha", [0.008, 0.016])])]
  ['sld/seed0', 'sld/seed0', 'sweeps/sld_alpha_0.016/seed0']
  """
  if len(set(methods)) != len(methods):
    raise ValueError(f"--methods names a method twice: {list(methods)}")
  if len(set(seeds)) != len(seeds) or len(set(sweep_seeds)) != len(sweep_seeds):
    raise ValueError(f"a seed is given twice: --seeds {list(seeds)} "
                     f"--sweep_seeds {list(sweep_seeds)}")
  for method in list(methods) + ([sweep_method] if sweeps else []):
    objective_file(method)
  plan = [RunSpec("method", method, seed, f"{method}/seed{seed}")
          for method in methods for seed in seeds]
  if sweeps:
    defaults = loss_config_defaults(sweep_method, bindings)
    names = [name for name, _ in sweeps]
    if len(set(names)) != len(names):
      raise ValueError(f"--sweep gives a parameter twice: {names}")
    for name, values in sweeps:
      if name not in defaults:
        raise ValueError(f"--sweep {name}: the objective {objective_file(sweep_method)} does not "
                         f"set losses.LossConfig.{name}; sweep an SLD method")
      for value in values:
        overrides = () if float(value) == float(defaults[name]) else ((name, float(value)),)
        for seed in sweep_seeds:
          run_dir = (f"{sweep_method}/seed{seed}" if not overrides else
                     f"sweeps/{sweep_method}_{name}_{_number(value)}/seed{seed}")
          plan.append(RunSpec("sweep", sweep_method, seed, run_dir, name, float(value),
                              overrides))
  return plan


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What every run shares: the gin files and bindings around the method."""

  base_gin: tuple
  budget: tuple = ()           # ("TRAIN_STEPS=200", ...)
  bindings: tuple = ()         # --gin, to training and evaluation
  eval_bindings: tuple = ()    # --eval_gin, to evaluation only
  fixed_data_seed: Optional[int] = None

  def gin_files(self, method: str) -> list[str]:
    return [*self.base_gin, objective_file(method)]

  def run_bindings(self, spec: RunSpec, model_dir: str) -> list[str]:
    data_seed = spec.seed if self.fixed_data_seed is None else self.fixed_data_seed
    return [*self.budget, *self.bindings,
            *[f"losses.LossConfig.{name}={value!r}" for name, value in spec.overrides],
            f"MODEL_DIR={json.dumps(model_dir)}", f"SEED={spec.seed}", f"DATA_SEED={data_seed}"]

  def train_command(self, spec: RunSpec, model_dir: str) -> list[str]:
    return [sys.executable, "-m", "sld_jax.train",
            *[f"--gin_file={f}" for f in self.gin_files(spec.method)],
            *[f"--gin.{b}" for b in self.run_bindings(spec, model_dir)]]

  def eval_command(self, spec: RunSpec, model_dir: str) -> list[str]:
    return [sys.executable, "-m", "sld_jax.eval",
            *[f"--gin_file={f}" for f in self.gin_files(spec.method)],
            *[f"--gin.{b}" for b in self.run_bindings(spec, model_dir)],
            f"--gin.CHECKPOINT_PATH={json.dumps(model_dir)}",
            f"--gin.EVAL_OUTPUT_DIR={json.dumps(os.path.join(model_dir, 'eval'))}",
            *[f"--gin.{b}" for b in self.eval_bindings]]


def fingerprint(command: Sequence[str], model_dir: str) -> list[str]:
  """A command without the interpreter and with the run folder as ``<RUN_DIR>``,
  so a moved OUT or another Python still matches."""
  return [arg.replace(model_dir, "<RUN_DIR>") for arg in command[1:]]


def check_bindings(bindings: Sequence[str], flag: str) -> list[str]:
  """``NAME=VALUE`` strings; the macros the script sets are refused."""
  checked = []
  for binding in bindings:
    name, sep, value = binding.partition("=")
    name = name.strip()
    if not sep or not name or not value.strip():
      raise ValueError(f"{flag} {binding!r}: want NAME=VALUE, e.g. "
                       f"{flag} 'decoder_config.dropout_rate=0.0'")
    if name in OWNED_MACROS:
      raise ValueError(f"{flag} {binding!r}: {name} is set by the script; use "
                       f"{OWNED_MACROS[name]}")
    checked.append(f"{name}={value.strip()}")
  return checked


# ----------------------------------------------------------------------------
# Running: train, then score, with progress and resume.
# ----------------------------------------------------------------------------


class Interrupted(Exception):
  """SIGINT / SIGTERM reached the script; the current run was stopped cleanly."""


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The rows of a JSON-lines file ([] if missing); a bad line raises naming it."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON line ({e}): {line[:120]!r}") from None
  return rows


def read_state(run_dir: str) -> dict[str, Any]:
  path = os.path.join(run_dir, STATE_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); delete it to rerun the run") from None


def write_state(run_dir: str, state: dict[str, Any]) -> None:
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, STATE_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(state, f, indent=1)
  os.replace(path + ".tmp", path)


def operative_config(run_dir: str) -> dict[str, Any]:
  """Single-line values of ``MODEL_DIR/config.gin`` (training's operative config)."""
  path = os.path.join(run_dir, "config.gin")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return parse_gin_values(f.read())


def latest_checkpoint(run_dir: str) -> Optional[int]:
  directory = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
  return max(steps) if steps else None


def final_eval_rows(run_dir: str) -> list[dict[str, Any]]:
  """The eval rows of the latest scored step, the last row per (task, split)."""
  rows = read_jsonl(os.path.join(run_dir, "eval", "metrics.jsonl"))
  if not rows:
    return []
  for number, row in enumerate(rows, 1):
    for key in ("step", "split", "wer", "cer"):
      if key not in row:
        raise ValueError(f"{os.path.join(run_dir, 'eval', 'metrics.jsonl')}:{number}: no "
                         f"{key!r} field (written by python -m sld_jax.eval?)")
  step = max(row["step"] for row in rows)
  latest = {}
  for row in rows:
    if row["step"] == step:
      latest[(row.get("task", "?"), row["split"])] = row
  return list(latest.values())


def training_finished(run_dir: str) -> tuple[bool, str]:
  """Whether training reached TRAIN_STEPS (a stopped-early run exits 0 too)."""
  total = operative_config(run_dir).get("TRAIN_STEPS")
  latest = latest_checkpoint(run_dir)
  if not isinstance(total, int):
    return False, f"no TRAIN_STEPS in {os.path.join(run_dir, 'config.gin')}"
  if latest != total:
    return False, f"the latest checkpoint is step {latest}, TRAIN_STEPS is {total}"
  return True, ""


def _clock(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


PROGRESS_LINE = re.compile(r"(step \d+/\d+ \(\d+%\)) loss (\S+).*\| (\S+ s/step).*\| ETA (.+)$")
EVAL_LINE = re.compile(r"eval at step (\d+): .*?(\S+/wer) (\S+)")


class Runner:
  """Runs the plan's folders one after another; prints progress and ETA."""

  def __init__(self, out: str, recipe: Recipe, env: dict[str, str], echo=print):
    self.out = out
    self.recipe = recipe
    self.env = env
    self.echo = echo
    self.started = time.time()
    self.durations: list[float] = []
    self.process: Optional[subprocess.Popen] = None
    self.signals = 0

  # -- signals: forward to the child once per signal, stop after the run ----

  def install_signal_handlers(self) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    """The first signal asks the run to checkpoint and stop, a second one stops
    it at once; after that the default handlers are back."""
    del frame
    self.signals += 1
    os.write(2, (f"\n[compare] received {signal.Signals(signum).name}: stopping the current "
                 f"run {'at once' if self.signals > 1 else 'at a checkpoint'}\n").encode())
    if self.process is not None and self.process.poll() is None:
      self.process.send_signal(signum)
    if self.signals > 1:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      signal.signal(signal.SIGTERM, signal.SIG_DFL)

  # -- one subprocess --------------------------------------------------------

  def _stream(self, command: list[str], log_path: str, stage: str, run_started: float,
              remaining_runs: int) -> tuple[int, list[str]]:
    """Runs a command into its log; echoes progress lines; returns (rc, tail)."""
    tail = collections.deque(maxlen=15)
    with open(log_path, "a") as log:
      log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')}\n# "
                f"{shlex.join(command)}\n")
      log.flush()
      self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace",
                                      start_new_session=True)
      try:
        for line in self.process.stdout:
          log.write(line)
          tail.append(line.rstrip())
          progress = PROGRESS_LINE.search(line)
          evaluated = EVAL_LINE.search(line)
          if progress:
            step, loss, speed, eta = progress.groups()
            in_run = time.time() - run_started
            overall = self.eta(remaining_runs, in_run + _seconds(eta) + 60, in_run)
            eta = eta.strip()
            self.echo(f"    {stage}: {step} loss {loss} | {speed} | run ETA {eta} | "
                      f"all ETA {overall}", flush=True)
          elif evaluated:
            self.echo(f"    {stage}: step {evaluated.group(1)} {evaluated.group(2)} "
                      f"{float(evaluated.group(3)):.2f}%", flush=True)
        returncode = self.process.wait()
      finally:
        if self.process.poll() is None:   # an exception while reading: never orphan it
          self.process.send_signal(signal.SIGINT)
          self.process.wait()
        self.process = None
    return returncode, list(tail)

  def eta(self, remaining_runs: int, this_run_estimate: float = 0.0,
          this_run_elapsed: float = 0.0) -> str:
    """Remaining time: the runs after this one at the mean finished-run time
    (or this run's estimate before any finished), plus what is left of this one."""
    per_run = statistics.mean(self.durations) if self.durations else this_run_estimate
    if not per_run:
      return "?"
    left_here = max((this_run_estimate or per_run) - this_run_elapsed, 0)
    return _clock(left_here + per_run * max(remaining_runs - 1, 0))

  # -- one run ---------------------------------------------------------------

  def run(self, spec: RunSpec, index: int, total: int) -> dict[str, Any]:
    """Trains and scores one folder; returns its run.json state."""
    if self.signals:
      raise Interrupted("stopped between runs")
    run_dir = os.path.join(self.out, spec.run_dir)
    train = self.recipe.train_command(spec, run_dir)
    evaluate = self.recipe.eval_command(spec, run_dir)
    state = read_state(run_dir)
    started = time.time()
    self.echo(f"[{index}/{total}] {spec.label} seed {spec.seed} -> {run_dir} | elapsed "
              f"{_clock(started - self.started)} | ETA {self.eta(total - index + 1)}", flush=True)
    state.update({"method": spec.method, "seed": spec.seed, "run_dir": spec.run_dir,
                  "train_command": shlex.join(train), "eval_command": shlex.join(evaluate),
                  "train_fingerprint": fingerprint(train, run_dir),
                  "eval_fingerprint": fingerprint(evaluate, run_dir)})
    remaining = total - index + 1
    if not state.get("train_done"):
      state.update(status="training", failed_stage=None)
      write_state(run_dir, state)
      rc, tail = self._stream(train, os.path.join(run_dir, "train.log"), "train", started,
                              remaining)
      state["train_seconds"] = state.get("train_seconds", 0.0) + time.time() - started
      finished, why = training_finished(run_dir)
      state["train_done"] = rc == 0 and finished
      if self.signals:
        return self._stopped(run_dir, state, "training")
      if not state["train_done"]:
        return self._failed(run_dir, state, "training", rc, "" if rc else why, tail)
      write_state(run_dir, state)
      self.echo(f"    trained in {_clock(time.time() - started)}; scoring", flush=True)
    else:
      self.echo("    already trained; scoring", flush=True)
    scored_at = time.time()
    state.update(status="evaluating")
    write_state(run_dir, state)
    rc, tail = self._stream(evaluate, os.path.join(run_dir, "eval.log"), "eval", started,
                            remaining)
    state["eval_seconds"] = time.time() - scored_at
    if self.signals:
      return self._stopped(run_dir, state, "evaluation")
    rows = final_eval_rows(run_dir)
    total_steps = operative_config(run_dir).get("TRAIN_STEPS")
    if rc != 0 or not rows or rows[0]["step"] != total_steps:
      why = ("no eval rows in eval/metrics.jsonl" if not rows else
             f"eval rows are for step {rows[0]['step']}, TRAIN_STEPS is {total_steps}")
      return self._failed(run_dir, state, "evaluation", rc, "" if rc else why, tail)
    state.update(status="done", failed_stage=None, finished=_now())
    write_state(run_dir, state)
    self.durations.append(time.time() - started)
    self.echo("    " + " | ".join(f"{row['split']} WER {row['wer']:.2f}% CER {row['cer']:.2f}%"
                                   for row in sorted(rows, key=_split_order_key)) +
              f" (run took {_clock(time.time() - started)})", flush=True)
    return state

  def _failed(self, run_dir, state, stage, rc, why, tail) -> dict[str, Any]:
    log = os.path.join(run_dir, "train.log" if stage == "training" else "eval.log")
    state.update(status="failed", failed_stage=stage, returncode=rc, reason=why or None,
                 log=log)
    write_state(run_dir, state)
    shown = "\n      ".join(tail[-6:])
    self.echo(f"    FAILED in {stage} (exit {rc}{'; ' + why if why else ''}); log: {log}\n"
              f"      {shown}", flush=True)
    return state

  def _stopped(self, run_dir, state, stage) -> dict[str, Any]:
    state.update(status="interrupted", failed_stage=stage)
    write_state(run_dir, state)
    raise Interrupted(f"stopped during {stage} of {run_dir}")


def _seconds(clock: str) -> float:
  """``"0:06:01" -> 361.0``; days as ``"1 day, 2:00:00"``."""
  days = 0
  if "day" in clock:
    day_part, clock = clock.split(",", 1)
    days = int(day_part.split()[0])
  parts = [float(p) for p in clock.strip().split(":")]
  while len(parts) < 3:
    parts.insert(0, 0.0)
  return days * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def is_done(out: str, spec: RunSpec, recipe: Recipe) -> bool:
  """Finished with the same commands: run.json says done and eval rows exist."""
  run_dir = os.path.join(out, spec.run_dir)
  state = read_state(run_dir)
  return (state.get("status") == "done" and bool(final_eval_rows(run_dir)) and
          state.get("eval_fingerprint") == fingerprint(recipe.eval_command(spec, run_dir),
                                                       run_dir))


def check_same_training(out: str, plan: Sequence[RunSpec], recipe: Recipe) -> None:
  """Raises before anything runs if a folder holds checkpoints of another command
  (a run that failed before its first checkpoint simply starts again)."""
  for spec in plan:
    run_dir = os.path.join(out, spec.run_dir)
    state = read_state(run_dir)
    if not state and latest_checkpoint(run_dir) is not None:
      raise ValueError(f"{run_dir} holds checkpoints but no {STATE_FILE}: it was not made by "
                       "this script; use another --out or delete the folder")
    wanted = fingerprint(recipe.train_command(spec, run_dir), run_dir)
    if (state.get("train_fingerprint") not in (None, wanted) and
        latest_checkpoint(run_dir) is not None):
      before, now = state["train_fingerprint"], wanted
      differences = [f"    was: {a}\n    now: {b}" for a, b in zip(before, now) if a != b]
      if len(before) != len(now):
        differences.append(f"    was {len(before)} arguments, now {len(now)}")
      raise ValueError(f"{run_dir} was trained with another command:\n" + "\n".join(
          differences[:6]) + "\nUse another --out, or delete the folder to retrain it.")


# ----------------------------------------------------------------------------
# Collecting: each run's metrics, statistics over seeds.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
  """What one run folder holds, read back from its files."""

  run_dir: str
  status: str                      # done | failed | interrupted | training | ... | missing
  state: dict
  eval_rows: list                  # final step, one per (task, split)
  train_metrics: list              # metrics.jsonl, one row per logged step
  train_eval: list                 # eval_metrics.jsonl (dev during training)
  config: dict                     # operative config.gin values

  @property
  def finished(self) -> bool:
    return self.status == "done" and bool(self.eval_rows)


def collect_run(out: str, run_dir: str) -> RunResult:
  """Reads a run folder (relative to OUT)."""
  path = os.path.join(out, run_dir)
  state = read_state(path)
  rows = final_eval_rows(path)
  status = state.get("status") or ("done" if rows else "missing")
  by_step = {}
  for row in read_jsonl(os.path.join(path, "metrics.jsonl")):
    if "step" not in row:
      raise ValueError(f"{os.path.join(path, 'metrics.jsonl')}: a row without 'step': {row}")
    by_step[row["step"]] = row
  during = {row["step"]: row for row in read_jsonl(os.path.join(path, "eval_metrics.jsonl"))
            if "step" in row}
  return RunResult(run_dir, status, state, rows, [by_step[s] for s in sorted(by_step)],
                   [during[s] for s in sorted(during)], operative_config(path))


def stats(values: Sequence[float]) -> dict[str, Any]:
  """Mean, sample standard deviation (n-1; None for one value), min, max."""
  values = [float(v) for v in values]
  return {"n": len(values), "mean": statistics.fmean(values) if values else None,
          "std": statistics.stdev(values) if len(values) > 1 else None,
          "min": min(values) if values else None, "max": max(values) if values else None}


def _split_order_key(row_or_split) -> tuple:
  split = row_or_split["split"] if isinstance(row_or_split, dict) else row_or_split
  order = 0 if split.startswith("dev") or split.startswith("valid") else (
      1 if split.startswith("test") else 2)
  return (order, split)


def group_metrics(entries: Sequence[tuple[RunSpec, RunResult]]) -> dict[str, Any]:
  """Per task and split: WER/CER stats over the finished seeds, and the values.

  Returns ``{task: {"splits": [...], "step": s, "seeds": [...], "metrics":
  {split: {"wer": {n, mean, std, min, max, values, seeds}, "cer": ...}}}}``.
  """
  tasks: dict[str, Any] = {}
  for spec, result in entries:
    if not result.finished:
      continue
    for row in result.eval_rows:
      task = tasks.setdefault(row.get("task", "?"), {"metrics": {}, "steps": set(),
                                                      "seeds": set(), "utterances": {}})
      task["steps"].add(row["step"])
      task["utterances"].setdefault(row["split"], set()).add(row.get("num_utterances"))
      task["seeds"].add(spec.seed)
      split = task["metrics"].setdefault(row["split"], {"wer": {}, "cer": {}})
      for metric in ("wer", "cer"):
        split[metric][spec.seed] = float(row[metric])
  summary = {}
  for name, task in sorted(tasks.items()):
    metrics = {}
    for split in sorted(task["metrics"], key=_split_order_key):
      metrics[split] = {}
      for metric, per_seed in task["metrics"][split].items():
        seeds = sorted(per_seed)
        metrics[split][metric] = {**stats([per_seed[s] for s in seeds]), "seeds": seeds,
                                  "values": [per_seed[s] for s in seeds]}
    steps = sorted(task["steps"])
    summary[name] = {"splits": list(metrics), "step": steps[0] if len(steps) == 1 else steps,
                     "seeds": sorted(task["seeds"]), "metrics": metrics,
                     "utterances": {split: sorted(task["utterances"][split], key=str)
                                    for split in metrics}}
  return summary


def budget_of(result: RunResult) -> dict[str, Any]:
  return {key: result.config[key] for key in BUDGET_KEYS if key in result.config}


def summarize(out: str, plan: Sequence[RunSpec], invocations: Sequence[dict[str, Any]]
              ) -> dict[str, Any]:
  """Everything the report shows, as JSON-ready data (results.json)."""
  results = {run_dir: collect_run(out, run_dir)
             for run_dir in dict.fromkeys(spec.run_dir for spec in plan)}
  methods = list(dict.fromkeys(spec.method for spec in plan if spec.group == "method"))
  by_method = {m: [(s, results[s.run_dir]) for s in plan if s.group == "method" and s.method == m]
               for m in methods}

  main = {}
  for method in methods:
    for task, data in group_metrics(by_method[method]).items():
      main.setdefault(task, {"methods": {}})["methods"][method] = data
  for task in main.values():
    splits = [s for data in task["methods"].values() for s in data["splits"]]
    task["splits"] = sorted(dict.fromkeys(splits), key=_split_order_key)

  sweeps = {}
  for spec in plan:
    if spec.group != "sweep":
      continue
    sweep = sweeps.setdefault(spec.sweep_param, {"method": spec.method, "points": {}})
    point = sweep["points"].setdefault(_number(spec.sweep_value), {
        "value": spec.sweep_value, "default": not spec.overrides, "entries": []})
    point["entries"].append((spec, results[spec.run_dir]))
  for sweep in sweeps.values():
    points = sorted(sweep["points"].values(), key=lambda p: p["value"])
    sweep["points"] = [{"value": p["value"], "default": p["default"],
                        "run_dirs": [s.run_dir for s, _ in p["entries"]],
                        "tasks": group_metrics(p["entries"])} for p in points]

  runs = []
  for spec in plan:
    result = results[spec.run_dir]
    last = result.train_metrics[-1] if result.train_metrics else {}
    runs.append({
        **spec.to_json(), "label": spec.label, "status": result.status,
        "finished": result.finished,
        "eval": {f"{row.get('task', '?')}/{row['split']}": {
            k: row.get(k) for k in ("step", "wer", "cer", "num_utterances", "word_errors",
                                    "reference_words")} for row in result.eval_rows},
        "final_train": {k: last.get(k) for k in ("step", *CURVE_METRICS, "accuracy_text",
                                                   "accuracy_speech") if k in last},
        "mean_step_time": _mean_step_time(result.train_metrics),
        "dev_wer_during_training": _training_wer(result.train_eval),
        "budget": budget_of(result),
        "loss_config": {k.split(".")[-1]: v for k, v in result.config.items()
                        if k.startswith("LossConfig.")},
        "seeds": {k: result.config.get(k) for k in ("SEED", "DATA_SEED")},
        "train_seconds": result.state.get("train_seconds"),
        "eval_seconds": result.state.get("eval_seconds"),
        "train_command": result.state.get("train_command"),
        "eval_command": result.state.get("eval_command"),
        "failed_stage": result.state.get("failed_stage"),
        "log": result.state.get("log")})

  budgets = {json.dumps(budget_of(results[s.run_dir]), sort_keys=True)
             for s in plan if results[s.run_dir].finished and s.group == "method"}
  return {"created": _now(), "out": out, "invocations": list(invocations),
          "methods": methods, "tasks": main, "sweeps": sweeps, "runs": runs,
          "same_budget": len(budgets) <= 1,
          "budgets": [json.loads(b) for b in sorted(budgets)],
          "curves": {m: _curves(by_method[m]) for m in methods}}


def _mean_step_time(metrics: Sequence[dict[str, Any]]) -> Optional[float]:
  times = [row["step_time"] for row in metrics[1:] if row.get("step_time")]
  return statistics.fmean(times) if times else None


def _training_wer(rows: Sequence[dict[str, Any]]) -> list[list]:
  """``[[step, split, wer], ...]`` from eval_metrics.jsonl (``<split>/wer`` keys)."""
  return [[row["step"], key[:-len("/wer")], row[key]] for row in rows for key in sorted(row)
          if key.endswith("/wer")]


def _curves(entries: Sequence[tuple[RunSpec, RunResult]]) -> dict[str, Any]:
  """Per training metric (and in-training dev WER) of the finished runs: the
  steps logged by every seed, with the mean, min and max over seeds."""
  series: dict[str, list[dict[int, float]]] = {}
  for _, result in entries:
    if not result.finished:
      continue
    for metric in CURVE_METRICS:
      values = {row["step"]: float(row[metric]) for row in result.train_metrics
                if isinstance(row.get(metric), (int, float))}
      if values:
        series.setdefault(metric, []).append(values)
    wer = {}
    for step, split, value in _training_wer(result.train_eval):
      wer.setdefault(f"{split} WER % (training eval)", {})[step] = float(value)
    for name, values in wer.items():
      series.setdefault(name, []).append(values)
  curves = {}
  for metric, per_seed in series.items():
    steps = sorted(set.intersection(*[set(s) for s in per_seed]))
    curves[metric] = {"steps": steps, "n": len(per_seed),
                      "mean": [statistics.fmean(s[t] for s in per_seed) for t in steps],
                      "min": [min(s[t] for s in per_seed) for t in steps],
                      "max": [max(s[t] for s in per_seed) for t in steps]}
  return curves


# ----------------------------------------------------------------------------
# The report: results.md, results.json, PNGs.
# ----------------------------------------------------------------------------


def cell(summary: Optional[dict[str, Any]]) -> str:
  """``"7.17 ± 0.52 (6.60–7.70)"``; one seed: ``"7.17"``; none: ``"–"``."""
  if not summary or not summary.get("n"):
    return "–"
  if summary["n"] == 1:
    return f"{summary['mean']:.2f}"
  return (f"{summary['mean']:.2f} ± {summary['std']:.2f} "
          f"({summary['min']:.2f}–{summary['max']:.2f})")


def _metric_columns(splits: Sequence[str]) -> list[tuple[str, str]]:
  return [(split, metric) for metric in ("wer", "cer") for split in splits]


def render_markdown(results: dict[str, Any]) -> str:
  lines = ["# Loss Masking vs Multimodal CE vs SLD", ""]
  finished = [r for r in results["runs"] if r["finished"]]
  unique = {r["run_dir"]: r for r in results["runs"]}
  lines += [f"Written by `scripts/compare_objectives.py` on {results['created']} from "
            f"{sum(r['finished'] for r in unique.values())} finished run folders of "
            f"{len(unique)} in `{results['out']}`.", ""]
  lines += ["Command lines that produced it (oldest first):", "", "```text"]
  lines += [f"{inv['command']}    # {inv['time']}" for inv in results["invocations"]]
  lines += ["```", ""]
  lines += _setup_lines(results, finished)
  for task, data in results["tasks"].items():
    lines += _task_lines(task, data, results)
  if results["sweeps"]:
    lines += _sweep_lines(results)
  unfinished = [r for r in unique.values() if not r["finished"]]
  if unfinished:
    lines += ["## Runs not finished", ""]
    for run in unfinished:
      stage = f" in {run['failed_stage']}" if run.get("failed_stage") else ""
      log = f"; log: `{run['log']}`" if run.get("log") else ""
      lines.append(f"- `{run['run_dir']}` ({run['label']}, seed {run['seed']}): "
                   f"{run['status']}{stage}{log}")
    lines.append("")
  lines += ["## Files", "",
            "- `results.json`: the numbers above, per-run commands, budgets and curves",
            "- `training_curves.png`: training losses (mean over seeds, shaded min–max)",
            "- `wer_per_method.png`: WER per method (bars: mean; dots: seeds)"]
  if results["sweeps"]:
    lines.append("- `sweeps.png`: WER against each swept SLD knob")
  lines.append("")
  return "\n".join(lines)


def _setup_lines(results, finished) -> list[str]:
  lines = ["## Setup", ""]
  if results["budgets"]:
    budget = results["budgets"][0]
    shown = ", ".join(f"{k} {v}" for k, v in budget.items())
    same = ("the same for every method run" if results["same_budget"] else
            "**differs between runs** (see results.json `budgets`)")
    lines.append(f"Budget (from each run's operative `config.gin`): {shown}; {same}.")
  seeds = sorted({(r["seeds"].get("SEED"), r["seeds"].get("DATA_SEED")) for r in finished},
                 key=str)
  if seeds:
    lines.append("Seeds (SEED: parameter init and dropout, DATA_SEED: training data order): " +
                 ", ".join(f"{s}/{d}" for s, d in seeds) + ".")
  configs = {}
  for run in finished:
    if run["group"] == "method" and run["loss_config"]:
      configs.setdefault(run["method"], run["loss_config"])
  for method, config in configs.items():
    knobs = ("method", "alpha", "epsilon", "temperature", "kl_target")
    shown = ", ".join(f"{k}={config[k]}" for k in knobs[:1 if config.get("method") != "sld"
                                                         else None] if k in config)
    lines.append(f"- `{method}`: LossConfig {shown}")
  times = [r["mean_step_time"] for r in finished if r["mean_step_time"]]
  train_times = [r["train_seconds"] for r in finished if r.get("train_seconds")]
  eval_times = [r["eval_seconds"] for r in finished if r.get("eval_seconds")]
  if times and train_times:
    lines.append(f"Time per run: training {_clock(statistics.fmean(train_times))} "
                 f"({statistics.fmean(times):.2f} s/step), scoring "
                 f"{_clock(statistics.fmean(eval_times) if eval_times else 0)} (means over runs).")
  lines += ["", "Cells: mean ± sample standard deviation over seeds (min–max); WER and CER in "
            "% from `python -m sld_jax.eval` (its decoding settings, greedy by default) of each "
            "run's last checkpoint.", ""]
  return lines


def _task_lines(task: str, data: dict[str, Any], results: dict[str, Any]) -> list[str]:
  splits = data["splits"]
  columns = _metric_columns(splits)
  steps = {str(m["step"]) for m in data["methods"].values()}
  utterances = {}
  for method_data in data["methods"].values():
    for split, counts in method_data["utterances"].items():
      utterances.setdefault(split, set()).update(str(c) for c in counts)
  counts = ", ".join(f"{split} {'/'.join(sorted(utterances[split]))}" for split in splits)
  lines = [f"## Task `{task}` (step {', '.join(sorted(steps))}; utterances scored: {counts})",
           ""]
  lines.append("| method | seeds | " + " | ".join(f"{s} {m.upper()} %" for s, m in columns) + " |")
  lines.append("|---|---|" + "---|" * len(columns))
  for method, method_data in data["methods"].items():
    cells = [cell(method_data["metrics"].get(s, {}).get(m)) for s, m in columns]
    lines.append(f"| {method} | {len(method_data['seeds'])} | " + " | ".join(cells) + " |")
  lines += ["", "Per seed:", ""]
  lines.append("| method | seed | " + " | ".join(f"{s} {m.upper()} %" for s, m in columns) +
               " | final train loss | WER % during training (step: WER; EVAL_BATCHES of dev) | "
               "run |")
  lines.append("|---|---|" + "---|" * (len(columns) + 3))
  for run in results["runs"]:
    if run["group"] != "method" or not run["finished"]:
      continue
    if not any(key.startswith(f"{task}/") for key in run["eval"]):
      continue
    values = [run["eval"].get(f"{task}/{s}", {}).get(m) for s, m in columns]
    shown = ["–" if v is None else f"{v:.2f}" for v in values]
    loss = run["final_train"].get("loss")
    during = ", ".join(f"{step}: {wer:.1f}" for step, _, wer in run["dev_wer_during_training"])
    lines.append(f"| {run['method']} | {run['seed']} | " + " | ".join(shown) +
                 f" | {'–' if loss is None else f'{loss:.4f}'} | {during or '–'} | "
                 f"`{run['run_dir']}` |")
  lines.append("")
  return lines


def _sweep_lines(results: dict[str, Any]) -> list[str]:
  lines = ["## SLD sweeps (one factor at a time)", ""]
  for parameter, sweep in results["sweeps"].items():
    tasks = list(dict.fromkeys(t for p in sweep["points"] for t in p["tasks"]))
    default = next((p["value"] for p in sweep["points"] if p["default"]), None)
    for task in tasks:
      splits = sorted(dict.fromkeys(s for p in sweep["points"] for s in
                                    p["tasks"].get(task, {}).get("splits", [])),
                      key=_split_order_key)
      columns = _metric_columns(splits)
      lines.append(f"`{sweep['method']}`, {parameter} ({SWEEP_SYMBOLS[parameter]}), task "
                   f"`{task}`; the other knobs at their defaults"
                   f"{'' if default is None else f', default {_number(default)}'}:")
      lines += ["", f"| {parameter} | seeds | " + " | ".join(
          f"{s} {m.upper()} %" for s, m in columns) + " |",
                "|---|---|" + "---|" * len(columns)]
      for point in sweep["points"]:
        data = point["tasks"].get(task)
        cells = ([cell(data["metrics"].get(s, {}).get(m)) for s, m in columns] if data
                 else ["–"] * len(columns))
        seeds = len(data["seeds"]) if data else 0
        mark = " (default)" if point["default"] else ""
        lines.append(f"| {_number(point['value'])}{mark} | {seeds} | " + " | ".join(cells) + " |")
      lines.append("")
  return lines


def json_ready(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_report(out: str, results: dict[str, Any], plots: bool = True) -> list[str]:
  """Writes results.md, results.json and (with ``plots``) the PNGs; returns paths."""
  written = []
  for name, text in (("results.md", render_markdown(results)),
                     ("results.json", json.dumps(json_ready(results), indent=1))):
    path = os.path.join(out, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
    written.append(path)
  if plots:
    written += write_plots(out, results)
  return written


def write_plots(out: str, results: dict[str, Any]) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  written = []
  colors = {m: f"C{i}" for i, m in enumerate(results["methods"])}

  curves = results["curves"]
  metrics = list(CURVE_METRICS) + sorted({k for c in curves.values() for k in c} -
                                         set(CURVE_METRICS))
  metrics = [m for m in metrics if any(m in c for c in curves.values())]
  if metrics:
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
      for method, method_curves in curves.items():
        curve = method_curves.get(metric)
        if not curve or not curve["steps"]:
          continue
        ax.plot(curve["steps"], curve["mean"], color=colors[method],
                label=f"{method} (n={curve['n']})", marker="o" if len(curve["steps"]) < 8 else None)
        if curve["n"] > 1:
          ax.fill_between(curve["steps"], curve["min"], curve["max"], color=colors[method],
                          alpha=0.2, linewidth=0)
      ax.set_title(metric)
      ax.set_xlabel("step")
      ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
      ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
      ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Training curves: mean over seeds, shaded min–max")
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out, "training_curves.png"), plt))

  panels = [(task, split) for task, data in results["tasks"].items() for split in data["splits"]]
  if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 1.3 * len(results["methods"]) + 2)
                                                     * len(panels), 4), squeeze=False)
    for ax, (task, split) in zip(axes.flat, panels):
      methods = list(results["tasks"][task]["methods"])
      for x, method in enumerate(methods):
        summary = results["tasks"][task]["methods"][method]["metrics"].get(split, {}).get("wer")
        if not summary:
          continue
        ax.bar(x, summary["mean"], color=colors[method], alpha=0.45,
               yerr=summary["std"] or 0, capsize=4)
        offsets = [0.0] if len(summary["values"]) == 1 else [
            -0.2 + 0.4 * i / (len(summary["values"]) - 1) for i in range(len(summary["values"]))]
        ax.scatter([x + o for o in offsets], summary["values"], color=colors[method],
                   edgecolor="black", zorder=3, s=22)
      ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
      ax.set_ylabel("WER %")
      ax.set_title(f"{split} ({task})", fontsize=9)
      ax.grid(axis="y", alpha=0.3)
    fig.suptitle("WER per method: bars mean (± std), dots seeds")
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out, "wer_per_method.png"), plt))

  sweeps = {name: sweep for name, sweep in results["sweeps"].items()
            if any(point["tasks"] for point in sweep["points"])}
  if sweeps:
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 3.8), squeeze=False)
    for ax, (parameter, sweep) in zip(axes.flat, sweeps.items()):
      values = [p["value"] for p in sweep["points"]]
      lines = sorted({(task, split) for p in sweep["points"] for task, d in p["tasks"].items()
                      for split in d["splits"]}, key=lambda ts: (ts[0], _split_order_key(ts[1])))
      for i, (task, split) in enumerate(lines):
        xs, means, stds = [], [], []
        for x, point in enumerate(sweep["points"]):
          summary = point["tasks"].get(task, {}).get("metrics", {}).get(split, {}).get("wer")
          if summary:
            xs.append(x)
            means.append(summary["mean"])
            stds.append(summary["std"] or 0)
            ax.scatter([x] * len(summary["values"]), summary["values"], color=f"C{i}", s=12,
                       alpha=0.6)
        label = split if len({t for t, _ in lines}) == 1 else f"{task}/{split}"
        ax.errorbar(xs, means, yerr=stds, color=f"C{i}", marker="o", capsize=3, label=label)
      for x, point in enumerate(sweep["points"]):
        if point["default"]:
          ax.axvline(x, color="gray", linestyle=":", linewidth=1)
      ax.set_xticks(range(len(values)), [_number(v) for v in values])
      ax.set_xlabel(f"{parameter} ({SWEEP_SYMBOLS[parameter]}; dotted: default)")
      ax.set_ylabel("WER %")
      ax.grid(alpha=0.3)
      if lines:
        ax.legend(fontsize=8)
    fig.suptitle(f"{next(iter(sweeps.values()))['method']} sweeps: mean ± std over seeds")
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out, "sweeps.png"), plt))
  return written


def _save(fig, path: str, plt) -> str:
  fig.savefig(path + ".tmp.png", dpi=110)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)
  return path


# ----------------------------------------------------------------------------
# The plan file and the main.
# ----------------------------------------------------------------------------


def load_plan(out: str) -> tuple[list[RunSpec], list[dict[str, Any]]]:
  path = os.path.join(out, PLAN_FILE)
  if not os.path.exists(path):
    return [], []
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from None
  try:
    return [RunSpec.from_json(s) for s in data["runs"]], list(data["invocations"])
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a plan written by this script ({e!r})") from None


def save_plan(out: str, plan: Sequence[RunSpec], invocations: Sequence[dict[str, Any]]) -> None:
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, PLAN_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump({"runs": [s.to_json() for s in plan], "invocations": list(invocations)}, f,
              indent=1)
  os.replace(path + ".tmp", path)


def merge_plans(old: Sequence[RunSpec], new: Sequence[RunSpec]) -> list[RunSpec]:
  """Earlier entries first (the report covers everything in OUT), no duplicates."""
  return list(dict.fromkeys([*old, *new]))


def rewrite_gin_flags(argv: Sequence[str]) -> list[str]:
  """``--gin.X=Y`` -> ``--gin X=Y`` and ``--eval_gin.X=Y`` -> ``--eval_gin X=Y``."""
  rewritten = []
  for arg in argv:
    for flag in ("--gin.", "--eval_gin."):
      if arg.startswith(flag):
        rewritten += [flag[:-1], arg[len(flag):]]
        break
    else:
      rewritten.append(arg)
  return rewritten


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="See the module docstring (head -60 scripts/compare_objectives.py) for examples.")
  parser.add_argument("--out", default="runs/compare",
                      help="comparison folder (default %(default)s)")
  parser.add_argument("--base_gin", action="append", default=None,
                      help=f"base experiment gin file(s), parsed in order before the objective "
                           f"(default {DEFAULT_BASE})")
  parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                      help="objective files gin_configs/objectives/<method>.gin "
                           "(default: all four)")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                      help="SEED (and DATA_SEED) of each method's runs (default 0 1 2)")
  parser.add_argument("--steps", type=int, help="TRAIN_STEPS (default: the base's; 200)")
  parser.add_argument("--batch_size", type=int, help="BATCH_SIZE (default: the base's; 8)")
  parser.add_argument("--learning_rate", type=float,
                      help="LEARNING_RATE (default: the base's; 1e-3)")
  parser.add_argument("--warmup_steps", type=int,
                      help="WARMUP_STEPS, at most --steps (default: the base's; 25)")
  parser.add_argument("--eval_every", type=int,
                      help="EVAL_EVERY, dev WER during training (default: the base's; 100)")
  parser.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE",
                      help="gin binding for training and evaluation (also --gin.NAME=VALUE)")
  parser.add_argument("--eval_gin", action="append", default=[], metavar="NAME=VALUE",
                      help="gin binding for the evaluation only (also --eval_gin.NAME=VALUE)")
  parser.add_argument("--fixed_data_seed", type=int,
                      help="one DATA_SEED for every run (default: DATA_SEED = the run's seed)")
  parser.add_argument("--sweep", action="append", default=[], metavar="PARAM=V1,V2",
                      help=f"one-factor sweep of {SWEEP_PARAMETERS} around the objective's values")
  parser.add_argument("--sweep_method", default="sld", help="the method swept (default sld)")
  parser.add_argument("--sweep_seeds", nargs="+", type=int, default=[0],
                      help="seeds of each sweep point (default 0)")
  parser.add_argument("--report_only", action="store_true",
                      help="rebuild the report from the runs in --out; train nothing")
  parser.add_argument("--dry_run", action="store_true", help="print the commands; run nothing")
  parser.add_argument("--compilation_cache", default=None,
                      help="JAX persistent compilation cache for the runs (default OUT/jax_cache "
                           "unless JAX_COMPILATION_CACHE_DIR is set; '' turns it off)")
  args = parser.parse_args(rewrite_gin_flags(argv))
  for name in ("steps", "batch_size", "warmup_steps", "eval_every"):
    value = getattr(args, name)
    if value is not None and (value < 0 or (value == 0 and name in ("steps", "batch_size"))):
      parser.error(f"--{name} must be positive, got {value}")
  if args.learning_rate is not None and not args.learning_rate > 0:
    parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
  return args


def make_recipe(args: argparse.Namespace) -> Recipe:
  base = args.base_gin or [DEFAULT_BASE]
  for path in base:
    resolve_gin_path(path)
  budget = [f"{macro}={value!r}" for macro, value in (
      ("TRAIN_STEPS", args.steps), ("BATCH_SIZE", args.batch_size),
      ("LEARNING_RATE", args.learning_rate), ("WARMUP_STEPS", args.warmup_steps),
      ("EVAL_EVERY", args.eval_every)) if value is not None]
  return Recipe(tuple(base), tuple(budget), tuple(check_bindings(args.gin, "--gin")),
                tuple(check_bindings(args.eval_gin, "--eval_gin")), args.fixed_data_seed)


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


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  out = os.path.abspath(args.out)
  command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__)), *argv])
  old_plan, invocations = load_plan(out)

  if args.report_only:
    if not old_plan:
      raise SystemExit(f"--report_only: no {PLAN_FILE} in {out}; nothing to report")
    results = summarize(out, old_plan, invocations)
    for path in write_report(out, results):
      print(f"[compare] wrote {path}")
    return 0

  try:
    plan = build_plan(args.methods, args.seeds, [parse_sweep(s) for s in args.sweep],
                      args.sweep_method, args.sweep_seeds, check_bindings(args.gin, "--gin"))
    recipe = make_recipe(args)
    check_same_training(out, plan, recipe)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"compare_objectives: {e}") from None
  folders = {}
  for spec in plan:
    folders.setdefault(spec.run_dir, spec)
  if args.dry_run:
    for spec in folders.values():
      run_dir = os.path.join(out, spec.run_dir)
      print(f"# {spec.label} seed {spec.seed} -> {run_dir}")
      print(shlex.join(recipe.train_command(spec, run_dir)))
      print(shlex.join(recipe.eval_command(spec, run_dir)))
    return 0

  invocations = [*invocations, {"command": command, "time": _now()}]
  plan_all = merge_plans(old_plan, plan)
  save_plan(out, plan_all, invocations)
  todo = [spec for spec in folders.values() if not is_done(out, spec, recipe)]
  sweep_count = sum(1 for s in folders.values() if s.group == "sweep")
  print(f"[compare] {len(folders)} run folders ({len(args.methods)} methods x {len(args.seeds)} "
        f"seeds{f' + {sweep_count} sweep points' if sweep_count else ''}); "
        f"{len(folders) - len(todo)} already done, {len(todo)} to run; out: {out}", flush=True)

  runner = Runner(out, recipe, child_env(out, args.compilation_cache))
  runner.install_signal_handlers()
  failed, interrupted = [], False
  try:
    for index, spec in enumerate(todo, 1):
      state = runner.run(spec, index, len(todo))
      if state.get("status") != "done":
        failed.append((spec, state))
      write_report(out, summarize(out, plan_all, invocations), plots=False)
  except Interrupted as e:
    interrupted = True
    print(f"[compare] interrupted: {e}; rerun the same command to continue", flush=True)
  finally:
    written = write_report(out, summarize(out, plan_all, invocations))
  others = ", ".join(os.path.basename(p) for p in written[1:])
  print(f"[compare] report: {written[0]} (also {others})"
        f"; total time {_clock(time.time() - runner.started)}")
  if failed:
    print(f"[compare] {len(failed)} run(s) failed:")
    for spec, state in failed:
      print(f"  {spec.label} seed {spec.seed}: {state.get('failed_stage')} "
            f"(exit {state.get('returncode')}); log: {state.get('log')}")
  if interrupted:
    return EXIT_INTERRUPTED
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
