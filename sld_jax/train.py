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
"""

from __future__ import annotations

import logging as py_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

from sld_jax import distributed
from sld_jax import gin_utils

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin files, parsed in order.")
flags.DEFINE_multi_string(
    "gin_bindings", [], "Gin bindings, applied after the files; --gin.X=Y is the same as "
    "--gin_bindings='X = Y'.")
flags.DEFINE_multi_string(
    "gin_search_paths", list(gin_utils.DEFAULT_SEARCH_PATHS),
    "Directories searched for gin files and their includes.")
flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                  "Call jax.distributed.initialize: auto (when a coordinator is given or a "
                  "multi-host launcher is detected), on, or off.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_list("local_device_ids", None, "Devices this process uses (GPU clusters).")


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


class _QuietLibraries(py_logging.Filter):
  """Drops library chatter from the console: orbax's per-save INFO lines and
  gin's package-resource probing (logged as errors for every include it
  resolves from the file system instead)."""

  def filter(self, record):
    if record.pathname.endswith("gin/resource_reader.py"):
      return False
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize(
      FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
      [int(i) for i in FLAGS.local_device_ids] if FLAGS.local_device_ids else None)
  gin_utils.parse_gin_config(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)

  from sld_jax import trainer  # pylint: disable=g-import-not-at-top
  result = trainer.train()
  logging.info(
      "process %d: finished at step %d%s; loss %s; params checksum %.8e",
      jax.process_index(), result.step, " (stopped early)" if result.stopped_early else "",
      result.last_metrics.get("loss"), params_checksum(result.state.params))


def run() -> None:
  app.run(main, argv=gin_utils.rewrite_gin_args(sys.argv))


if __name__ == "__main__":
  run()
