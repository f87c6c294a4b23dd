#!/usr/bin/env bash
# Installs what sld_jax needs on a fresh Debian machine with Python 3.11: the
# apt packages (TTS voices, sox, WordNet text, real-speech fixtures and the
# demo's real-speech check) and the pinned Python packages, then the project
# itself in editable mode.
#   bash scripts/install.sh          what the main job runs (requirements.txt)
#   bash scripts/install.sh test     plus the test-only peers and tools
#                                    (requirements-test.txt: pytest, torch,
#                                    transformers, nbclient, ruff)
set -euo pipefail
cd "$(dirname "$0")/.."

# asterisk-core-sounds-en(-wav): real human speech, the demo's evaluation-only
# "real" split (CC-BY-SA-3.0, read in place, never copied or trained on).
APT_PACKAGES=(espeak-ng flite sox libsndfile1 wordnet-base pocketsphinx-testdata
              asterisk-core-sounds-en asterisk-core-sounds-en-wav)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "[install] apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PROFILE=${1:-run}
case "$PROFILE" in
  run) REQUIREMENTS=requirements.txt ;;
  test) REQUIREMENTS=requirements-test.txt ;;
  *) echo "usage: bash scripts/install.sh [run|test]" >&2; exit 2 ;;
esac
echo "[install] python packages (${REQUIREMENTS})"
python3 -m pip install -q --disable-pip-version-check -r "${REQUIREMENTS}"
python3 -m pip install -q --disable-pip-version-check --no-deps -e .
