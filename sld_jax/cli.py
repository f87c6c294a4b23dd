"""What the ``python -m sld_jax.train`` and ``sld_jax.eval`` mains share.

The gin and process-topology flags, a console filter for library chatter, and
the start-up both mains run before they parse gin.
"""

from __future__ import annotations

import logging as py_logging
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from sld_jax import distributed
from sld_jax import gin_utils

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the shared flags once (a second call is a no-op)."""
  if "gin_file" in FLAGS:
    return
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


class QuietLibraries(py_logging.Filter):
  """Drops library chatter from the console: orbax's per-save INFO lines and
  gin's package-resource probing (logged as errors for every include it
  resolves from the file system instead)."""

  def filter(self, record):
    if record.pathname.endswith("gin/resource_reader.py"):
      return False
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def start(argv: Sequence[str]) -> None:
  """Rejects stray arguments, quiets library logs, joins the process group."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  logging.get_absl_handler().addFilter(QuietLibraries())
  distributed.initialize(
      FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
      [int(i) for i in FLAGS.local_device_ids] if FLAGS.local_device_ids else None)
