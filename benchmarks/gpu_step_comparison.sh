#!/usr/bin/env bash
# Issue #13's one-call GPU measurement: sld_jax's training step in each
# implementation variant beside the released PyTorch step (eager and
# torch.compile), gpt2_small and gpt2_medium, 16 x 1024 tokens, vocabulary
# 56,320, bf16. Results go to $OUT (or ./gpu_results) after every
# configuration, so a time limit loses nothing already measured.
#
# On the lent machine (its python3 has jax, flax, optax, orbax, torch and
# transformers; gin-config travels as a wheel in .whl, see
# /work/.library/device/README.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site; bash benchmarks/gpu_step_comparison.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv | tee "$out/gpu.txt"
python3 benchmarks/accelerator_step.py --sizes gpt2_medium gpt2_small --rows 16 --length 1024 \
  --steps 10 --methods sld --variants cudnn_chunked cudnn_chunked_bf16logits cudnn reference \
  --out "$out/sld_jax.json" 2>&1 | grep -v "^W0000\|^I0000" | tee "$out/sld_jax.log"
python3 benchmarks/accelerator_step.py --sizes gpt2_medium --rows 16 --length 1024 --steps 10 \
  --methods multimodal_ce --variants cudnn_chunked --matmul_size 4096 \
  --out "$out/sld_jax_mce.json" 2>&1 | grep -v "^W0000\|^I0000" | tee "$out/sld_jax_mce.log"
python3 benchmarks/pytorch_accelerator_step.py --sizes gpt2_medium gpt2_small --modes compile eager \
  --rows 16 --length 1024 --steps 10 --out "$out/torch.json" 2>&1 | tee "$out/torch.log"
