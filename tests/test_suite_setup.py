"""The suite's own setup: 8 devices whatever XLA_FLAGS the user has, no
silent skips, optional dependencies failing in CI, test corpora keyed by
the code that builds them, and one compilation cache per run that the
processes of the tests share."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest

import conftest
import optional_deps

TESTS_DIR = pathlib.Path(__file__).resolve().parent


def test_user_xla_flags_are_kept_and_get_8_devices():
  flags = conftest.with_test_xla_flags(
      "--xla_dump_to=/tmp/d  --xla_force_host_platform_device_count=2")
  assert flags.split() == ["--xla_dump_to=/tmp/d", *conftest.TEST_XLA_FLAGS]
  assert conftest.with_test_xla_flags("").split() == list(conftest.TEST_XLA_FLAGS)


def test_jax_sees_8_devices_when_the_user_has_xla_flags_set():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
             "--xla_cpu_enable_fast_math=false", JAX_PLATFORMS="cpu")
  code = ("import sys; sys.path.insert(0, 'tests'); import conftest, os, jax; "
          "print(jax.device_count(), os.environ['XLA_FLAGS'])")
  result = subprocess.run([sys.executable, "-c", code], env=env, cwd=conftest.REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
  count, flags = result.stdout.strip().split(" ", 1)
  assert count == "8"
  assert "--xla_cpu_enable_fast_math=false" in flags


def test_no_test_skips_except_through_optional_deps():
  """Skips hide broken setups; the only door is optional_deps.require."""
  pattern = re.compile(r"pytest\.skip|importorskip|mark\.skip|skipif|unittest\.skip")
  offenders = [f"{path.name}:{number}: {line.strip()}"
               for path in sorted(TESTS_DIR.glob("*.py"))
               if path.name not in ("optional_deps.py", "test_suite_setup.py")
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if pattern.search(line)]
  assert not offenders, offenders


def test_missing_optional_dependency_fails_in_ci_and_skips_locally(monkeypatch):
  absent = "sld_jax_no_such_module_for_tests"
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception, match="broken install"):
    optional_deps.require(absent, install="pip install it")
  monkeypatch.setenv("CI", "")
  with pytest.raises(pytest.skip.Exception, match=absent):
    optional_deps.require(absent, install="pip install it")
  optional_deps.require("numpy", install="unused")  # present: returns
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception, match="needs a tmpfs"):
    optional_deps.require_that(False, "a tmpfs")
  optional_deps.require_that(True, "a tmpfs")


def test_corpus_dir_is_keyed_by_the_code_that_builds_it(tmp_path):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "tts.py").write_text("VOICE = 'a'\n")
  (tmp_path / "opts.gin").write_text("x = 1\n")
  paths = ("pkg", "opts.gin")
  before = conftest.corpus_code_hash(tmp_path, paths)
  assert conftest.corpus_code_hash(tmp_path, paths) == before
  (tmp_path / "pkg" / "tts.py").write_text("VOICE = 'b'\n")
  changed_code = conftest.corpus_code_hash(tmp_path, paths)
  (tmp_path / "opts.gin").write_text("x = 2\n")
  changed_options = conftest.corpus_code_hash(tmp_path, paths)
  assert len({before, changed_code, changed_options}) == 3


def _warn_from(module: str) -> None:
  warnings.warn_explicit("old API", DeprecationWarning, f"{module}.py", 1,
                         module=module)


def test_our_deprecation_warnings_are_errors_and_third_party_ones_ignored():
  """pyproject.toml's filterwarnings, as pytest applied them to this test."""
  for ours in ("sld_jax.wer", "sld_jax", "tasks.batches"):
    with pytest.raises(DeprecationWarning, match="old API"):
      _warn_from(ours)
  for theirs in ("tensorflow.python.util", "seqio.dataset_providers", "sld_jaxish"):
    _warn_from(theirs)  # ignored: no error


def test_one_compilation_cache_per_run_reaches_this_process_and_its_children(
    tmp_path_factory):
  import jax  # pylint: disable=g-import-not-at-top
  cache = conftest.compilation_cache_dir(tmp_path_factory)
  assert jax.config.jax_compilation_cache_dir == cache
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  code = ("import jax, jax.numpy as jnp; jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)); "
          "print(jax.config.jax_compilation_cache_dir)")
  child = subprocess.run([sys.executable, "-c", code], env=dict(os.environ),
                         capture_output=True, text=True, timeout=120, check=True)
  assert child.stdout.strip() == cache
  assert os.listdir(cache), "the child's program was not cached"
  # The suite command keeps a marked module on one worker (module fixtures once).
  suite = (conftest.REPO_ROOT / "scripts" / "test.sh").read_text()
  assert "python3 -m pytest -q -n 2 --dist loadgroup tests" in suite
