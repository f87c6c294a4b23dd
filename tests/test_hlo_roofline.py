"""benchmarks/hlo_roofline.py: kernels, bytes and flops read off optimized HLO.

Programs compiled here (XLA:CPU's optimized HLO has the same structure as a
GPU's: fusions calling computations, while loops with known trip counts) and
hand-written HLO for what only a GPU program has (cuDNN attention, in-place
loop updates), each against counts worked out by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
sys.path.insert(0, BENCHMARKS)

import hlo_roofline  # noqa: E402  pylint: disable=g-import-not-at-top


def _compiled_text(function, *shapes):
  return jax.jit(function).lower(*shapes).compile().as_text()


def test_a_matmul_and_its_elementwise_epilogue():
  a = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  b = jax.ShapeDtypeStruct((128, 32), jnp.float32)
  found = hlo_roofline.kernels(_compiled_text(lambda a, b: jnp.tanh(a @ b) * 2, a, b))
  matmuls = [k for k in found if k.category == "matmul"]
  assert len(matmuls) == 1
  assert matmuls[0].flops == 2 * 64 * 32 * 128
  assert matmuls[0].bytes == 4 * (64 * 128 + 128 * 32 + 64 * 32)
  others = [k for k in found if k.category != "matmul"]
  assert sum(k.flops for k in others) == 0
  # tanh and the scaling read the product and write the result, fused or not.
  assert sum(k.bytes for k in others) >= 2 * 4 * 64 * 32
  summary = hlo_roofline.summarize(found, peak_tflops=1.0, hbm_tb_s=1.0)
  expected_ms = sum(1e3 * max(k.flops / 1e12, k.bytes / 1e12) * k.count for k in found)
  assert summary["roofline_ms"] == pytest.approx(expected_ms)
  assert summary["kernels"] == len(found)


def test_loop_bodies_count_per_trip_and_slices_count_what_they_read():
  def total(xs):
    return jax.lax.scan(lambda c, x: (c + jnp.sum(jnp.sin(x)), None), 0.0, xs)[0]

  found = hlo_roofline.kernels(_compiled_text(total, jax.ShapeDtypeStruct((8, 1000), jnp.float32)))
  per_row = [k for k in found if "sin" in k.op_name]
  assert per_row and all(k.count == 8 for k in per_row)
  # Each trip reads its own row (4,000 bytes), not the whole [8, 1000] array.
  assert max(k.bytes for k in per_row) < 8 * 1000 * 4
  assert min(k.bytes for k in per_row) >= 1000 * 4


_GPU_HLO = """HloModule jit_step, is_scheduled=true

%fused_update (param_0: f32[4,16,256], param_1: s32[], param_2: f32[16,256]) -> f32[4,16,256] {
  %param_0 = f32[4,16,256]{2,1,0} parameter(0)
  %param_2 = f32[16,256]{1,0} parameter(2)
  %bitcast.1 = f32[1,16,256]{2,1,0} bitcast(%param_2)
  %param_1 = s32[] parameter(1)
  %constant.1 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[4,16,256]{2,1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_1, %constant.1, %constant.1)
}

