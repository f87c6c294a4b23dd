"""The mains' console: quiet by default, everything with ``--verbose``.

The filters are checked on the lines a real run printed before they existed
(TensorFlow's start-up, the cuInit failure, SentencePiece's normalizer.cc),
then on a real ``python -m sld_jax.train --verbose`` of the smoke experiment
(the suite's smoke corpus, built once per code version; two steps, no
evaluation): the libraries' INFO lines come back. The quiet console of a real
run (progress, paths written and our "dropped N" lines, none of the library
lines) is checked on test_train_smoke.py's run, which trains the same
experiment without ``--verbose``.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

import tiny_train
from sld_jax import console

NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796069597.141424   13982 port.cc:153] oneDNN custom operations are on. You "
    "may see slightly different numerical results",
    "I0000 00:00:1796069597.142319   13982 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "E0000 00:00:1796069598.019775   13982 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.",
)
KEPT = (
    "I1130 20:13:59.070458 140089059191680 trainer.py:543] step 5/20 (25%) loss 9.9964",
    "W0000 00:00:1796069598.019775   13982 bfc_allocator.cc:291] Allocator ran out of memory",
    "E0000 00:00:1796069598.019775   13982 cuda_dnn.cc:522] Could not create cudnn handle",
    "F0000 00:00:1796069598.019775   13982 sharding.cc:12] Check failed: rank == 2",
    "trainer_interface.cc(409) LOG(ERROR) too many sentences",
    "error: the gin macro MODEL_DIR is required",
)


@pytest.mark.parametrize("line", NOISE)
def test_native_noise_is_recognised(line):
  assert console.NATIVE_NOISE.search(line)


@pytest.mark.parametrize("line", KEPT)
def test_our_lines_and_native_warnings_and_errors_are_not(line):
  assert not console.NATIVE_NOISE.search(line)


def _record(level: int, path: str, message: str) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, message, (), None)


def test_library_chatter_filter():
  quiet, verbose = console.LibraryChatter(quiet=True), console.LibraryChatter(quiet=False)
  ours = os.path.join(console.OWN_PACKAGES[1], "preprocessors.py")
  seqio = "/site-packages/seqio/dataset_providers.py"
  tfds = "/site-packages/tensorflow_datasets/core/features/feature.py"
  orbax = "/site-packages/orbax/checkpoint/async_checkpointer.py"
  cases = [  # (record, shown quietly, shown with --verbose)
      (_record(logging.INFO, ours, "dropped 3 whose transcript alone does not fit"), True, True),
      (_record(logging.DEBUG, ours, "padding"), True, True),
      (_record(logging.INFO, seqio, "Sharding at the data source: 1 of 1"), False, True),
      (_record(logging.WARNING, seqio, "Dataset is empty"), True, True),
      (_record(logging.WARNING, tfds, "`FeatureConnector.dtype` is deprecated."), False, True),
      (_record(logging.ERROR, seqio, "failed to read"), True, True),
      (_record(logging.ERROR, orbax, "save failed: traceback"), False, False),
      (_record(logging.ERROR, "/site-packages/gin/resource_reader.py", "no package"), False,
       False),
  ]
  for record, shown_quietly, shown_verbosely in cases:
    assert quiet.filter(record) == shown_quietly, record
    assert verbose.filter(record) == shown_verbosely, record


FILTERED_CHILD = textwrap.dedent("""
    import os, sys, time
    from sld_jax import console
    console.setup(datasets=False)
    for line in sys.argv[1:]:
      os.write(2, line.encode() + b"\\n")
    os.write(2, b"\\rbar 1/2")
    time.sleep(0.5)
    os.write(2, b"\\rbar 2/2\\n")
    for piece in (b"normalizer.cc", b"(51) ", b"LOG(", b"INFO", b") empty", b"\\n"):
      os.write(2, piece)
    print("error: the last line, before os._exit", file=sys.stderr, flush=True)
    os._exit(1)
""")


def test_stderr_filter_drops_noise_keeps_the_rest_and_outlives_os_exit():
  lines = [line for pair in itertools.zip_longest(NOISE, KEPT) for line in pair if line]
  env = dict(os.environ, PYTHONPATH=tiny_train.REPO_ROOT)
  result = subprocess.run([sys.executable, "-c", FILTERED_CHILD, *lines], env=env,
                          capture_output=True, timeout=60)   # bytes: "\r" kept as it is
  assert result.returncode == 1
  assert result.stderr.decode().split("\n") == [
      *KEPT, "\rbar 1/2\rbar 2/2", "error: the last line, before os._exit", ""], result.stderr


# ----------------------------------------------------------------------------
# A real main.


def test_verbose_console_shows_library_info_lines(tmp_path):
  env = tiny_train.subprocess_env(1)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)    # what a user's shell has
  command = [sys.executable, "-m", "sld_jax.train", "--verbose",
             "--gin_file=gin_configs/experiments/smoke.gin",
             f'--gin.MODEL_DIR="{tmp_path / "verbose"}"', "--gin.TRAIN_STEPS=2",
             "--gin.WARMUP_STEPS=0", "--gin.EVAL_EVERY=0", "--gin.trainer.train.evaluators=[]",
             "--gin.trainer.train.log_every=1"]
  verbose = tiny_train.run(command, env, timeout=900).stderr
  assert re.search(r"^I\d{4} .* dataset_providers\.py:\d+\] ", verbose, re.M), verbose[-4000:]
  assert re.search(r"step 2/2 \(100%\) loss [\d.]+", verbose)
  assert re.search(r"truncated the speech of \d+ of \d+ examples .* dropped \d+", verbose)
