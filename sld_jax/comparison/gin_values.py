r"""The literal values a gin composition binds, read with gin's own parser.

The comparison needs a few values before and after a run (``TRAIN_STEPS``,
``EVAL_EVERY``, ``SEED``, the ``LossConfig`` knobs of an objective) without
importing the configurables (TensorFlow and JAX) into the driver process. So
the files are read with ``gin.config_parser.ConfigParser`` as gin reads them
(includes followed through ``gin_utils.DEFAULT_SEARCH_PATHS``, blocks,
scopes, later bindings win), and values that are references or macros stay
symbolic::

  >>> values = parse_text("X = 3\nlosses.LossConfig:\n  alpha = 0.008\nY = %X\n")
  >>> values["X"], values["losses.LossConfig.alpha"], values["Y"]
  (3, 0.008, Macro(name='X'))

An operative config (``MODEL_DIR/config.gin``, written by training) names
configurables by their short names (``LossConfig.alpha``); ``lookup`` finds a
value under either spelling.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Optional, Sequence

from gin import config_parser

from sld_jax import gin_utils


@dataclasses.dataclass(frozen=True)
class Macro:
  """``%NAME`` in a value."""

  name: str


@dataclasses.dataclass(frozen=True)
class Reference:
  """``@name`` or ``@name()`` in a value."""

  name: str
  evaluate: bool


class _SymbolicDelegate(config_parser.ParserDelegate):

  def configurable_reference(self, scoped_name, evaluate):
    return Reference(scoped_name, evaluate)

  def macro(self, name):
    return Macro(name)


def _key(statement: config_parser.BindingStatement) -> str:
  name = ".".join(part for part in (statement.selector, statement.arg_name) if part)
  return f"{statement.scope}/{name}" if statement.scope else name


def resolve_path(path: str, search_paths: Sequence[str] = gin_utils.DEFAULT_SEARCH_PATHS
                 ) -> str:
  """A gin file as the mains find it: as given, then under each search path."""
  candidates = [path] + [os.path.join(root, path) for root in search_paths]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(f"gin file {path!r} not found (looked in "
                          f"{[os.path.abspath(r) for r in search_paths]})")


def _parse(text: str, filename: str, values: dict[str, Any],
           search_paths: Sequence[str], seen: set[str]) -> None:
  try:
    statements = list(config_parser.ConfigParser(text, _SymbolicDelegate()))
  except SyntaxError as e:
    raise ValueError(f"{filename}: gin syntax error: {e}") from None
  for statement in statements:
    if isinstance(statement, config_parser.IncludeStatement):
      parse_file(statement.filename, search_paths, values, seen)
    elif isinstance(statement, config_parser.BindingStatement):
      values[_key(statement)] = statement.value


def parse_file(path: str, search_paths: Sequence[str] = gin_utils.DEFAULT_SEARCH_PATHS,
               values: Optional[dict[str, Any]] = None,
               seen: Optional[set[str]] = None) -> dict[str, Any]:
  """The bindings of a gin file and of the files it includes, in gin's order."""
  values = {} if values is None else values
  seen = set() if seen is None else seen
  full = resolve_path(path, search_paths)
  if full not in seen:
    seen.add(full)
    with open(full) as f:
      _parse(f.read(), full, values, search_paths, seen)
  return values


def parse_text(text: str, filename: str = "<gin text>") -> dict[str, Any]:
  values: dict[str, Any] = {}
  _parse(text, filename, values, gin_utils.DEFAULT_SEARCH_PATHS, set())
  return values


def compose(gin_files: Iterable[str], bindings: Iterable[str] = ()) -> dict[str, Any]:
  """Files in order, then ``NAME = VALUE`` bindings, as ``parse_gin_config`` does."""
  values: dict[str, Any] = {}
  seen: set[str] = set()
  for path in gin_files:
    parse_file(path, values=values, seen=seen)
  for binding in bindings:
    _parse(binding, f"binding {binding!r}", values, gin_utils.DEFAULT_SEARCH_PATHS, seen)
  return values


def operative_values(model_dir: str) -> dict[str, Any]:
  """The operative config a training run wrote (``{}`` before it has)."""
  path = os.path.join(model_dir, gin_utils.CONFIG_FILENAME)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return parse_text(f.read(), path)


def lookup(values: dict[str, Any], name: str, default: Any = None) -> Any:
  """``values[name]``, following macros; ``a.b.C.x`` also matches ``C.x``."""
  value = values.get(name)
  if value is None and "." in name:
    short = ".".join(name.split(".")[-2:])
    value = values.get(short)
  seen = set()
  while isinstance(value, Macro) and value.name not in seen:
    seen.add(value.name)
    value = values.get(value.name)
  return default if value is None or isinstance(value, (Macro, Reference)) else value
