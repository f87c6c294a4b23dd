"""Gin plumbing for the ``python -m sld_jax.*`` mains, in the t5x style.

Command lines look like::

  python -m sld_jax.train \
    --gin_file=gin_configs/experiments/smoke.gin \
    --gin.MODEL_DIR=\"/tmp/smoke\" --gin.TRAIN_STEPS=40

``--gin.X=Y`` is shorthand for ``--gin_bindings='X = Y'`` (values are gin
literals, so strings keep their quotes). Files are searched relative to the
working directory and then ``GIN_ROOT``, the directory holding the
``gin_configs`` package: the checkout, or ``site-packages`` once sld_jax is
installed (``gin_configs`` is package data). Includes name files from there
as in t5x (``include 'gin_configs/models/tiny.gin'``), so the same command
works from any directory, with or without a checkout. (Paths relative to
``gin_configs/`` such as ``tasks/x.gin`` are avoided on purpose: gin's
package-resource reader would take ``tasks`` for the Python package; the
``gin_configs`` folders carry ``__init__.py`` files so that the same reader
resolves them too.)

Macros set to ``%gin.REQUIRED`` (``MODEL_DIR``, ``TRAIN_STEPS``, data paths)
must be overridden: finalizing the config raises and names the macro.

A misspelt parameter (``trainer.train.log_evry``) or configurable is an error
in gin itself. A misspelt *macro* is not: ``TRAIN_STEPSS = 5`` just defines a
new macro nobody reads. The mains therefore pass ``known_macros``, and a
command-line macro that no gin file defines, no binding references as
``%NAME`` and the main does not read itself is an error naming it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Iterator, Optional, Sequence

from absl import logging
import gin

from sld_jax import atomic_files

GIN_CONFIGS_PACKAGE = "gin_configs"


def find_gin_root() -> str:
  """The directory holding the ``gin_configs`` package.

  The one beside this ``sld_jax`` (a checkout, or the ``site-packages`` it
  was installed into) when there is one, else wherever Python imports
  ``gin_configs`` from. Without any, the directory beside ``sld_jax`` (gin
  then names the file it did not find).
  """
  beside = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.path.isfile(os.path.join(beside, GIN_CONFIGS_PACKAGE, "__init__.py")):
    return beside
  spec = importlib.util.find_spec(GIN_CONFIGS_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return beside
  return os.path.dirname(os.path.abspath(list(spec.submodule_search_locations)[0]))


GIN_ROOT = find_gin_root()
GIN_CONFIGS_DIR = os.path.join(GIN_ROOT, GIN_CONFIGS_PACKAGE)
DEFAULT_SEARCH_PATHS = (".", GIN_ROOT)
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


_MACRO_SELECTOR = "gin.macro"


class GinConfigError(ValueError):
  """The gin files and bindings do not make a valid configuration."""


def _defined_macros() -> set[str]:
  """Names of the macros the parsed config defines (``NAME = value``)."""
  return {scope for scope, selector in gin.config._CONFIG  # pylint: disable=protected-access
          if selector == _MACRO_SELECTOR}


def _references(value: Any) -> Iterator[gin.config.ConfigurableReference]:
  if isinstance(value, gin.config.ConfigurableReference):
    yield value
  elif isinstance(value, dict):
    for item in value.values():
      yield from _references(item)
  elif isinstance(value, (list, tuple, set, frozenset)):
    for item in value:
      yield from _references(item)


def _referenced_macros() -> set[str]:
  """Names of the macros some binding reads as ``%NAME``."""
  names = set()
  for parameters in gin.config._CONFIG.values():  # pylint: disable=protected-access
    for value in parameters.values():
      for reference in _references(value):
        if reference.configurable.name == "macro":
          names.add(reference.scoped_selector.split("/")[0])
  return names


def binding_macro(binding: str) -> Optional[str]:
  """The macro a binding defines, or None for a parameter binding.

  >>> binding_macro("TRAIN_STEPS = 5"), binding_macro("trainer.train.seed = 1")
  ('TRAIN_STEPS', None)
  """
  name = binding.split("=", 1)[0].strip()
  return name if name and "." not in name and "/" not in name else None


def check_command_line_macros(gin_bindings: Sequence[str], file_macros: set[str],
                              known_macros: Sequence[str]) -> None:
  """Raises if a binding sets a macro that nothing defines or reads.

  Raises:
    ValueError: naming each unknown macro, with the nearest known names.
  """
  known = file_macros | _referenced_macros() | set(known_macros)
  unknown = [name for name in map(binding_macro, gin_bindings)
             if name is not None and name not in known]
  if unknown:
    import difflib  # pylint: disable=g-import-not-at-top
    lines = []
    for name in unknown:
      close = difflib.get_close_matches(name, sorted(known), n=3)
      lines.append(f"--gin.{name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise GinConfigError(
        f"unknown gin macro{'s' if len(unknown) > 1 else ''} on the command line: "
        f"{'; '.join(lines)}. No gin file defines {'them' if len(unknown) > 1 else 'it'} "
        "and no binding reads it as %NAME, so it would be silently ignored.")


def parse_gin_config(gin_files: Sequence[str],
                     gin_bindings: Sequence[str] = (),
                     search_paths: Sequence[str] = DEFAULT_SEARCH_PATHS,
                     finalize: bool = True,
                     known_macros: Optional[Sequence[str]] = None) -> None:
  """Parses files, then bindings (later ones win), and finalizes the config.

  Args:
    gin_files, gin_bindings: parsed in this order.
    search_paths: where gin files and their includes are looked up.
    finalize: finalize the config (checks ``%gin.REQUIRED``).
    known_macros: when given (the command-line mains), a macro set by a
      binding must be defined by a gin file, read by some binding, or be one
      of these (macros the main reads itself with ``gin.query_parameter``).

  Raises:
    ValueError: no gin file was given, a ``%gin.REQUIRED`` macro was not
      overridden (the message names it and shows the flag that sets it), or
      a binding sets an unknown macro (with ``known_macros``).
    IOError: a gin file was not found in the search paths.
  """
  if not gin_files:
    raise ValueError(
        "no --gin_file given; pass e.g. --gin_file=gin_configs/experiments/smoke.gin")
  for path in search_paths:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), [], finalize_config=False)
    file_macros = _defined_macros()
    gin.parse_config_files_and_bindings([], list(gin_bindings), finalize_config=False)
  except ValueError as e:
    raise GinConfigError(str(e)) from e
  if known_macros is not None:
    check_command_line_macros(gin_bindings, file_macros, known_macros)
  if finalize:
    try:
      gin.finalize()
    except ValueError as e:
      if "gin.REQUIRED" in str(e):
        name = str(e).split("/", 1)[0]
        raise GinConfigError(
            f"{e}\nThe gin macro {name} is required: pass --gin.{name}=VALUE "
            f"(gin files: {', '.join(gin_files)}).") from None
      raise GinConfigError(str(e)) from e


def write_operative_config(model_dir: str, filename: str = CONFIG_FILENAME,
                           is_primary: bool = True) -> Optional[str]:
  """Writes the config as gin saw it to ``model_dir/filename``; returns the path.

  Call it after the configured functions have run (t5x writes it once training
  has started): gin's *operative* config lists only the bindings that were
  used, with defaults filled in. Only the primary process writes.
  """
  if not is_primary:
    return None
  path = os.path.join(model_dir, filename)
  atomic_files.write_text(path, gin.operative_config_str())
  logging.info("Wrote the operative gin config to %s", path)
  return path
