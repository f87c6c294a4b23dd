"""Test-wide setup, before jax loads.

- 8 fake CPU devices for the sharding tests, appended to any XLA_FLAGS the
  user already has (a device count of their own is replaced: the multi-device
  tests need exactly 8 and fail, never skip, without them).
- Cheaper XLA CPU compilation: the suite compiles many tiny programs, and
  backend optimisation buys them nothing (numerics are unchanged).
- One data dir per version of the code that builds the test corpora, so the
  smoke corpus is built once per code version (its preparation holds a file
  lock, so parallel workers wait for each other) and a change to the TTS,
  features, k-means or task code reaches every test that reads it.
- One persistent compilation cache for the whole run, shared by the xdist
  workers and every process a test starts (they inherit the environment):
  the suite compiles the same tiny programs in many tests and processes
  (the synthetic trainer of the resume, reliability and sharding tests, the
  smoke model of the CLI tests). It lives in the run's pytest base temp dir,
  so pytest removes it with old runs, and a run never reads another's.
- No gin config carried from one test into the next.
"""

import hashlib
import os
import pathlib
import re
import tempfile

import gin
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8",
                  "--xla_backend_optimization_level=0",
                  "--xla_llvm_disable_expensive_passes=true")
# What a prepared test corpus depends on: the speech pipeline (TTS, audio,
# features, k-means, units, prepare), the task registry that names each
# corpus's PrepareOptions, the vocab code the prepared text model feeds, the
# task gin files, and the pinned versions (espeak/Whisper/TF behaviour).
CORPUS_CODE = ("sld_jax/speech", "tasks", "sld_jax/vocab.py",
               "sld_jax/seqio_vocab.py", "gin_configs/tasks", "requirements.txt")


def with_test_xla_flags(user_flags: str) -> str:
  """The user's XLA flags, less any device count of theirs, plus the suite's.

  "--xla_dump_to=/d --xla_force_host_platform_device_count=2" becomes
  "--xla_dump_to=/d --xla_force_host_platform_device_count=8
  --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true".
  """
  kept = re.sub(r"--xla_force_host_platform_device_count=\S*", "", user_flags)
  return " ".join(kept.split() + list(TEST_XLA_FLAGS))


def corpus_code_hash(root: pathlib.Path = REPO_ROOT,
                     paths=CORPUS_CODE) -> str:
  """Hash of the files (by relative path and content) that build the corpora."""
  digest = hashlib.sha256()
  for name in paths:
    path = root / name
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
      if "__pycache__" in file.parts or file.suffix == ".pyc":
        continue
      digest.update(str(file.relative_to(root)).encode() + b"\0")
      digest.update(file.read_bytes() + b"\0")
  return digest.hexdigest()[:16]


os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SLD_DATA_DIR", os.path.join(
    tempfile.gettempdir(), "sld_jax_test_data", corpus_code_hash()))


def compilation_cache_dir(tmp_path_factory) -> str:
  """The run's compilation cache: in the base temp dir that the xdist workers'
  own base temp dirs share (``pytest-N/`` above ``pytest-N/popen-gw0/``)."""
  base = tmp_path_factory.getbasetemp()
  run_dir = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  return str(run_dir / "jax_compilation_cache")


@pytest.fixture(scope="session", autouse=True)
def _one_compilation_cache_per_run(tmp_path_factory):
  """JAX_COMPILATION_CACHE_DIR for this process and the children of its
  tests, every program cached however quick its compile (jax's defaults keep
  only compiles over a second)."""
  settings = {"JAX_COMPILATION_CACHE_DIR": compilation_cache_dir(tmp_path_factory),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  os.environ.update(settings)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", settings["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  yield


@pytest.fixture(autouse=True)
def _no_gin_config_across_tests():
  """Each test starts without the gin bindings (or lock) another left behind:
  a finalized config would otherwise reconfigure later tests in the process."""
  yield
  gin.clear_config()
