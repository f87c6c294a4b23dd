"""Runs the plan: trains each run in segments until its dev WER stops
improving, then scores the selected checkpoint on every eval split.

Each run folder (``OUT/<method>/seed<k>/``) is a MODEL_DIR::

  checkpoints/  metrics.jsonl  eval_metrics.jsonl  config.gin   (sld_jax.train)
  eval/         metrics.jsonl, step_<N>/<task>/<split>/{metrics.json,
                predictions.jsonl}                               (sld_jax.eval)
  train.log  eval.log   the children's console output, appended
  run.json     status, commands, the selected step and why training stopped

A training segment is ``python -m sld_jax.train`` with
``trainer.train.stop_after_steps`` set so that it ends at the first
evaluation step where the run could stop (``stopping.next_stop``);
afterwards ``stopping.decide`` reads ``eval_metrics.jsonl``.
Progress is read from the runs' files, never from their console output.

Resuming is the default: a run whose ``run.json`` says "done" with the same
scoring command is skipped, an interrupted one continues from its latest
checkpoint, and a folder holding checkpoints of another training command
stops the driver before anything runs. A failed run is reported with its log
and the others go on. The first Ctrl-C (or SIGTERM) is passed to the child,
which checkpoints and exits; the driver then writes the report and stops.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import shlex
import signal
import subprocess
import time
from typing import Any, Callable, Optional

from sld_jax import atomic_files
from sld_jax import gin_utils
from sld_jax.comparison import plan as plan_lib
from sld_jax.comparison import run_files
from sld_jax.comparison import stopping

STATE_FILE = "run.json"


class Interrupted(Exception):
  """SIGINT / SIGTERM reached the driver; the current run stopped at a checkpoint."""


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
  atomic_files.write_json(os.path.join(run_dir, STATE_FILE), state, indent=1, sort_keys=False)


def clock(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def is_done(out: str, spec: plan_lib.RunSpec, recipe: plan_lib.Recipe) -> bool:
  """Finished, and scored with the command this recipe gives its selected step."""
  run_dir = os.path.join(out, spec.run_dir)
  state = read_state(run_dir)
  if state.get("status") != "done" or state.get("selected_step") is None:
    return False
  wanted = plan_lib.fingerprint(recipe.eval_command(spec, run_dir, state["selected_step"]),
                                run_dir)
  return state.get("eval_fingerprint") == wanted and bool(
      run_files.scored_splits(run_dir, state["selected_step"]))


def check_same_training(out: str, plan, recipe: plan_lib.Recipe) -> None:
  """Raises before anything runs if a folder holds checkpoints of another command."""
  for spec in plan:
    run_dir = os.path.join(out, spec.run_dir)
    state = read_state(run_dir)
    has_checkpoints = run_files.latest_checkpoint(run_dir) is not None
    if not state and has_checkpoints:
      raise ValueError(f"{run_dir} holds checkpoints but no {STATE_FILE}: it was not made by "
                       "the comparison; use another --out or delete the folder")
    wanted = plan_lib.fingerprint(recipe.train_command(spec, run_dir), run_dir)
    before = state.get("train_fingerprint")
    if before not in (None, wanted) and has_checkpoints:
      differences = [f"    was: {a}\n    now: {b}" for a, b in zip(before, wanted) if a != b]
      if len(before) != len(wanted):
        differences.append(f"    was {len(before)} arguments, now {len(wanted)}")
      raise ValueError(f"{run_dir} was trained with another command:\n" +
                       "\n".join(differences[:6]) +
                       "\nUse another --out, or delete the folder to retrain it.")


class Runner:
  """Runs folders one after another; prints progress read from their files."""

  def __init__(self, out: str, recipe: plan_lib.Recipe, env: dict[str, str],
               echo: Callable[..., None] = print):
    self.out = out
    self.recipe = recipe
    self.env = env
    self.echo = echo
    self.started = time.time()
    self.process: Optional[subprocess.Popen] = None
    self.signals = 0

  def install_signal_handlers(self) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    """The first signal asks the child to checkpoint and stop; a second one is
    passed on too, and the default handlers come back."""
    del frame
    self.signals += 1
    os.write(2, f"\n[compare] {signal.Signals(signum).name}: stopping the current run\n".encode())
    if self.process is not None and self.process.poll() is None:
      self.process.send_signal(signum)
    if self.signals > 1:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      signal.signal(signal.SIGTERM, signal.SIG_DFL)

  def _call(self, command: list[str], log_path: str) -> tuple[int, list[str]]:
    """Runs a child with its output appended to ``log_path``; returns (rc, log tail)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
      log.write(f"\n# {now()}\n# {shlex.join(command)}\n")
      log.flush()
      self.process = subprocess.Popen(command, cwd=gin_utils.GIN_ROOT, env=self.env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
      try:
        returncode = self.process.wait()
      finally:
        if self.process.poll() is None:   # an exception while waiting: never orphan it
          self.process.send_signal(signal.SIGINT)
          self.process.wait()
        self.process = None
    with open(log_path, errors="replace") as f:
      tail = list(collections.deque(f, maxlen=8))
    return returncode, [line.rstrip() for line in tail]

  def run(self, spec: plan_lib.RunSpec, index: int, total: int) -> dict[str, Any]:
    """Trains (resuming) and scores one run; returns its run.json state."""
    if self.signals:
      raise Interrupted("stopped between runs")
    run_dir = os.path.join(self.out, spec.run_dir)
    total_steps, eval_every = self.recipe.schedule(spec.method)
    state = read_state(run_dir)
    state.update(method=spec.method, seed=spec.seed, run_dir=spec.run_dir,
                 train_command=shlex.join(self.recipe.train_command(spec, run_dir)),
                 train_fingerprint=plan_lib.fingerprint(
                     self.recipe.train_command(spec, run_dir), run_dir),
                 patience=self.recipe.patience, failed_stage=None)
    self.echo(f"[{index}/{total}] {spec.method} seed {spec.seed} -> {run_dir} | elapsed "
              f"{clock(time.time() - self.started)}", flush=True)
    train_log = os.path.join(run_dir, "train.log")
    while True:
      latest = run_files.latest_checkpoint(run_dir)
      curve = stopping.dev_curve(run_files.read_jsonl(os.path.join(run_dir,
                                                                   "eval_metrics.jsonl")))
      decision = stopping.decide(curve, latest, total_steps, self.recipe.patience)
      if decision.done:
        break
      start = latest or 0
      target = stopping.next_stop(curve, start, total_steps, eval_every, self.recipe.patience)
      command = self.recipe.train_command(spec, run_dir, stop_after_steps=target - start)
      state.update(status="training")
      write_state(run_dir, state)
      began = time.time()
      rc, tail = self._call(command, train_log)
      state["train_seconds"] = state.get("train_seconds", 0.0) + time.time() - began
      if self.signals:
        return self._stopped(run_dir, state, "training")
      reached = run_files.latest_checkpoint(run_dir)
      if rc != 0 or reached != target:
        why = "" if rc else f"the latest checkpoint is {reached}, the segment ended at {target}"
        return self._failed(run_dir, state, "training", rc, why, tail, train_log)
      self._progress(run_dir, target, total_steps, began)
    if decision.selected is None:
      return self._failed(run_dir, state, "training", 0, "no checkpoint to score", [],
                          train_log)
    state.update(selected_step=decision.selected, best_dev_wer=decision.best_wer,
                 stop_reason=decision.reason, stopped_at=run_files.latest_checkpoint(run_dir))
    evaluate = self.recipe.eval_command(spec, run_dir, decision.selected)
    state.update(status="evaluating", eval_command=shlex.join(evaluate),
                 eval_fingerprint=plan_lib.fingerprint(evaluate, run_dir))
    write_state(run_dir, state)
    self.echo(f"    stopped: {decision.reason}; scoring step {decision.selected}", flush=True)
    began = time.time()
    eval_log = os.path.join(run_dir, "eval.log")
    rc, tail = self._call(evaluate, eval_log)
    state["eval_seconds"] = time.time() - began
    if self.signals:
      return self._stopped(run_dir, state, "evaluation")
    scored = run_files.scored_splits(run_dir, decision.selected)
    if rc != 0 or not scored:
      why = "" if rc else f"no eval rows for step {decision.selected} in eval/metrics.jsonl"
      return self._failed(run_dir, state, "evaluation", rc, why, tail, eval_log)
    state.update(status="done", finished=now())
    write_state(run_dir, state)
    self.echo("    " + " | ".join(f"{split} WER {row['wer']:.2f}%"
                                  for (_, split), row in sorted(scored.items())) +
              f" (scoring took {clock(state['eval_seconds'])})", flush=True)
    return state

  def _progress(self, run_dir: str, step: int, total_steps: int, began: float) -> None:
    rows = run_files.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    seconds = [row["step_time"] for row in rows[-5:] if row.get("step_time")]
    curve = stopping.dev_curve(run_files.read_jsonl(os.path.join(run_dir,
                                                                 "eval_metrics.jsonl")))
    wer = f"dev WER {curve[-1][1]:.2f}" if curve and curve[-1][0] == step else "no dev WER"
    best = min(curve, key=lambda p: (p[1], p[0])) if curve else None
    self.echo(f"    step {step}/{total_steps}: {wer}" +
              (f" (best {best[1]:.2f} at {best[0]})" if best else "") +
              (f" | {seconds[-1]:.3f} s/step" if seconds else "") +
              f" | segment {clock(time.time() - began)}", flush=True)

  def _failed(self, run_dir, state, stage, rc, why, tail, log) -> dict[str, Any]:
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
