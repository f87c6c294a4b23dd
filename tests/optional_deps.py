"""Optional test needs: skipped on a developer's machine, failed in CI.

CI (``CI=true``, as ``.ci/run`` is run) installs every pinned package and runs
as root, so a missing package or capability there is a broken setup, not a
reason to skip: ``require`` and ``require_that`` fail the test instead of
skipping it. They are the only skips the suite allows
(tests/test_suite_setup.py greps for others).
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def in_ci() -> bool:
  return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(*modules: str) -> list[str]:
  return [m for m in modules if importlib.util.find_spec(m) is None]


def require_that(available: bool, what: str) -> None:
  """Skips (locally) or fails (in CI) the calling test unless ``available``.

  Args:
    available: whether the test's need is met, e.g. a tmpfs can be mounted.
    what: the need, shown in the message ("unshare -m and a tmpfs mount").
  """
  if available:
    return
  if in_ci():
    pytest.fail(f"needs {what}, which CI has: a broken setup, not a skip",
                pytrace=False)
  pytest.skip(f"needs {what}")


def require(*modules: str, install: str) -> None:
  """Skips (locally) or fails (in CI) the calling test when a module is absent.

  Args:
    modules: importable module names, e.g. "ctranslate2".
    install: the command that installs them, shown in the message.
  """
  absent = missing(*modules)
  if not absent:
    return
  message = f"{', '.join(absent)} not installed ({install})"
  if in_ci():
    pytest.fail(f"{message}: CI installs every pinned package, so this is a "
                "broken install, not a skip", pytrace=False)
  pytest.skip(message)
