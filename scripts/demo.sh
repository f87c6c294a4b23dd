#!/usr/bin/env bash
# The main job in one command, on a fresh Debian machine with Python 3.11:
#   1. install the apt and pip packages (scripts/install.sh);
#   2. train the demo model (gin_configs/experiments/demo.gin): on first use
#      this builds the embedded corpus (spoken digit strings from offline TTS
#      voices, made to sound like real recordings: slower, pauses, telephone
#      band, noise, the Piper neural voice) and its Whisper-tiny k-means units
#      under $SLD_DATA_DIR;
#   3. score the checkpoint on the dev and test splits (held-out synthetic
#      voices) and the real split (a real person reading digits, from the
#      Debian asterisk-core-sounds-en packages; never trained on);
#   4. print the WER table and where everything is.
# Override the output folder with MODEL_DIR=... and extra gin with GIN_ARGS=...;
# VERBOSE=1 shows every library's log lines (the mains' --verbose).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=${MODEL_DIR:-runs/demo}
EXPERIMENT=${EXPERIMENT:-gin_configs/experiments/demo.gin}
GIN_ARGS="${GIN_ARGS:-}${VERBOSE:+ --verbose}"

bash scripts/install.sh

echo "[demo] training ${EXPERIMENT} into ${MODEL_DIR} (the corpus is built on first use)"
python3 -m sld_jax.train --gin_file="${EXPERIMENT}" --gin.MODEL_DIR="\"${MODEL_DIR}\"" ${GIN_ARGS}

echo "[demo] scoring dev and test (voices never heard in training) and real (human speech)"
python3 -m sld_jax.eval --gin_file="${EXPERIMENT}" \
  --gin.CHECKPOINT_PATH="\"${MODEL_DIR}\"" --gin.EVAL_OUTPUT_DIR="\"${MODEL_DIR}/eval\"" ${GIN_ARGS}

python3 scripts/summarize_run.py "${MODEL_DIR}"
