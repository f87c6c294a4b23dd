"""The GPU run's report (benchmarks/gpu_report.py) and the profile's categories.

The report turns the JSON files of ``gpu_step_comparison.sh`` into the
tables of docs/benchmarks.md; here it reads files written in those formats
with known numbers, and each goal's verdict is checked against them.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_report  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import profile_summary  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

GIB = 2**30


def _jax(size, method, variant, step, mfu, peak_gib, **extra):
  return dict(size=size, method=method, variant=variant, step_seconds=step,
              tokens_per_second=16384 / step, mfu_datasheet=mfu,
              peak_bytes_in_use=int(peak_gib * GIB), **extra)


def _write(directory: pathlib.Path, name: str, payload) -> None:
  (directory / name).write_text(json.dumps(payload))


@pytest.fixture(name="run_dir")
def fixture_run_dir(tmp_path):
  _write(tmp_path, "jax_main.json", {"device": "NVIDIA H200", "jax": "0.11.2", "results": [
      _jax("gpt2_medium", "sld", "packed", 0.100, 0.40, 25.0, roofline_ms=57.0,
           roofline_ms_by_category={"matmul": 35.7, "norms": 5.0}),
      _jax("gpt2_small", "sld", "packed", 0.040, 0.36, 12.5)]})
  _write(tmp_path, "jax_mce.json", {"results": [
      _jax("gpt2_medium", "multimodal_ce", "packed", 0.098, 0.41, 25.0)]})
  _write(tmp_path, "torch_compile.json", {"torch": "2.11.0", "results": [
      dict(size="gpt2_medium", mode="compile", step_seconds=0.120, tokens_per_second=136533,
           mfu_datasheet=0.333, peak_gib=36.4),
      dict(size="gpt2_small", mode="compile", error="RuntimeError: out of time")]})
  _write(tmp_path, "jax_more.json", {"results": [
      _jax("gpt2_medium", "sld", "packed_recompute", 0.103, 0.39, 26.0),
      dict(size="gpt2_medium", method="sld", variant="cudnn", error="exit 1: boom")]})
  _write(tmp_path, "jax_xla_flags.json", {"results": [
      _jax("gpt2_medium", "sld", "packed", 0.095, 0.42, 25.0,
           xla_flags="--xla_gpu_enable_triton_gemm=false")]})
  _write(tmp_path, "attention.json", {
      "reference_f32_fwd_bwd_ms": 4.9, "cudnn_packed_host_by4_fwd_bwd_ms": 0.6,
      "cudnn_packed_host_by4_relative_error": {"out": 0.003, "dq": 0.006},
      "triton_visited_block_fraction": 0.426,
      "cudnn_dense_mask_error": "RuntimeError: cuDNN is not detected."})
  _write(tmp_path, "jax_breakdown.json", {"results": [dict(
      _jax("gpt2_medium", "sld", "packed", 0.100, 0.40, 25.0),
      breakdown_ms={"step": 100.0, "gradients": 96.0, "forward": 30.0, "backward": 66.0,
                    "loss_pass": 12.0, "decoder_without_loss": 84.0,
                    "optimizer_and_metrics": 4.0})]})
  _write(tmp_path, "profile_gpt2_medium_sld_packed.json", {
      "steps": 2, "categories_ms_per_step": {"matmul": 60.0, "attention": 20.0,
                                             "other fusions and kernels": 20.0},
      "top_ops": [{"op": "custom-call.12", "ms_per_step": 5.5, "calls": 2,
                   "category": "matmul"}]})
  return tmp_path


def test_goals_are_judged_against_the_issues_bounds(run_dir):
  goals = {goal: (measured, verdict) for goal, measured, verdict in gpu_report.goals(run_dir)}
  assert goals["gpt2_medium MFU >= 45%"] == ("40.0%", "not met")
  assert goals["gpt2_medium peak <= 30 GiB"] == ("25.0 GiB", "met")
  assert goals["gpt2_small MFU >= 35%"] == ("36.0%", "met")
  assert goals["SLD step / Multimodal CE step <= 1.03 (gpt2_medium)"] == ("1.020", "met")
  speedup = [v for k, v in goals.items() if k.startswith("compiled peer")][0]
  assert speedup == ("1.20", "-")


def test_missing_stages_are_not_measured_rather_than_guessed(tmp_path):
  _write(tmp_path, "jax_main.json", {"results": [
      _jax("gpt2_medium", "sld", "packed", 0.080, 0.50, 31.0)]})
  goals = {goal: (measured, verdict) for goal, measured, verdict in gpu_report.goals(tmp_path)}
  assert goals["gpt2_medium MFU >= 45%"] == ("50.0%", "met")
  assert goals["gpt2_medium peak <= 30 GiB"] == ("31.0 GiB", "not met")
  assert goals["gpt2_small MFU >= 35%"] == ("-", "not measured")
  assert goals["SLD step / Multimodal CE step <= 1.03 (gpt2_medium)"][1] == "not measured"


def test_comparison_rows_put_each_size_beside_its_peer(run_dir):
  rows = gpu_report.comparison_rows(run_dir)
  assert [(r["size"], r["implementation"]) for r in rows] == [
      ("gpt2_medium", "sld_jax `packed`"), ("gpt2_medium", "PyTorch, `torch.compile`"),
      ("gpt2_small", "sld_jax `packed`")]      # the failed peer has no row
  assert rows[0]["step_ms"] == pytest.approx(100.0) and rows[0]["peak_gib"] == pytest.approx(25.0)
  assert rows[1]["peak_gib"] == 36.4


def test_levers_are_relative_to_the_main_variant_and_keep_errors(run_dir):
  rows = {(r["variant"], r["xla_flags"]): r for r in gpu_report.lever_rows(run_dir)}
  assert rows[("packed_recompute", "")]["vs_main"] == pytest.approx(1.03)
  assert rows[("packed", "--xla_gpu_enable_triton_gemm=false")]["vs_main"] == pytest.approx(0.95)
  assert rows[("cudnn", "")]["error"].startswith("exit 1")


def test_report_has_every_section(run_dir):
  text = gpu_report.report(run_dir)
  assert "NVIDIA H200, jax 0.11.2, torch 2.11.0" in text
  assert "| gpt2_medium | sld_jax `packed` | 100.0 | 163,840 | 40.0% | 25.0 |" in text
  assert "| cudnn_packed_host_by4 | 0.60 | 0.60% |" in text
  assert "visits 42.6% of causal attention's 128 x 128 block pairs" in text
  assert "The packed step this check picks: `packed`" in text
  assert "| matmul | 60.0 | 60% |" in text and "| all | 100.0 | |" in text
  assert "| loss_pass | 12.0 | 12% |" in text and "| optimizer_and_metrics | 4.0 | 4% |" in text
  assert "| gpt2_medium | sld | `packed` | 100.0 | 57.0 | 57% |" in text
  assert "| matmul | 35.70 |" in text
  assert "cudnn_dense_mask" not in text            # an error, not a time
  assert "- jax_more.json: gpt2_medium sld cudnn: exit 1: boom" in text
  assert "- torch_compile.json: gpt2_small compile: RuntimeError: out of time" in text


@pytest.mark.parametrize("triton_ms, triton_error, want", [
    (0.40, 0.008, "packed_triton"),      # faster, bf16-sized errors
    (0.70, 0.008, "packed"),             # slower than cuDNN's packed attention
    (0.40, 0.300, "packed"),             # faster but wrong
    (None, None, "packed"),              # the kernel failed: no time
])
def test_the_faster_packed_attention_is_the_main_variant(tmp_path, triton_ms, triton_error,
                                                         want):
  attention = {"cudnn_packed_host_pow2_fwd_bwd_ms": 0.60,
               "cudnn_packed_host_pow2_relative_error": {"out": 0.004, "dq": 0.007}}
  if triton_ms is None:
    attention["triton_error"] = "RuntimeError: Triton compilation failed"
  else:
    attention.update(triton_fwd_bwd_ms=triton_ms,
                     triton_relative_error={"out": 0.004, "dk": triton_error})
  _write(tmp_path, "attention.json", attention)
  assert gpu_report.faster_packed_variant(tmp_path) == want
  assert gpu_report.faster_packed_variant(tmp_path / "no_such_run") == "packed"


def test_the_fastest_accurate_triton_block_choice_is_picked(tmp_path):
  _write(tmp_path, "attention.json", {
      "cudnn_packed_host_pow2_fwd_bwd_ms": 0.60,
      "triton_fwd_bwd_ms": 0.50, "triton_relative_error": {"out": 0.004},
      "triton_blocks_64_fwd_bwd_ms": 0.30, "triton_blocks_64_relative_error": {"dq": 0.9},
      "triton_backward_32_fwd_bwd_ms": 0.40,
      "triton_backward_32_relative_error": {"out": 0.004, "dv": 0.01}})
  # blocks_64 is the fastest but wrong; backward_32 is the fastest right one.
  assert gpu_report.faster_packed_variant(tmp_path) == "packed_triton_backward_32"
  # cuDNN's packed attention failed: the Triton kernel it is, however fast.
  _write(tmp_path, "attention.json", {
      "cudnn_packed_host_pow2_error": "RuntimeError: cuDNN is not detected.",
      "triton_fwd_bwd_ms": 3.0, "triton_relative_error": {"out": 0.004}})
  assert gpu_report.faster_packed_variant(tmp_path) == "packed_triton"


def test_the_report_follows_the_variant_the_main_stage_timed(tmp_path):
  _write(tmp_path, "jax_main.json", {"results": [
      _jax("gpt2_medium", "sld", "packed_triton", 0.090, 0.45, 20.0)]})
  _write(tmp_path, "jax_mce.json", {"results": [
      _jax("gpt2_medium", "multimodal_ce", "packed", 0.050, 0.80, 20.0),
      _jax("gpt2_medium", "multimodal_ce", "packed_triton", 0.088, 0.46, 20.0)]})
  _write(tmp_path, "jax_more.json", {"results": [
      _jax("gpt2_medium", "sld", "packed", 0.099, 0.41, 20.0)]})
  assert gpu_report.main_variant(tmp_path) == "packed_triton"
  goals = {goal: (measured, verdict) for goal, measured, verdict in gpu_report.goals(tmp_path)}
  assert goals["SLD step / Multimodal CE step <= 1.03 (gpt2_medium)"] == ("1.023", "met")
  assert gpu_report.lever_rows(tmp_path)[0]["vs_main"] == pytest.approx(1.1)
  assert "| gpt2_medium | sld_jax `packed_triton` | 90.0 |" in gpu_report.report(tmp_path)


@pytest.mark.parametrize("op, kernel, want", [
    ("custom-call.12", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("custom-call.7", "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", "matmul"),
    ("custom-call.3", "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64", "attention"),
    ("loop_add_fusion.4", "loop_add_fusion_4", "other fusions and kernels"),
    ("input_reduce_fusion.2", "input_reduce_fusion_2", "reductions (norms, softmax, loss)"),
    ("rng-bit-generator.1", "rng_bit_generator_kernel", "random bits"),
])
def test_profile_categories_go_by_the_kernel_first(op, kernel, want):
  assert profile_summary.category(op, kernel) == want


def test_the_gpu_script_runs_end_to_end_on_a_cpu(tmp_path):
  """gpu_step_comparison.sh, the one call a lent GPU gets, dry-run at tiny
  sizes: stages 2 (sld_jax's packed step) and 5 (the step's parts timed
  alone, and the profile) leave their files and a report with no failed
  configuration. An attention check left by stage 1 (here written
  beforehand: the kernels do not run on a CPU) with the Triton kernel faster
  makes every stage time "packed_triton" (whose attention is "xla" off
  GPUs). A renamed flag or a broken stage shows here, not in the GPU lease.
  (Stage 4 is stage 2's command with ``--methods multimodal_ce``, left out
  to save the suite a compile; the report's use of its file is checked on
  the fabricated run folder above.)"""
  repo = pathlib.Path(__file__).resolve().parent.parent
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'no GPU (dry run)'\n")
  (bin_dir / "nvidia-smi").chmod(0o755)
  out = tmp_path / "out"
  out.mkdir()
  _write(out, "attention.json", {
      "cudnn_packed_host_pow2_fwd_bwd_ms": 0.9, "triton_fwd_bwd_ms": 0.5,
      "triton_relative_error": {"out": 0.004, "dq": 0.008}})
  environment = dict(
      os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), MEDIUM="tiny",
      SMALL="tiny", MATMUL="64", STAGES="2 5",
      SHAPE="--rows 2 --length 256 --steps 1 --text_size 300 --speech_size 100")
  environment.pop("XLA_FLAGS", None)          # the children run as a user would
  completed = subprocess.run(["bash", str(repo / "benchmarks/gpu_step_comparison.sh")],
                             env=environment, capture_output=True, text=True, timeout=600,
                             check=False)
  assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
  for name in ("jax_main.json", "jax_breakdown.json", "profile_tiny_sld_packed_triton.json",
               "roofline_tiny_sld_packed_triton_roofline.md", "trace.xplane.pb", "report.md"):
    assert (out / name).exists(), name
  assert "main variant: packed_triton" in completed.stdout
  assert not list(out.glob("*.hlo")), "the programs stay on the machine"
  report = (out / "report.md").read_text()
  assert "did not finish" not in report, report
  assert "| tiny | sld | `packed_triton` |" in report
  assert "| tiny | sld_jax `packed_triton` |" in report
  assert "| loss_pass |" in report and "| optimizer_and_metrics |" in report
  [main] = json.loads((out / "jax_main.json").read_text())["results"]
  assert (main["method"], main["variant"]) == ("sld", "packed_triton") and main["step_seconds"] > 0
  assert not (out / "jax_mce.json").exists()
