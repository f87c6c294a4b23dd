"""Optional test dependencies: skipped on a developer's machine, failed in CI.

CI (``CI=true``, as ``.ci/run`` is run) installs every pinned package, so a
missing one there is a broken install, not a reason to skip: ``require``
fails the test instead of skipping it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def in_ci() -> bool:
  return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(*modules: str) -> list[str]:
  return [m for m in modules if importlib.util.find_spec(m) is None]


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
