"""The gin files ship with the package: an installed sld_jax finds them without a checkout.

The project is installed (``pip install --no-deps --target``, from a copy of
its packaging inputs so that the build leaves nothing in the checkout) and a
fresh interpreter, in a directory that is not the checkout and with only the
install on its path, resolves ``gin_configs/models/tiny.gin`` and parses the
smoke experiment through its includes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import tiny_train
from sld_jax import gin_utils

PACKAGING_INPUTS = ("pyproject.toml", "README.md", "requirements.txt", "sld_jax", "tasks",
                    "gin_configs")
PROBE = """
import os, sys
import gin
from sld_jax import gin_utils
site = sys.argv[1]
assert gin_utils.__file__.startswith(site), gin_utils.__file__
assert gin_utils.GIN_ROOT == site, gin_utils.GIN_ROOT
assert os.path.isfile(os.path.join(gin_utils.GIN_CONFIGS_DIR, "models", "tiny.gin"))
gin_utils.parse_gin_config(["gin_configs/experiments/smoke.gin"], ['MODEL_DIR = "/tmp/x"'],
                           finalize=False)
print(gin.query_parameter("%TRAIN_STEPS"), gin.query_parameter("decoder_config.num_layers"))
"""


def test_installed_package_resolves_and_parses_its_gin_files(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  for name in PACKAGING_INPUTS:
    path = os.path.join(tiny_train.REPO_ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, source / name)
  site = str(tmp_path / "site")
  install = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
       "--use-pep517", "--target", site, str(source)],
      capture_output=True, text=True, timeout=300)
  assert install.returncode == 0, install.stderr[-3000:]
  gin_files = sorted(os.path.relpath(os.path.join(d, f), site)
                     for d, _, files in os.walk(os.path.join(site, "gin_configs"))
                     for f in files if f.endswith(".gin"))
  assert "gin_configs/models/tiny.gin" in gin_files
  assert "gin_configs/experiments/smoke.gin" in gin_files

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=site, TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, "-c", PROBE, site], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["40", "2"], result.stdout


def test_gin_root_is_wherever_gin_configs_imports_from_when_not_beside_sld_jax(
    tmp_path, monkeypatch):
  (tmp_path / "gin_configs").mkdir()
  (tmp_path / "gin_configs" / "__init__.py").write_text("")
  monkeypatch.setattr(gin_utils, "__file__", str(tmp_path / "other" / "sld_jax" / "gin_utils.py"))
  monkeypatch.delitem(sys.modules, "gin_configs", raising=False)
  monkeypatch.syspath_prepend(str(tmp_path))
  assert gin_utils.find_gin_root() == str(tmp_path)
