"""What the command-line mains print: progress, metrics and paths, not library chatter.

``setup(verbose)`` is called once by every main (``sld_jax.train``,
``sld_jax.eval``, ``sld_jax.transcribe``, ``scripts/prepare_data.py``)
before anything imports TensorFlow. By default it

- drops INFO (and DEBUG) log records of other libraries (tfds' "Creating a
  tf.data.Dataset", seqio's "Sharding at the data source", jax's backend
  probing, orbax's per-save lines) and the deprecation notices libraries log
  about each other's calls. Every record of ``sld_jax`` and ``tasks`` (the
  training progress, the metrics, "dropped N rows", the paths written) and
  every other library warning and error stays;
- passes the process's stderr through a filter (``filter_native_stderr``)
  that drops what native code prints past Python's logging: TensorFlow's
  start-up ("WARNING: All log messages before absl::InitializeLog() ...",
  the oneDNN and "Could not find cuda drivers" INFO lines, ``failed call to
  cuInit`` on a machine without a GPU) and SentencePiece's ``normalizer.cc(51)
  LOG(INFO)`` lines. Native warnings and errors pass;
- sets ``TF_CPP_MIN_LOG_LEVEL=1`` (unless already set): no native INFO lines
  from TensorFlow and XLA later on;
- turns off tensorflow-datasets' progress bars, which nest inside the corpus
  builder's own: one bar per stage (synthesis per split, k-means features,
  units per split) stays.

``--verbose`` (``verbose=True``) shows everything: no filtering at all,
native INFO lines and nested bars included. absl's ``-v``/``--verbosity``
sets the level as usual on top (``-v 1`` adds DEBUG lines).

Some records are dropped in both modes: gin's package-resource probing
(logged as errors for every include it then finds on the file system), and
orbax's error logs of a failed save, which the main reports itself unless
``--verbose_errors``.
"""

from __future__ import annotations

import importlib.util
import logging as py_logging
import os
import re
import subprocess
import sys
from typing import Optional

from absl import flags
from absl import logging

flags.DEFINE_bool("verbose", False,
                  "Show every library's log lines (TensorFlow/XLA native logs, tfds, seqio, "
                  "SentencePiece) and nested progress bars; by default the console shows "
                  "progress, metrics, warnings, errors and the paths written.")

FLAGS = flags.FLAGS

# Our own packages: their records always show.
OWN_PACKAGES = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name) + os.sep
    for name in ("sld_jax", "tasks"))
# Library warnings that are notes on expected behaviour, not problems.
LIBRARY_NOTICES = (
    "is deprecated",                     # one library calling another's old API
    "will be removed during packing",    # seqio: unpacked features are dropped, by design
    "Given directory is read only",      # orbax: eval opens the checkpoints read-only on purpose
)
# Lines native libraries print past Python's logging: absl's C++ banner, native INFO lines
# (printed before absl::InitializeLog, hence the 0000 00:00 date: "I0000 00:00:1796069728.0976
# 17807 port.cc:153] oneDNN custom operations are on..."), TensorFlow's failed cuInit on a
# machine without a GPU (TensorFlow only feeds data; the accelerators are jax's) and
# SentencePiece's INFO lines ("normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty", from
# tensorflow-text's own copy, whose log level Python cannot set).
NATIVE_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I0000 00:00:[\d.]+ +\d+ [^\]]+\] "
    r"|E0000 00:00:[\d.]+ +\d+ [^\]]+\] failed call to cuInit"
    r"|\b\w+\.cc\(\d+\) LOG\(INFO\) ")
# The filter process: copies its stdin to its stdout (the original stderr) a line at a time
# ("\r" ends a progress bar's line), less the lines NATIVE_NOISE finds; a partial line is
# passed on once the writer pauses, so progress bars stay live.
_FILTER_PROGRAM = r"""
import os, re, select, sys
noise, pending = re.compile(sys.argv[1].encode()), b""
while True:
  ready = select.select([0], [], [], 0.2 if pending else None)[0]
  chunk = os.read(0, 1 << 16) if ready else b""
  if ready and not chunk:
    break
  *lines, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
  if not ready:
    lines, pending = lines + [pending], b""
  kept = b"".join(line for line in lines if not noise.search(line))
  if kept:
    os.write(1, kept)
if pending and not noise.search(pending):
  os.write(1, pending)
"""


