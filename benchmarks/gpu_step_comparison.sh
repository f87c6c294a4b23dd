#!/usr/bin/env bash
# Issue #13's one-call GPU measurement: sld_jax's training step beside the
# released PyTorch step compiled with torch.compile, gpt2_medium and
# gpt2_small, 16 x 1024 tokens, vocabulary 56,320, bf16, SLD. In order of
# importance, each stage writing its results to $OUT (or ./gpu_results) as
# soon as it has them, so that a time limit loses nothing already measured:
#   1. attention.json      cuDNN packed attention against the float32
#                          reference (outputs, gradients) and each attention
#                          implementation's forward+backward time
#   2. jax_main.json       sld_jax "packed" at gpt2_medium and gpt2_small, each
#                          in its own process
#   3. torch_compile.json  the peer, torch.compile, same shapes
#   4. jax_more.json       gpt2_medium: Multimodal CE (the SLD-vs-MCE cost) and
#                          the variants that isolate each lever
#   5. torch_eager.json    the peer, eager
#   6. profile_*.json      where gpt2_medium's step spends its time (a trace of
#                          3 steps; on 2026-11-30 the traced run did not finish
#                          within 400 s on an H200, so it comes last)
# STAGES="1 2 3 4 5 6" (default) picks stages.
#
# On the lent machine (its python3 has jax, flax, optax, orbax, torch and
# transformers; gin-config travels as a wheel in .whl, see
# /work/.library/device/README.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site; bash benchmarks/gpu_step_comparison.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
stages=" ${STAGES:-1 2 3 4 5 6} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
log="$out/log.txt"
quiet() { grep --line-buffered -v "^W0000\|^I0000\|^E0000 .*cuInit"; }
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv 2>&1 | tee -a "$log"
python3 -c "import jax, torch; print('jax', jax.__version__, 'torch', torch.__version__)" 2>&1 | quiet | tee -a "$log"
shape=(--rows 16 --length 1024 --steps 10)
if [[ $stages == *" 1 "* ]]; then
  python3 benchmarks/accelerator_step.py --check_attention --rows 16 --length 1024 \
    --out "$out/attention.json" 2>&1 | quiet | tee -a "$log"
fi
if [[ $stages == *" 2 "* ]]; then
  python3 benchmarks/accelerator_step.py --sizes gpt2_medium gpt2_small --methods sld \
    --variants packed "${shape[@]}" --out "$out/jax_main.json" 2>&1 | quiet | tee -a "$log"
fi
if [[ $stages == *" 3 "* ]]; then
  python3 benchmarks/pytorch_accelerator_step.py --sizes gpt2_medium gpt2_small --modes compile \
    "${shape[@]}" --out "$out/torch_compile.json" 2>&1 | tee -a "$log"
fi
if [[ $stages == *" 4 "* ]]; then
  python3 benchmarks/accelerator_step.py --sizes gpt2_medium --methods multimodal_ce \
    --variants packed "${shape[@]}" --matmul_size 4096 --out "$out/jax_mce.json" \
    2>&1 | quiet | tee -a "$log"
  python3 benchmarks/accelerator_step.py --sizes gpt2_medium --methods sld \
    --variants packed_recompute cudnn_fused packed_no_dropout cudnn "${shape[@]}" --matmul_size 4096 \
    --out "$out/jax_more.json" 2>&1 | quiet | tee -a "$log"
fi
if [[ $stages == *" 5 "* ]]; then
  python3 benchmarks/pytorch_accelerator_step.py --sizes gpt2_medium gpt2_small --modes eager \
    "${shape[@]}" --out "$out/torch_eager.json" 2>&1 | tee -a "$log"
fi
if [[ $stages == *" 6 "* ]]; then
  python3 benchmarks/accelerator_step.py --sizes gpt2_medium --methods sld --variants packed \
    "${shape[@]}" --matmul_size 4096 --profile /tmp/profiles --out /tmp/profiled.json \
    2>&1 | quiet | tee -a "$log"
  cp /tmp/profiles/profile_*.json "$out/" 2>/dev/null
fi
