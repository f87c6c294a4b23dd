"""A tiny ``python -m sld_jax.train`` run on synthetic data, for subprocess tests.

``train_command`` shrinks ``gin_configs/experiments/synthetic.gin`` to a
1-layer, 32-wide model on 8 x 32-token batches with a constant learning rate
(so a run's steps do not depend on TRAIN_STEPS) and no evaluation.
``subprocess_env`` gives a child its own device count and cheaper XLA CPU
compilation; it inherits the run's persistent compilation cache
(tests/conftest.py), so repeated runs of the same program compile once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Sequence

import jax
import orbax.checkpoint as ocp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cheaper XLA CPU compilation for in-process tests (jax.jit compiler_options);
# subprocesses get the same through XLA_FLAGS.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TINY_BINDINGS = (
    "decoder_config.num_layers=1", "decoder_config.num_heads=4",
    "decoder_config.embed_dim=32", "decoder_config.mlp_dim=64",
    "decoder_config.max_length=32",
    "BATCH_SIZE=8", "SEQUENCE_LENGTH=32", "SyntheticSource.max_units=10",
    "SyntheticSource.text_size=16", "SyntheticSource.speech_size=48",
    "LEARNING_RATE=3e-3", "WARMUP_STEPS=0", 'optim.learning_rate_schedule.kind="constant"',
    "EVAL_EVERY=0", "trainer.train.evaluators=[]",
    "trainer.train.log_every=2", "trainer.train.checkpoint_every=2",
    "trainer.train.keep_checkpoints=None",
)


def train_command(model_dir: str, train_steps: int, extra: Sequence[str] = (),
                  flags: Sequence[str] = ()) -> list[str]:
  bindings = [*TINY_BINDINGS, f'MODEL_DIR="{model_dir}"', f"TRAIN_STEPS={train_steps}", *extra]
  return [sys.executable, "-m", "sld_jax.train",
          "--gin_file=gin_configs/experiments/synthetic.gin",
          *[f"--gin.{binding}" for binding in bindings], *flags]


def subprocess_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
  return env


def run(command: Sequence[str], env: dict[str, str], timeout: float = 240
        ) -> subprocess.CompletedProcess:
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
  if result.returncode != 0:
    raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                         f"{result.stderr[-6000:]}")
  return result


SMOKE_GIN = "gin_configs/experiments/smoke.gin"


def run_smoke(module: str, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
  """``python -m <module> --gin_file=<smoke experiment> <flags>`` in the checkout."""
  return run([sys.executable, "-m", module, f"--gin_file={SMOKE_GIN}", *flags], dict(os.environ),
             timeout)


def read_metrics(model_dir: str, filename: str = "metrics.jsonl") -> list[dict]:
  with open(os.path.join(model_dir, filename)) as f:
    return [json.loads(line) for line in f if line.strip()]


def checkpointed_params(model_dir: str, step: int):
  """The parameters of a checkpoint, read onto one device (any writer topology)."""
  path = os.path.join(model_dir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata.tree)
  return jax.device_get(checkpointer.restore(path, target)["params"])
