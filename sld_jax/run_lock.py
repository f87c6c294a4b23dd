"""One trainer per run directory: an exclusive lock file held for the run.

``MODEL_DIR/run.lock`` is created with ``O_CREAT | O_EXCL`` by process 0 of a
run and removed when the run ends; it holds who owns it::

  {"pid": 4242, "host": "worker-0", "start_ticks": 1234567, "since": "2026-..."}

A second trainer on the same directory fails at once (``RunDirectoryLocked``)
naming the owner. A lock left by a process that died (``kill -9``, a crashed
machine) is *stale* and is taken over with a warning when its owner is known
to be gone: same host, and no live process with that pid and start time
(``/proc/<pid>/stat`` field 22, so a reused pid is not mistaken for the
owner). A lock from another host cannot be checked from here; the message
says which host and pid to check and which file to delete.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any, Optional

from absl import logging

LOCK_FILENAME = "run.lock"


class RunDirectoryLocked(RuntimeError):
  """Another live process holds the run directory."""


def _start_ticks(pid: int) -> Optional[int]:
  """The process's start time in clock ticks since boot (Linux), else None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  # The command name (field 2) may hold spaces and parentheses: split after it.
  fields = stat[stat.rfind(")") + 2:].split()
  return int(fields[19])  # field 22 of the whole line


def _is_alive(pid: int, start_ticks: Optional[int]) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  if start_ticks is None:
    return True
  current = _start_ticks(pid)
  return current is None or current == start_ticks


def owner_description(owner: dict[str, Any]) -> str:
  return (f"pid {owner.get('pid')} on host {owner.get('host')} (since "
          f"{owner.get('since', '?')})")


class RunLock:
  """``with RunLock(model_dir):`` holds the run directory; no-op if not primary."""

  def __init__(self, directory: str, is_primary: bool = True):
    self.directory = os.path.abspath(directory)
    self.path = os.path.join(self.directory, LOCK_FILENAME)
    self.is_primary = is_primary
    self._fd: Optional[int] = None

  def _read_owner(self) -> Optional[dict[str, Any]]:
    try:
      with open(self.path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      return json.loads(text)
    except ValueError:
      return {"unreadable": text[:200]}

  def _stale(self, owner: dict[str, Any]) -> bool:
    if "unreadable" in owner:
      # A writer killed between creating and filling the file; give it time.
      age = datetime.datetime.now().timestamp() - os.path.getmtime(self.path)
      return age > 60
    if owner.get("host") != socket.gethostname():
      return False
    return not _is_alive(int(owner["pid"]), owner.get("start_ticks"))

  def acquire(self) -> "RunLock":
    if not self.is_primary or self._fd is not None:
      return self
    os.makedirs(self.directory, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "start_ticks": _start_ticks(os.getpid()),
          "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(10):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._read_owner()
        if owner is None:
          continue  # released meanwhile
        if not self._stale(owner):
          raise RunDirectoryLocked(
              f"{self.directory} is in use by another run: {owner_description(owner)} "
              f"holds {self.path}. Wait for it to finish, use another MODEL_DIR, or, if "
              "that process is gone (e.g. on another machine), delete the lock file."
          ) from None
        logging.warning("Taking over the stale lock %s of %s, which is no longer running",
                        self.path, owner_description(owner))
        stale = f"{self.path}.stale.{os.getpid()}"
        try:
          os.rename(self.path, stale)   # atomic: one of several racers wins
          os.remove(stale)
        except FileNotFoundError:
          pass
        continue
      os.write(fd, json.dumps(me).encode())
      os.fsync(fd)
      self._fd = fd
      return self
    raise RunDirectoryLocked(f"could not take the lock {self.path}: it keeps changing owner")

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      if (self._read_owner() or {}).get("pid") == os.getpid():
        os.remove(self.path)
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
