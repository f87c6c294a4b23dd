"""Content hashes of files (checkpoint manifests, run assets)."""

from __future__ import annotations

import hashlib


def sha256(path: str) -> str:
  """Hex sha256 of a file's bytes, read 1 MiB at a time."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
