r"""The plan of a comparison: which runs, in which folders, with which gin.

A *method* is an objective file ``gin_configs/objectives/<method>.gin``; each
is trained once per seed on the same base experiment. A run's seed sets both
``SEED`` (parameter init, dropout and time-masking keys) and ``DATA_SEED``
(the training data order), so the seeds vary both together.

Gin composition of a run (later wins): the base experiment file(s), the
objective file, the comparison's ``--gin`` bindings, then the bindings the
driver owns: ``MODEL_DIR``, ``SEED``, ``DATA_SEED`` and checkpointing at every
evaluation (``trainer.train.checkpoint_every = EVAL_EVERY``, the last
``keep_checkpoints`` of them kept: see ``stopping``). Scoring adds
``CHECKPOINT_PATH``, ``EVAL_OUTPUT_DIR``, ``evaluate.steps = [<selected>]``
and the ``--eval_gin`` bindings. Commands are ``python -m sld_jax.train`` /
``python -m sld_jax.eval`` with ``--gin_file`` and ``--gin_bindings`` flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

from sld_jax import gin_utils
from sld_jax.comparison import gin_values

OBJECTIVES_DIR = os.path.join("gin_configs", "objectives")
DEFAULT_BASE = os.path.join("gin_configs", "experiments", "objective_comparison_digits.gin")
DEFAULT_METHODS = ("sld", "multimodal_ce", "loss_masking")
MIN_SEEDS = 5
# Bindings the driver owns, and the flag that sets each instead.
OWNED = {"MODEL_DIR": "--out", "SEED": "--seeds", "DATA_SEED": "--seeds",
         "CHECKPOINT_PATH": "(the run folder)", "EVAL_OUTPUT_DIR": "(the run folder)",
         "trainer.train.checkpoint_every": "(EVAL_EVERY)",
         "trainer.train.keep_checkpoints": "--patience",
         "trainer.train.stop_after_steps": "(the driver's segments)",
         "evaluate.steps": "(the selected step)"}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: a method, a seed and a folder relative to OUT."""

  method: str
  seed: int

  @property
  def run_dir(self) -> str:
    return f"{self.method}/seed{self.seed}"

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def objective_file(method: str) -> str:
  path = os.path.join(OBJECTIVES_DIR, f"{method}.gin")
  if not os.path.isfile(os.path.join(gin_utils.GIN_ROOT, path)):
    available = sorted(name[:-4] for name in os.listdir(
        os.path.join(gin_utils.GIN_ROOT, OBJECTIVES_DIR)) if name.endswith(".gin"))
    raise ValueError(f"unknown method {method!r}: there is no {path}; methods: {available}")
  return path


def build_plan(methods: Sequence[str], seeds: Sequence[int]) -> list[RunSpec]:
  """Every method x seed, method-major.

  >>> [s.run_dir for s in build_plan(["sld", "loss_masking"], [0, 1])]
  ['sld/seed0', 'sld/seed1', 'loss_masking/seed0', 'loss_masking/seed1']
  """
  if not methods or len(set(methods)) != len(methods):
    raise ValueError(f"--methods must name distinct methods, got {list(methods)}")
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds must be distinct, got {list(seeds)}")
  for method in methods:
    objective_file(method)
  return [RunSpec(method, seed) for method in methods for seed in seeds]


def check_bindings(bindings: Sequence[str], flag: str) -> list[str]:
  """``NAME = VALUE`` strings; a binding the driver owns is refused."""
  checked = []
  for binding in bindings:
    name, sep, value = binding.partition("=")
    name = name.strip()
    if not sep or not name or not value.strip():
      raise ValueError(f"{flag} {binding!r}: want NAME=VALUE, e.g. "
                       f"{flag}.decoder_config.dropout_rate=0.0")
    if name in OWNED:
      raise ValueError(f"{flag} {binding!r}: {name} is set by the comparison; use {OWNED[name]}")
    checked.append(f"{name} = {value.strip()}")
  return checked


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What every run shares: gin files and bindings around the method."""

  base_gin: tuple
  bindings: tuple = ()         # --gin: training and scoring
  eval_bindings: tuple = ()    # --eval_gin: scoring only
  patience: int = 3            # evaluations without a dev-WER improvement before stopping

  def gin_files(self, method: str) -> list[str]:
    return [*self.base_gin, objective_file(method)]

  def values(self, method: str) -> dict[str, Any]:
    """The literal values of the composition (before the driver's bindings)."""
    return gin_values.compose(self.gin_files(method), self.bindings)

  def schedule(self, method: str) -> tuple[int, int]:
    """``(TRAIN_STEPS, EVAL_EVERY)`` of the composition; both must be positive ints."""
    values = self.values(method)
    found = []
    for name in ("TRAIN_STEPS", "EVAL_EVERY"):
      value = gin_values.lookup(values, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} = {value!r} in {self.gin_files(method)} and --gin: the "
                         f"comparison needs a positive integer (it stops on dev WER, evaluated "
                         f"every EVAL_EVERY steps up to TRAIN_STEPS)")
      found.append(value)
    return found[0], found[1]

  def run_bindings(self, spec: RunSpec, model_dir: str) -> list[str]:
    keep = "None" if self.patience == 0 else str(self.patience + 2)
    return [*self.bindings, f"MODEL_DIR = {json.dumps(model_dir)}", f"SEED = {spec.seed}",
            f"DATA_SEED = {spec.seed}", "trainer.train.checkpoint_every = %EVAL_EVERY",
            f"trainer.train.keep_checkpoints = {keep}"]

  def train_command(self, spec: RunSpec, model_dir: str,
                    stop_after_steps: Optional[int] = None) -> list[str]:
    bindings = self.run_bindings(spec, model_dir)
    if stop_after_steps is not None:
      bindings.append(f"trainer.train.stop_after_steps = {stop_after_steps}")
    return [sys.executable, "-m", "sld_jax.train",
            *[f"--gin_file={f}" for f in self.gin_files(spec.method)],
            *[f"--gin_bindings={b}" for b in bindings]]

  def eval_command(self, spec: RunSpec, model_dir: str, step: int) -> list[str]:
    return [sys.executable, "-m", "sld_jax.eval",
            *[f"--gin_file={f}" for f in self.gin_files(spec.method)],
            *[f"--gin_bindings={b}" for b in self.run_bindings(spec, model_dir)],
            f"--gin_bindings=CHECKPOINT_PATH = {json.dumps(model_dir)}",
            f"--gin_bindings=EVAL_OUTPUT_DIR = {json.dumps(os.path.join(model_dir, 'eval'))}",
            f"--gin_bindings=evaluate.steps = [{step}]",
            *[f"--gin_bindings={b}" for b in self.eval_bindings]]


def fingerprint(command: Sequence[str], model_dir: str) -> list[str]:
  """A command without the interpreter and with the run folder as ``<RUN_DIR>``,
  so a moved OUT or another Python still matches."""
  return [arg.replace(model_dir, "<RUN_DIR>") for arg in command[1:]]
