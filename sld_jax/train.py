r"""Trains a model: ``python -m sld_jax.train --gin_file=... --gin.MODEL_DIR=...``.

  python -m sld_jax.train \
    --gin_file=gin_configs/experiments/smoke.gin \
    --gin.MODEL_DIR=\"/tmp/sld_smoke\" [--gin.TRAIN_STEPS=100] [--gin.X=Y ...]

Everything but the process topology comes from gin (``trainer.train``); a run
resumed in the same MODEL_DIR continues to TRAIN_STEPS. Multi-process runs
(TPU pods, GPU clusters, or several processes on one machine) add
``--coordinator_address=host:port --num_processes=N --process_id=i`` (or the
``SLD_*`` environment variables, see ``sld_jax/distributed.py``); every
process runs the same command.

The console shows progress, metrics, warnings and the paths written;
``--verbose`` adds every library's log lines (``sld_jax/console.py``).
``--helpfull`` lists all flags.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

from sld_jax import cli
from sld_jax import gin_utils

FLAGS = flags.FLAGS
cli.define_flags()


def params_checksum(params) -> float:
  """Sum of |x| over the parameter shards this process holds, once per shard.

  With replicated parameters every process computes the same number from its
  own copy, so comparing it across processes checks that they agree.
  """
  total = 0.0
  for leaf in jax.tree.leaves(params):
    seen = set()
    for shard in leaf.addressable_shards:
      if str(shard.index) not in seen:
        seen.add(str(shard.index))
        total += float(jnp.sum(jnp.abs(shard.data.astype(jnp.float32))))
  return total


def main(argv) -> None:
  cli.start(argv)
  gin_utils.parse_gin_config(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths,
                             known_macros=())

  from sld_jax import trainer  # pylint: disable=g-import-not-at-top
  result = trainer.train()
  logging.info(
      "process %d: finished at step %d%s; loss %s; params checksum %.8e",
      jax.process_index(), result.step, " (stopped early)" if result.stopped_early else "",
      result.last_metrics.get("loss"), params_checksum(result.state.params))


def known_errors() -> tuple[type[BaseException], ...]:
  """Failures a user can act on from their message alone."""
  from sld_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from sld_jax import divergence  # pylint: disable=g-import-not-at-top
  from sld_jax import run_lock  # pylint: disable=g-import-not-at-top
  return (gin_utils.GinConfigError, run_lock.RunDirectoryLocked, checkpointing.CheckpointError,
          divergence.TrainingDivergedError)


def run() -> None:
  app.run(cli.report_errors(main, known_errors()), argv=gin_utils.rewrite_gin_args(sys.argv))


if __name__ == "__main__":
  run()