%body (arg: (s32[], f32[4,16,256], f32[16,256])) -> (s32[], f32[4,16,256], f32[16,256]) {
  %arg = (s32[], f32[4,16,256]{2,1,0}, f32[16,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %buffer = f32[4,16,256]{2,1,0} get-tuple-element(%arg), index=1
  %row = f32[16,256]{1,0} get-tuple-element(%arg), index=2
  %update = f32[4,16,256]{2,1,0} fusion(%buffer, %i, %row), kind=kLoop, calls=%fused_update, metadata={op_name="jit(step)/while/body/dynamic_update_slice"}
  ROOT %out = (s32[], f32[4,16,256]{2,1,0}, f32[16,256]{1,0}) tuple(%i, %update, %row)
}

%condition (arg.1: (s32[], f32[4,16,256], f32[16,256])) -> pred[] {
  %arg.1 = (s32[], f32[4,16,256]{2,1,0}, f32[16,256]{1,0}) parameter(0)
  ROOT %done = pred[] constant(false)
}

ENTRY %main (q: bf16[2,128,4,64], k: bf16[2,128,4,64], v: bf16[2,128,4,64], start: (s32[], f32[4,16,256], f32[16,256])) -> (bf16[2,4,128,64], f32[2,4,128], u8[0]) {
  %q = bf16[2,128,4,64]{3,2,1,0} parameter(0)
  %k = bf16[2,128,4,64]{3,2,1,0} parameter(1)
  %v = bf16[2,128,4,64]{3,2,1,0} parameter(2)
  %start = (s32[], f32[4,16,256]{2,1,0}, f32[16,256]{1,0}) parameter(3)
  %loop = (s32[], f32[4,16,256]{2,1,0}, f32[16,256]{1,0}) while(%start), condition=%condition, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %attention = (bf16[2,4,128,64]{3,1,2,0}, f32[2,4,128]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp(Decoder)/layers_0/attention/dot_product_attention_fwd"}, backend_config={"cudnn_fmha_backend_config":{"mask_type":"CAUSAL"}}
}
"""


def test_cudnn_attention_flops_and_in_place_updates():
  found = {k.name: k for k in hlo_roofline.kernels(_GPU_HLO)}
  attention = found["%attention"]
  assert attention.category == "attention"
  # 4 B N T S D forward, halved by the causal mask.
  assert attention.flops == 4 * 2 * 4 * 128 * 128 * 64 * 0.5
  # q, k, v and the output in bfloat16, the softmax statistics in float32.
  assert attention.bytes == 4 * (2 * 128 * 4 * 64) * 2 + 2 * 4 * 128 * 4
  update = found["%update"]
  assert update.count == 4
  # Reads the [16, 256] row (and the index) and writes it into the buffer in
  # place: the buffer itself is neither read nor written whole.
  assert update.bytes == 2 * 16 * 256 * 4 + 4


def test_a_loop_without_a_known_trip_count_is_refused():
  with pytest.raises(ValueError, match="without a known trip count"):
    hlo_roofline.kernels(_GPU_HLO.replace('backend_config={"known_trip_count":{"n":"4"}}',
                                          "metadata={}"))


def test_text_without_an_entry_is_refused():
  with pytest.raises(ValueError, match="no ENTRY"):
    hlo_roofline.parse_module("HloModule empty\n")


def test_memory_only_writes_the_program_and_its_roofline(tmp_path):
  """accelerator_step.py --memory_only --hlo_dir on this CPU, a tiny model."""
  out = tmp_path / "aot.json"
  run = subprocess.run(
      [sys.executable, os.path.join(BENCHMARKS, "accelerator_step.py"), "--memory_only",
       "--sizes", "tiny", "--variants", "packed", "--rows", "2", "--length", "256",
       "--steps", "1", "--text_size", "300", "--speech_size", "100",
       "--hlo_dir", str(tmp_path / "hlo"), "--out", str(out)],
      check=True, capture_output=True, text=True, timeout=600)
  (result,) = json.loads(out.read_text())["results"]
  assert result["compiled_bytes"] > 0
  assert result["roofline_ms"] > 0 and 0 < result["mfu_bound"] < 1
  assert {"matmul", "loss (elementwise)"} <= set(result["roofline_ms_by_category"])
  assert (tmp_path / "hlo" / "tiny_sld_packed.hlo").stat().st_size > 0
  assert "| matmul |" in (tmp_path / "hlo" / "tiny_sld_packed_roofline.md").read_text()
  row = next(line for line in run.stdout.splitlines() if line.startswith("| tiny | sld | packed"))
  assert f"| {result['roofline_ms']:.1f} |" in row
