#!/usr/bin/env bash
# The test suite in one command, on a fresh Debian machine with Python 3.11:
# installs the test profile (scripts/install.sh test: the main job's packages
# plus pytest, the correctness peers torch/transformers, nbclient and
# ruff), runs the linter (ruff, configured in pyproject.toml), then the tests
# on 2 workers; a module marked xdist_group (one whose module fixtures, such
# as a trained smoke run, cost seconds) runs on one worker, so they are built
# once. Extra arguments go to pytest (e.g. tests/test_losses.py -k kl).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python3 -m ruff check .
if (($#)); then
  python3 -m pytest -q "$@"
else
  python3 -m pytest -q -n 2 --dist loadgroup tests
fi
