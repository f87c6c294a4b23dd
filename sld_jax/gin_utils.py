"""Gin plumbing for the ``python -m sld_jax.*`` mains, in the t5x style.

Command lines look like::

  python -m sld_jax.train \
    --gin_file=gin_configs/experiments/smoke.gin \
    --gin.MODEL_DIR=\"/tmp/smoke\" --gin.TRAIN_STEPS=40

``--gin.X=Y`` is shorthand for ``--gin_bindings='X = Y'`` (values are gin
literals, so strings keep their quotes). Files are searched relative to the
working directory and then the repository root, and includes name files
from the repository root as in t5x (``include 'gin_configs/models/tiny.gin'``),
so the same command works from any directory. (Paths relative to
``gin_configs/`` such as ``tasks/x.gin`` are avoided on purpose: gin's
package-resource reader would take ``tasks`` for the Python package; the
``gin_configs`` folders carry ``__init__.py`` files so that the same reader
resolves them when the checkout is on ``sys.path``.)

Macros set to ``%gin.REQUIRED`` (``MODEL_DIR``, ``TRAIN_STEPS``, data paths)
must be overridden: finalizing the config raises and names the macro.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from absl import logging
import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_CONFIGS_DIR = os.path.join(REPO_ROOT, "gin_configs")
DEFAULT_SEARCH_PATHS = (".", REPO_ROOT)
CONFIG_FILENAME = "config.gin"


def rewrite_gin_args(args: Sequence[str]) -> list[str]:
  """Rewrites ``--gin.NAME=VALUE`` into ``--gin_bindings=NAME = VALUE``.

  >>> rewrite_gin_args(["prog", "--gin.TRAIN_STEPS=10", "--gin_file=a.gin"])
  ['prog', '--gin_bindings=TRAIN_STEPS = 10', '--gin_file=a.gin']
  """
  rewritten = []
  for arg in args:
    if arg.startswith("--gin."):
      if "=" not in arg:
        raise ValueError(
            f"gin flag {arg!r} has no value; write it as --gin.NAME=VALUE "
            f"(e.g. --gin.TRAIN_STEPS=100 or --gin.MODEL_DIR=\\\"/tmp/run\\\")")
      name, value = arg[len("--gin."):].split("=", 1)
      arg = f"--gin_bindings={name} = {value}"
    rewritten.append(arg)
  return rewritten


def parse_gin_config(gin_files: Sequence[str],
                     gin_bindings: Sequence[str] = (),
                     search_paths: Sequence[str] = DEFAULT_SEARCH_PATHS,
                     finalize: bool = True) -> None:
  """Parses files, then bindings (later ones win), and finalizes the config.

  Raises:
    ValueError: no gin file was given, or a ``%gin.REQUIRED`` macro was not
      overridden (the message names it and shows the flag that sets it).
    IOError: a gin file was not found in the search paths.
  """
  if not gin_files:
    raise ValueError(
        "no --gin_file given; pass e.g. --gin_file=gin_configs/experiments/smoke.gin")
  for path in search_paths:
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(
      list(gin_files), list(gin_bindings), finalize_config=False)
  if finalize:
    try:
      gin.finalize()
    except ValueError as e:
      if "gin.REQUIRED" in str(e):
        name = str(e).split("/", 1)[0]
        raise ValueError(
            f"{e}\nThe gin macro {name} is required: pass --gin.{name}=VALUE "
            f"(gin files: {', '.join(gin_files)}).") from None
      raise


def write_operative_config(model_dir: str, filename: str = CONFIG_FILENAME,
                           is_primary: bool = True) -> Optional[str]:
  """Writes the config as gin saw it to ``model_dir/filename``; returns the path.

  Call it after the configured functions have run (t5x writes it once training
  has started): gin's *operative* config lists only the bindings that were
  used, with defaults filled in. Only the primary process writes.
  """
  if not is_primary:
    return None
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, filename)
  text = gin.operative_config_str()
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  logging.info("Wrote the operative gin config to %s", path)
  return path
