#!/usr/bin/env bash
# Issue #13's GPU measurement: sld_jax's training step beside the released
# PyTorch step compiled with torch.compile, gpt2_medium and gpt2_small,
# 16 x 1024 tokens, vocabulary 56,320, bf16, SLD. In order of importance,
# each stage writing its results to $OUT (or ./gpu_results) as soon as it has
# them, so that a time limit loses nothing already measured:
#   1. attention.json      cuDNN packed attention and the Pallas Triton kernel
#                          against the float32 reference (outputs, gradients)
#                          and each attention implementation's
#                          forward+backward time (~70 s; ATTENTION="names"
#                          times only those, ~30 s). It picks the packed
#                          variant the stages below time: "packed_triton"
#                          (at its fastest accurate block choice) where the
#                          Triton kernel beat cuDNN's packed attention or
#                          cuDNN's failed, "packed" otherwise
#                          (gpu_report.py --faster_packed_variant; VARIANT=
#                          sets it, as a second call must: its $OUT is new)
#   2. jax_main.json       sld_jax's packed step at gpt2_medium and gpt2_small, each
#                          in its own process, with the roofline of each
#                          compiled step (roofline_*.md, hlo_roofline.py;
#                          ~200 s)
#   3. torch_compile.json  the peer, torch.compile, same shapes (~170 s)
#   4. jax_mce.json        gpt2_medium, Multimodal CE: the SLD-vs-MCE cost (~120 s)
#   5. jax_breakdown.json  where gpt2_medium's step spends its time, by timing
#                          its parts alone (forward, forward + backward, the
#                          chunked loss pass; ~160 s), then profile_*.json:
#                          2 traced steps with lean tracer options and XLA's
#                          command buffers off (so that each kernel is named
#                          by its HLO op), the raw trace kept as
#                          trace.xplane.pb (~100 s; on 2026-11-30 a
#                          default-options trace did not finish within 400 s,
#                          so it has a limit, PROFILE_TIMEOUT=150)
#   6. jax_more.json       gpt2_medium: the other packed variant and the
#                          variants that isolate each lever
#                          (attention dropout's cost: reference vs
#                          reference_no_attention_dropout), then the packed step
#                          under other XLA flags (~900 s: over two calls)
#   7. torch_eager.json    the peer, eager (~120 s)
# Then report.md: the tables for docs/benchmarks.md (benchmarks/gpu_report.py).
# STAGES="1 2 3 4 5 6 7" (default) picks stages; STAGES=" " only writes the
# report. Times are estimates from the 2026-11-30 calls. One device call may
# run 600 s and a session has 900 s of device time, the machine's start
# (60-120 s) included, so: ATTENTION="cudnn_packed_host_pow2 triton
# triton_blocks_64 triton_backward_32" STAGES="1 2 3" (the attention choice
# and the Done-when tables, ~420 s), then at once, while the machine is warm
# (it goes back 30 s after a call), VARIANT=<the variant the first call
# printed> STAGES="4 5" (~380 s); stages 6 and 7 only with time to spare.
#
# On the lent machine (its python3 has jax, flax, optax, orbax, torch and
# transformers; gin-config travels as a wheel in .whl, see
# /work/.library/device/README.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site; bash benchmarks/gpu_step_comparison.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
stages=" ${STAGES:-1 2 3 4 5 6 7} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# Compiled steps are kept, so that a stage re-run on the same machine (after a
# timeout, say) loads its steps instead of compiling them again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
log="$out/log.txt"
quiet() { grep --line-buffered -v "^W0000\|^I0000\|^E0000 .*cuInit"; }
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv 2>&1 | tee -a "$log"
python3 -c "import jax, torch; print('jax', jax.__version__, 'torch', torch.__version__)" 2>&1 | quiet | tee -a "$log"
# MEDIUM, SMALL, SHAPE and MATMUL override the sizes, shapes and matmul peak's
# size, for a dry run of the script on a CPU: MEDIUM=tiny SMALL=tiny
# SHAPE="--rows 2 --length 256 --steps 3" MATMUL=256 STAGES="2 4 5 6".
medium=${MEDIUM:-gpt2_medium} small=${SMALL:-gpt2_small} matmul=${MATMUL:-4096}
read -r -a shape <<< "${SHAPE:---rows 16 --length 1024 --steps 10}"
# The timed steps' optimized programs (~15 MB each, left on the machine) and
# their rooflines (hlo_roofline.py; brought back as roofline_*.md).
hlo=$(mktemp -d)
keep_rooflines() { for f in "$hlo"/*_roofline.md; do [[ -e $f ]] && cp "$f" "$out/roofline_$(basename "$f")"; done; }
if [[ $stages == *" 1 "* ]]; then
  read -r -a attention <<< "${ATTENTION:-}"
  python3 benchmarks/accelerator_step.py --check_attention "${shape[@]}" \
    ${attention[@]:+--attention "${attention[@]}"} \
    --out "$out/attention.json" 2>&1 | quiet | tee -a "$log"
fi
variant=${VARIANT:-$(python3 benchmarks/gpu_report.py "$out" --faster_packed_variant)}
other=$([[ $variant == packed ]] && echo packed_triton || echo packed)
echo "main variant: $variant" | tee -a "$log"
if [[ $stages == *" 2 "* ]]; then
  python3 benchmarks/accelerator_step.py --sizes "$medium" "$small" --methods sld \
    --variants "$variant" "${shape[@]}" --matmul_size "${MATMUL:-8192}" --hlo_dir "$hlo" \
    --out "$out/jax_main.json" 2>&1 | quiet | tee -a "$log"
  keep_rooflines
fi
if [[ $stages == *" 3 "* ]]; then
  python3 benchmarks/pytorch_accelerator_step.py --sizes "$medium" "$small" --modes compile \
    "${shape[@]}" --out "$out/torch_compile.json" 2>&1 | tee -a "$log"
fi
if [[ $stages == *" 4 "* ]]; then
  python3 benchmarks/accelerator_step.py --sizes "$medium" --methods multimodal_ce \
    --variants "$variant" "${shape[@]}" --matmul_size "$matmul" --hlo_dir "$hlo" \
    --out "$out/jax_mce.json" 2>&1 | quiet | tee -a "$log"
  keep_rooflines
fi
if [[ $stages == *" 5 "* ]]; then
  python3 benchmarks/accelerator_step.py --sizes "$medium" --methods sld --variants "$variant" \
    "${shape[@]}" --matmul_size "$matmul" --breakdown --out "$out/jax_breakdown.json" \
    2>&1 | quiet | tee -a "$log"
  profiles=$(mktemp -d)
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout "${PROFILE_TIMEOUT:-150}" \
    python3 benchmarks/accelerator_step.py --in_process --sizes "$medium" --methods sld \
    --variants "$variant" "${shape[@]}" --profile "$profiles" 2>&1 | quiet | tee -a "$log"
  cp "$profiles"/profile_*.json "$out/" 2>/dev/null
  trace=$(find "$profiles" -name "*.xplane.pb" | head -1)
  if [[ -n $trace && $(stat -c %s "$trace") -le 16000000 ]]; then
    cp "$trace" "$out/trace.xplane.pb"
  elif [[ -n $trace ]]; then
    gzip -c "$trace" > "$out/trace.xplane.pb.gz"
  fi
fi
if [[ $stages == *" 6 "* ]]; then
  python3 benchmarks/accelerator_step.py --sizes "$medium" --methods sld \
    --variants "$other" packed_slots_by_4 packed_recompute packed_no_dropout cudnn_fused cudnn reference reference_no_attention_dropout "${shape[@]}" --matmul_size "$matmul" \
    --out "$out/jax_more.json" 2>&1 | quiet | tee -a "$log"
  python3 benchmarks/accelerator_step.py --sizes "$medium" --methods sld --variants "$variant" \
    "${shape[@]}" --matmul_size "$matmul" --out "$out/jax_xla_flags.json" \
    --xla_flags="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true" \
    2>&1 | quiet | tee -a "$log"
fi
if [[ $stages == *" 7 "* ]]; then
  python3 benchmarks/pytorch_accelerator_step.py --sizes "$medium" "$small" --modes eager \
    "${shape[@]}" --out "$out/torch_eager.json" 2>&1 | tee -a "$log"
fi
# The tables for docs/benchmarks.md, from whatever stages ran.
python3 benchmarks/gpu_report.py "$out" > "$out/report.md" && cat "$out/report.md"
