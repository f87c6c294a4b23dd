#!/usr/bin/env bash
# Installs everything sld_jax needs on a fresh Debian machine with Python 3.11:
# the apt packages (TTS voices, sox, WordNet text, real-speech fixtures and the
# demo's real-speech check) and the
# pinned Python packages, then the project itself in editable mode.
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

echo "[install] python packages (requirements-test.txt)"
python3 -m pip install -q --disable-pip-version-check -r requirements-test.txt
python3 -m pip install -q --disable-pip-version-check --no-deps -e .
