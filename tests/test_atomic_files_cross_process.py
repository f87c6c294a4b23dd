"""sld_jax.atomic_files and sld_jax.cross_process (one process)."""

import json
import os

import numpy as np
import pytest

from sld_jax import atomic_files
from sld_jax import cross_process


def test_write_json_replaces_whole_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / "a" / "b.json")
  atomic_files.write_json(path, {"x": 1})
  atomic_files.write_json(path, {"x": 2, "y": [1, 2]})
  assert json.load(open(path)) == {"x": 2, "y": [1, 2]}
  assert os.listdir(tmp_path / "a") == ["b.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
  path = str(tmp_path / "kept.txt")
  atomic_files.write_text(path, "old")
  with pytest.raises(RuntimeError):
    with atomic_files.replacing(path) as tmp:
      open(tmp, "w").write("half")
      raise RuntimeError("writer died")
  assert open(path).read() == "old"
  assert os.listdir(tmp_path) == ["kept.txt"]


def test_single_process_reductions_are_the_identity():
  values = np.array([3, 9])
  np.testing.assert_array_equal(cross_process.gather(values), [[3, 9]])
  np.testing.assert_array_equal(cross_process.all_sum(values), [3, 9])
  np.testing.assert_array_equal(cross_process.all_max(values), [3, 9])
  assert cross_process.any_process(True) and not cross_process.any_process(False)
