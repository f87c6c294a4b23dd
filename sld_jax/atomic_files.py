"""Files that appear whole or not at all: write beside the target, then rename.

A reader (another process, a resumed run, ``ls``) never sees half a file:
the content goes to ``<path>.incomplete`` and ``os.replace`` moves it into
place, which is atomic on one filesystem. A crash leaves at most a stale
``.incomplete`` file, which the next write overwrites.

  >>> import os, tempfile
  >>> path = os.path.join(tempfile.mkdtemp(), "sub", "metrics.json")
  >>> write_json(path, {"wer": 12.5})
  >>> open(path).read()
  '{\\n  "wer": 12.5\\n}\\n'
  >>> with replacing(path) as tmp:      # any writer that takes a path
  ...   _ = open(tmp, "w").write("{}")
  >>> open(path).read(), os.path.exists(path + INCOMPLETE_SUFFIX)
  ('{}', False)
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator, Optional

INCOMPLETE_SUFFIX = ".incomplete"


@contextlib.contextmanager
def replacing(path: str, *, fsync: bool = False) -> Iterator[str]:
  """Yields a temporary path; on success it replaces ``path``.

  On an exception the temporary file is removed and ``path`` is untouched.
  Parent folders are created.
  """
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp = path + INCOMPLETE_SUFFIX
  try:
    yield tmp
    if fsync:
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str, *, fsync: bool = False) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  with replacing(path, fsync=fsync) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_json(path: str, value: Any, *, indent: Optional[int] = 2, sort_keys: bool = True,
               default: Optional[Callable[[Any], Any]] = None, fsync: bool = False) -> None:
  """Writes ``value`` as JSON (with a final newline) to ``path`` atomically."""
  write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys, default=default,
                              ensure_ascii=False) + "\n", fsync=fsync)
