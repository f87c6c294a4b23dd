"""What the ``python -m sld_jax.train`` and ``sld_jax.eval`` mains share.

The gin and process-topology flags, the start-up both mains run before they
parse gin (a quiet console, see ``sld_jax.console``; ``--verbose`` shows
every library's logs), and ``report_errors``: a
known failure (bad config, locked run directory, corrupt or mismatched
checkpoint, full disk, divergence) ends the main with one ``error: ...``
line and exit status 1; ``--verbose_errors`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from sld_jax import console
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
  flags.DEFINE_bool("verbose_errors", False,
                    "On a known failure, show the traceback (and library error logs) "
                    "instead of one error line.")


def _quiet_closed_loops(hook):
  """An excepthook that drops "Event loop is closed" from library callbacks.

  When a checkpoint save fails (e.g. the disk is full), tensorstore's
  completion callbacks try to wake orbax's event loops, which the failure
  already closed; each prints that traceback through ``sys.excepthook``
  (a dozen or more). The failure itself is reported by ``report_errors``.
  """

  def quiet(exc_type, value, traceback):
    if exc_type is RuntimeError and str(value) == "Event loop is closed":
      logging.debug("ignored a library callback on a closed event loop")
      return
    hook(exc_type, value, traceback)

  return quiet


def start(argv: Sequence[str]) -> None:
  """Rejects stray arguments, quiets the console, joins the process group."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  console.setup_from_flags()
  if not FLAGS.verbose_errors:
    sys.excepthook = _quiet_closed_loops(sys.excepthook)
    previous_unraisable = sys.unraisablehook
    sys.unraisablehook = lambda info: None if (
        isinstance(info.exc_value, RuntimeError)
        and str(info.exc_value) == "Event loop is closed") else previous_unraisable(info)
  distributed.initialize(
      FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
      [int(i) for i in FLAGS.local_device_ids] if FLAGS.local_device_ids else None)


def report_errors(main: Callable[[Sequence[str]], None],
                  known: tuple[type[BaseException], ...]) -> Callable[[Sequence[str]], None]:
  """Wraps a main: a ``known`` exception becomes one ``error:`` line and exit 1."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      main(argv)
    except known as e:
      if FLAGS.verbose_errors:
        raise
      # gin appends "In call to configurable ..." lines to the messages.
      message = "\n".join(line for line in str(e).splitlines()
                          if not line.strip().startswith("In call to configurable"))
      print(f"error: {message}", file=sys.stderr, flush=True)
      print("(run with --verbose_errors for the traceback)", file=sys.stderr, flush=True)
      # Skip interpreter teardown: library threads (orbax's event loops) left
      # by the failure would print their own shutdown tracebacks. Everything
      # of ours is closed and flushed by now.
      logging.flush()
      os._exit(1)  # pylint: disable=protected-access

  return wrapped