class LibraryChatter(py_logging.Filter):
  """Keeps our records and the libraries' real warnings and errors.

  >>> f = LibraryChatter(quiet=True)
  >>> record = lambda level, path, msg: py_logging.LogRecord("absl", level, path, 1, msg, (), None)
  >>> f.filter(record(py_logging.INFO, OWN_PACKAGES[0] + "trainer.py", "step 5/20"))
  True
  >>> f.filter(record(py_logging.INFO, "/site-packages/seqio/dataset_providers.py", "Sharding"))
  False
  >>> f.filter(record(py_logging.WARNING, "/site-packages/seqio/utils.py", "disk is slow"))
  True
  """

  def __init__(self, quiet: bool = True, verbose_errors: bool = False):
    super().__init__()
    self.quiet = quiet
    self.verbose_errors = verbose_errors

  def filter(self, record: py_logging.LogRecord) -> bool:
    path = record.pathname or ""
    if path.endswith("gin/resource_reader.py"):
      return False
    if "/orbax/" in path and record.levelno > py_logging.WARNING:
      return self.verbose_errors
    if not self.quiet or path.startswith(OWN_PACKAGES):
      return True
    if record.levelno < py_logging.WARNING:
      return False
    if record.levelno == py_logging.WARNING:
      message = record.getMessage()
      return not any(notice in message for notice in LIBRARY_NOTICES)
    return True


def filter_native_stderr() -> Optional[subprocess.Popen]:
  """Sends file descriptor 2 through a filter process for the rest of this process's life.

  Native libraries write to the descriptor directly, past ``sys.stderr``. The
  filter is a separate process so that nothing is lost when this one ends
  abruptly (``os._exit``, a crash, a fatal native error): it prints what
  remains and exits when the last writer closes the pipe. It runs in its own
  session, so a Ctrl-C meant for the main does not stop it first.

  Returns:
    The filter process, or None when it could not be started (the console
    is then left as it is).
  """
  read_end, write_end = os.pipe()
  try:
    process = subprocess.Popen(
        [sys.executable, "-S", "-c", _FILTER_PROGRAM, NATIVE_NOISE.pattern],
        stdin=read_end, stdout=2, stderr=subprocess.DEVNULL, close_fds=True,
        start_new_session=True)
  except OSError as e:
    logging.warning("console: no native log filter (%s)", e)
    os.close(write_end)
    return None
  finally:
    os.close(read_end)
  sys.stderr.flush()
  os.dup2(write_end, 2)
  os.close(write_end)
  return process


def _quiet_tfds() -> None:
  if importlib.util.find_spec("tensorflow_datasets") is not None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()


def install_filter(log_filter: py_logging.Filter) -> None:
  """Puts ``log_filter`` on absl's handler and the root logger's, replacing ours."""
  for handler in {logging.get_absl_handler(), *py_logging.root.handlers}:
    for old in [f for f in handler.filters if isinstance(f, LibraryChatter)]:
      handler.removeFilter(old)
    handler.addFilter(log_filter)


def setup(verbose: bool = False, verbose_errors: bool = False, datasets: bool = True) -> None:
  """Quiets the console (see the module docstring) unless ``verbose``.

  Call it before TensorFlow is imported, once per process.

  Args:
    verbose: show every library's output.
    verbose_errors: show orbax's error logs of a failed save.
    datasets: the main may build a tensorflow-datasets corpus: turn tfds'
      own progress bars off (this imports TensorFlow).
  """
  install_filter(LibraryChatter(quiet=not verbose, verbose_errors=verbose_errors))
  if verbose:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  filter_native_stderr()
  if datasets:
    _quiet_tfds()


def setup_from_flags(datasets: bool = True) -> None:
  """``setup`` with the ``--verbose`` (and ``--verbose_errors``) flags of an absl main."""
  verbose_errors = "verbose_errors" in FLAGS and FLAGS.verbose_errors
  setup(FLAGS.verbose, verbose_errors, datasets)
