"""The objective comparison (sld_jax.comparison, scripts/compare_objectives.py):
the plan and its gin, one real comparison end to end on the smoke corpus, and
the report on fabricated run folders with known per-utterance errors.

The real run trains 2 methods x 1 seed of a 1-layer, 32-wide model for 4
steps with dev WER every 2 (one training segment each), scores the selected
checkpoints, then a second invocation finds them done and ``--report_only
--publish`` rebuilds the report elsewhere. How a run is cut into training
segments that resume from the latest checkpoint and stop on the dev WER is
checked with a scripted trainer whose dev curve is known. The statistics of a
3 methods x 5 seeds report are checked on fabricated folders, since 15 real
runs would take too long.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import tiny_train
from sld_jax.comparison import gin_values
from sld_jax.comparison import main as comparison
from sld_jax.comparison import plan as plan_lib
from sld_jax.comparison import run_files
from sld_jax.comparison import runner
from sld_jax.comparison import statistics
from sld_jax.comparison import stopping

REPO = tiny_train.REPO_ROOT
SCRIPT = os.path.join(REPO, "scripts", "compare_objectives.py")
SMOKE_TASK = "sld_embedded_digits_whisper_smoke"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("dev_wer_curves.png", "wer_intervals.png", "pairwise_differences.png")


def _check_png(path: str) -> None:
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE, path
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert image.std() > 0.01   # not a blank canvas


def _table_rows(markdown: str, header_start: str) -> list[list[str]]:
  """The cells of the first markdown table whose header starts with ``header_start``."""
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip("|").split("|")])
  return rows


# ----------------------------------------------------------------------------
# The plan, its gin and its commands.
# ----------------------------------------------------------------------------


def test_base_config_follows_the_released_recipe():
  recipe = plan_lib.Recipe((plan_lib.DEFAULT_BASE,))
  for method in plan_lib.DEFAULT_METHODS:
    values = recipe.values(method)
    assert gin_values.lookup(values, "lm.SpeechTextLM.time_mask_prob") == 0.3
    assert gin_values.lookup(values, "TASK") == "sld_embedded_digits_whisper_compare"
    if method.startswith("sld"):      # the released normalisation (the objective files' own)
      assert gin_values.lookup(values, "losses.LossConfig.kl_normalization") == "sequence"
  assert gin_values.lookup(recipe.values("sld"), "losses.LossConfig.kl_target") == "paper"
  assert gin_values.lookup(recipe.values("sld_reference"),
                           "losses.LossConfig.kl_target") == "reference"
  steps, every = recipe.schedule("sld")
  assert steps >= 4 * every   # a dev-WER curve of at least 4 points per run
  assert len(comparison.parse_args([]).seeds) >= 5
  from sld_jax.speech import embedded_corpus  # pylint: disable=g-import-not-at-top
  import tasks  # pylint: disable=g-import-not-at-top
  corpus = embedded_corpus.CONFIGS[tasks.EMBEDDED_TASKS[
      "sld_embedded_digits_whisper_compare"].corpus]
  assert corpus.num_test >= 2000 and corpus.num_dev >= 2000
  train_voices = {v.id for v in embedded_corpus.split_voices("train", corpus)}
  for split in ("dev", "test"):
    assert not train_voices & {v.id for v in embedded_corpus.split_voices(split, corpus)}


def test_plan_and_commands():
  plan = plan_lib.build_plan(["sld", "loss_masking"], [0, 3])
  assert [s.run_dir for s in plan] == ["sld/seed0", "sld/seed3", "loss_masking/seed0",
                                       "loss_masking/seed3"]
  recipe = plan_lib.Recipe(("gin_configs/experiments/smoke.gin",),
                           tuple(plan_lib.check_bindings(["TRAIN_STEPS=7"], "--gin")),
                           ("evaluate.max_batches = 1",), patience=2)
  assert recipe.schedule("sld") == (7, 20)   # EVAL_EVERY from smoke.gin
  train = recipe.train_command(plan[1], "/out/x", stop_after_steps=5)
  assert train[1:3] == ["-m", "sld_jax.train"]
  assert train[3:] == [
      "--gin_file=gin_configs/experiments/smoke.gin", "--gin_file=gin_configs/objectives/sld.gin",
      "--gin_bindings=TRAIN_STEPS = 7", '--gin_bindings=MODEL_DIR = "/out/x"',
      "--gin_bindings=SEED = 3", "--gin_bindings=DATA_SEED = 3",
      "--gin_bindings=trainer.train.checkpoint_every = %EVAL_EVERY",
      "--gin_bindings=trainer.train.keep_checkpoints = 4",
      "--gin_bindings=trainer.train.stop_after_steps = 5"]
  evaluate = recipe.eval_command(plan[1], "/out/x", step=40)
  assert evaluate[1:3] == ["-m", "sld_jax.eval"]
  assert evaluate[-4:] == ['--gin_bindings=CHECKPOINT_PATH = "/out/x"',
                           '--gin_bindings=EVAL_OUTPUT_DIR = "/out/x/eval"',
                           "--gin_bindings=evaluate.steps = [40]",
                           "--gin_bindings=evaluate.max_batches = 1"]
  # The fingerprint of a run ignores the segment and the run folder.
  assert plan_lib.fingerprint(recipe.train_command(plan[1], "/a/b"), "/a/b") == \
      plan_lib.fingerprint(recipe.train_command(plan[1], "/c/d"), "/c/d")


def test_gin_values_are_read_with_gin():
  values = gin_values.parse_text(
      "include 'gin_configs/objectives/sld.gin'\nX = 3\nY = %X\n"
      "train_data/input_pipeline.SeqioSource.seed = %Y\nlosses.LossConfig.alpha = 0.5\n")
  assert gin_values.lookup(values, "Y") == 3
  assert gin_values.lookup(values, "losses.LossConfig.alpha") == 0.5        # later wins
  assert gin_values.lookup(values, "losses.LossConfig.method") == "sld"     # included
  assert values["train_data/input_pipeline.SeqioSource.seed"] == gin_values.Macro("Y")
  operative = gin_values.parse_text("LossConfig.kl_target = 'reference'\n")
  assert gin_values.lookup(operative, "losses.LossConfig.kl_target") == "reference"
  with pytest.raises(ValueError, match=r"<gin text>: gin syntax error"):
    gin_values.parse_text("X = = 3\n")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "sld", "nope"], r"unknown method 'nope': there is no "
                                   r"gin_configs/objectives/nope.gin; methods: \['loss_masking'"),
    (["--gin.SEED=3"], r"--gin 'SEED = 3': SEED is set by the comparison; use --seeds"),
    (["--gin.trainer.train.keep_checkpoints=3"], r"keep_checkpoints is set by the comparison"),
    (["--gin_bindings", "decoder_config.dropout_rate"], r"want NAME=VALUE"),
    (["--base_gin", "no/such.gin"], r"gin file 'no/such.gin' not found"),
    (["--seeds", "1", "1"], r"--seeds must be distinct"),
    (["--gin.EVAL_EVERY=0"], r"EVAL_EVERY = 0 in .* a positive integer"),
])
def test_bad_flags_fail_before_anything_runs(tmp_path, argv, message):
  with pytest.raises(SystemExit, match=message):
    comparison.main(["--out", str(tmp_path / "out"), *argv])
  assert not os.path.exists(tmp_path / "out" / comparison.PLAN_FILE)


# ----------------------------------------------------------------------------
# One real comparison, resumed, and its report rebuilt.
# ----------------------------------------------------------------------------

TINY = ["--gin.decoder_config.num_layers=1", "--gin.decoder_config.embed_dim=32",
        "--gin.decoder_config.mlp_dim=64", "--gin.decoder_config.num_heads=4",
        "--gin.WARMUP_STEPS=0", "--gin.EVAL_BATCHES=1", "--gin.DecodingConfig.max_decode_length=8",
        "--gin.trainer.train.log_every=1", "--gin.trainer.train.tensorboard=False"]


def _script(out: str, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, SCRIPT, "--out", out, *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


def test_real_comparison_trains_scores_resumes_and_reports(tmp_path, capsys):
  out = str(tmp_path / "compare")
  env = tiny_train.subprocess_env(1)
  flags = ["--base_gin", "gin_configs/experiments/smoke.gin", "--methods", "multimodal_ce",
           "loss_masking", "--seeds", "1", "--patience", "1", "--gin.TRAIN_STEPS=4",
           "--gin.EVAL_EVERY=2", *TINY]
  # smoke.gin includes objectives/sld.gin: each method's objective must win.
  first = _script(out, env, *flags)
  assert first.returncode == 0, first.stdout + first.stderr[-3000:]
  assert "[1/2] multimodal_ce seed 1" in first.stdout and "[2/2] loss_masking seed 1" in first.stdout

  results = json.load(open(os.path.join(out, "results.json")))
  test_split = f"{SMOKE_TASK}/test"
  data = results["splits"][test_split]
  for method in ("multimodal_ce", "loss_masking"):
    run_dir = os.path.join(out, method, "seed1")
    config = gin_values.operative_values(run_dir)
    assert (config["LossConfig.method"], config["SEED"], config["DATA_SEED"],
            config["SpeechTextLM.time_mask_prob"]) == (method, 1, 1, 0.3)
    # One segment of 4 steps, dev WER at 2 and 4; the better one is scored.
    curve = stopping.dev_curve(run_files.read_jsonl(os.path.join(run_dir,
                                                                 "eval_metrics.jsonl")))
    state = runner.read_state(run_dir)
    assert state["stopped_at"] == 4 and [step for step, _ in curve] == [2, 4]
    assert [r["step"] for r in tiny_train.read_metrics(run_dir)] == [1, 2, 3, 4]
    best = min(curve, key=lambda p: (p[1], p[0]))
    assert (state["status"], state["selected_step"], state["best_dev_wer"]) == (
        "done", best[0], best[1])
    # The report's per-utterance errors are those of predictions.jsonl, and
    # they add up to the WER sld_jax.eval wrote.
    errors = run_files.per_utterance_errors(run_dir, best[0], SMOKE_TASK, "test")
    assert len(errors) == 30 == len(data["ids"])
    assert data["errors"][method]["1"] == [errors[i][0] for i in data["ids"]]
    assert data["word_count"] == [errors[i][1] for i in data["ids"]]
    row = run_files.scored_splits(run_dir, best[0])[(SMOKE_TASK, "test")]
    assert data["methods"][method]["wer"][0] == pytest.approx(row["wer"])
  pair = data["pairs"][0]
  assert (pair["a"], pair["b"]) == ("multimodal_ce", "loss_masking")   # MCE - LM
  words = np.asarray(data["word_count"])
  mce = np.asarray([data["errors"]["multimodal_ce"]["1"]])
  lm = np.asarray([data["errors"]["loss_masking"]["1"]])
  expected = statistics.paired_bootstrap(mce, lm, words, seed=0)
  assert pair["difference"] == pytest.approx(expected.to_json())
  markdown = open(os.path.join(out, "results.md")).read()
  assert pair["conclusion"] in markdown
  assert _table_rows(markdown, "| difference (points)")[0][:3] == [
      "Multimodal CE − Loss Masking", "1",
      f"{expected.estimate:+.2f} [{expected.low:+.2f}, {expected.high:+.2f}]"]
  for name in FIGURES:
    _check_png(os.path.join(out, "results", name))

  # Resumed: nothing is trained or scored again.
  logs = {path: os.path.getmtime(path) for path in (
      os.path.join(out, "loss_masking", "seed1", "train.log"),
      os.path.join(out, "loss_masking", "seed1", "eval.log"))}
  # (In this process, from here on: the script's entry point ran above.)
  handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
  capsys.readouterr()
  try:
    assert comparison.main(["--out", out, *flags]) == 0
  finally:
    for sig, handler in handlers.items():     # main installs its own
      signal.signal(sig, handler)
  second = capsys.readouterr().out
  assert "2 already done, 0 to run" in second and "[1/" not in second
  assert {path: os.path.getmtime(path) for path in logs} == logs

  # Another training command in the same folders is refused before anything
  # runs, and the report is rebuilt elsewhere.
  with pytest.raises(SystemExit, match=r"(?s)was trained with another command.*"
                                       r"was: --gin_bindings=TRAIN_STEPS = 4"):
    comparison.main(["--out", out, *[f if f != "--gin.TRAIN_STEPS=4" else "--gin.TRAIN_STEPS=8"
                                     for f in flags]])
  published = str(tmp_path / "docs")
  assert comparison.main(["--out", out, "--report_only", "--publish", published]) == 0
  assert f"[compare] wrote {published}" in capsys.readouterr().out
  again = json.load(open(os.path.join(published, "results.json")))
  assert again["splits"][test_split]["pairs"] == data["pairs"]
  assert pair["conclusion"] in open(os.path.join(published, "results.md")).read()
  for name in FIGURES:
    _check_png(os.path.join(published, "results", name))


# A trainer and a scorer that write what sld_jax.train and sld_jax.eval write
# (checkpoints/<step>, metrics.jsonl, eval_metrics.jsonl, eval/metrics.jsonl)
# along a known dev curve, resuming from the latest checkpoint as they do.
SCRIPTED_TRAIN = """
import json, os, sys
run_dir, stop_after = sys.argv[1], int(sys.argv[2])
checkpoints = os.path.join(run_dir, "checkpoints")
os.makedirs(checkpoints, exist_ok=True)
start = max([int(name) for name in os.listdir(checkpoints)] or [0])
dev_wer = {2: 50.0, 4: 40.0, 6: 45.0, 8: 30.0, 10: 20.0}
with open(os.path.join(run_dir, "metrics.jsonl"), "a") as metrics, \\
     open(os.path.join(run_dir, "eval_metrics.jsonl"), "a") as evals:
  for step in range(start + 1, start + stop_after + 1):
    metrics.write(json.dumps({"step": step, "step_time": 0.1}) + "\\n")
    if step % 2 == 0:
      evals.write(json.dumps({"step": step, "dev/wer": dev_wer[step]}) + "\\n")
      os.makedirs(os.path.join(checkpoints, str(step)))
print(f"segment {start} -> {start + stop_after}")
"""
SCRIPTED_EVAL = """
import json, os, sys
run_dir, step = sys.argv[1], int(sys.argv[2])
os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
with open(os.path.join(run_dir, "eval", "metrics.jsonl"), "a") as f:
  f.write(json.dumps({"step": step, "task": "t", "split": "test", "wer": 12.5, "cer": 6.0}) + "\\n")
"""


class _ScriptedRecipe:
  """TRAIN_STEPS 10, dev WER every 2 steps, patience 1, scripted children."""
  patience = 1

  def schedule(self, method):
    del method
    return 10, 2

  def train_command(self, spec, run_dir, stop_after_steps=None):
    del spec
    return [sys.executable, "-c", SCRIPTED_TRAIN, run_dir, str(stop_after_steps)]

  def eval_command(self, spec, run_dir, step):
    del spec
    return [sys.executable, "-c", SCRIPTED_EVAL, run_dir, str(step)]


def test_runs_train_in_segments_that_resume_and_stop_on_dev_wer(tmp_path):
  """Dev WER 50, 40, 45, 30, 20 at steps 2-10, patience 1: the first segment
  ends at step 4 (the earliest a run can stop), the second resumes there and
  ends at 6, where the rule stops (no improvement on step 4 for one
  evaluation); step 4 is scored, not the later and better step 8."""
  [spec] = plan_lib.build_plan(["sld"], [0])
  lines = []
  def echo(*parts, **unused):
    lines.append(" ".join(map(str, parts)))
  state = runner.Runner(str(tmp_path), _ScriptedRecipe(), dict(os.environ), echo).run(spec, 1, 1)
  run_dir = str(tmp_path / spec.run_dir)
  assert (state["status"], state["selected_step"], state["best_dev_wer"], state["stopped_at"]) \
      == ("done", 4, 40.0, 6)
  assert "dev WER did not improve for 1 evaluations after step 4" in state["stop_reason"]
  with open(os.path.join(run_dir, "train.log")) as f:
    segments = [line.strip() for line in f if line.startswith("segment ")]
  assert segments == ["segment 0 -> 4", "segment 4 -> 6"]
  assert [r["step"] for r in tiny_train.read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
  assert run_files.scored_splits(run_dir, 4)[("t", "test")]["wer"] == 12.5
  assert any("step 4/10: dev WER 40.00" in line for line in lines), lines
  assert any("step 6/10: dev WER 45.00 (best 40.00 at 4)" in line for line in lines), lines
  # Done, and scored with the command the recipe gives: a rerun skips it.
  assert runner.is_done(str(tmp_path), spec, _ScriptedRecipe())


# ----------------------------------------------------------------------------
# The report on fabricated runs: 3 methods x 5 seeds with known errors.
# ----------------------------------------------------------------------------

TASK = "fake_task"
SEEDS = (0, 1, 2, 3, 4)
UTTERANCES = 300
# Per-utterance error rate of each method: SLD clearly below MCE, MCE = LM.
RATES = {"sld": 0.05, "multimodal_ce": 0.15, "loss_masking": 0.15}


def _write_jsonl(path: str, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def _fabricate(out: str, method: str, seed: int, words: np.ndarray, errors: np.ndarray,
               ids: list[str]) -> None:
  run_dir = os.path.join(out, method, f"seed{seed}")
  step = 100 + 10 * seed
  _write_jsonl(os.path.join(run_dir, "eval", f"step_{step}", TASK, "test", "predictions.jsonl"),
               [{"id": i, "word_errors": int(e), "word_count": int(w)}
                for i, e, w in zip(ids, errors, words)])
  wer = 100.0 * errors.sum() / words.sum()
  _write_jsonl(os.path.join(run_dir, "eval", "metrics.jsonl"), [
      {"step": step, "task": TASK, "split": "test", "wer": wer, "cer": wer / 2}])
  _write_jsonl(os.path.join(run_dir, "eval_metrics.jsonl"),
               [{"step": 50, "dev/wer": 80.0}, {"step": step, "dev/wer": wer}])
  _write_jsonl(os.path.join(run_dir, "metrics.jsonl"),
               [{"step": s, "loss": 1.0, "step_time": 0.5} for s in (50, step)])
  with open(os.path.join(run_dir, "config.gin"), "w") as f:
    f.write(f"SEED = {seed}\nDATA_SEED = {seed}\nTASK = '{TASK}'\nTRAIN_STEPS = 500\n"
            f"LossConfig.method = '{method}'\nLossConfig.kl_target = 'paper'\n"
            "SpeechTextLM.time_mask_prob = 0.3\n")
  runner.write_state(run_dir, {"status": "done", "selected_step": step, "best_dev_wer": wer,
                               "stop_reason": "fabricated", "train_seconds": 10.0,
                               "eval_seconds": 2.0, "patience": 3})


def test_report_intervals_and_conclusions_on_fabricated_runs(tmp_path):
  out = str(tmp_path / "compare")
  rng = np.random.default_rng(0)
  words = rng.integers(2, 8, UTTERANCES)
  ids = [f"test-{i}" for i in range(UTTERANCES)]
  errors = {m: np.stack([rng.binomial(words, rate) for _ in SEEDS]) for m, rate in RATES.items()}
  methods = ["loss_masking", "multimodal_ce", "sld"]   # the report orders them SLD, MCE, LM
  for method in methods:
    for seed in SEEDS:
      _fabricate(out, method, seed, words, errors[method][seed], ids)
  comparison.save_plan(out, plan_lib.build_plan(methods, list(SEEDS)),
                       [{"command": "python -m sld_jax.comparison --x", "time": "then"}])
  assert comparison.main(["--out", out, "--report_only"]) == 0
  results = json.load(open(os.path.join(out, "results.json")))
  markdown = open(os.path.join(out, "results.md")).read()
  data = results["splits"][f"{TASK}/test"]
  assert results["methods"] == ["sld", "multimodal_ce", "loss_masking"]
  assert [(p["a"], p["b"]) for p in data["pairs"]] == [
      ("sld", "multimodal_ce"), ("sld", "loss_masking"), ("multimodal_ce", "loss_masking")]
  # The report orders utterances by id.
  order = [ids.index(i) for i in data["ids"]]
  assert sorted(order) == list(range(UTTERANCES))
  assert data["word_count"] == words[order].tolist()
  verdicts = {}
  for pair in data["pairs"]:
    a, b = errors[pair["a"]][:, order], errors[pair["b"]][:, order]
    assert pair["difference"] == pytest.approx(
        statistics.paired_bootstrap(a, b, words[order], seed=0).to_json())
    assert pair["seed_and_utterance"] == pytest.approx(
        statistics.seed_and_utterance_bootstrap(a, b, words[order], seed=0).to_json())
    sign = statistics.sign_test(a, b, words)
    assert pair["sign_test"]["p_value"] == pytest.approx(sign.p_value)
    per_seed = [100 * (a[s].sum() - b[s].sum()) / words.sum() for s in SEEDS]
    np.testing.assert_allclose(list(pair["per_seed"].values()), per_seed)
    verdicts[(pair["a"], pair["b"])] = pair["verdict"]
    assert f"- {pair['conclusion']}" in markdown
  # SLD's 10-point lower error rate is found; MCE vs LM (same rate) is not.
  assert verdicts[("sld", "multimodal_ce")] == "lower"
  assert verdicts[("multimodal_ce", "loss_masking")] == "no difference"
  sld_vs_mce = data["pairs"][0]
  assert sld_vs_mce["conclusion"].startswith("SLD (paper KL target) has a lower WER than "
                                             "Multimodal CE")
  assert data["pairs"][2]["conclusion"].startswith(
      "No difference between Multimodal CE and Loss Masking is detected")
  rows = _table_rows(markdown, "| method | seeds | pooled WER")
  assert [row[:2] for row in rows] == [["SLD (paper KL target)", "5"], ["Multimodal CE", "5"],
                                       ["Loss Masking", "5"]]
  pooled = 100 * errors["sld"].sum() / (len(SEEDS) * words.sum())
  assert rows[0][2].startswith(f"{pooled:.2f} [")
  for name in FIGURES:
    _check_png(os.path.join(out, "results", name))

  # A run that scored other utterances is an error naming it, never a silent drop.
  short = os.path.join(out, "loss_masking", "seed3", "eval", "step_130", TASK, "test",
                       "predictions.jsonl")
  lines = open(short).readlines()
  with open(short, "w") as f:
    f.writelines(lines[:-1])
  with pytest.raises(ValueError, match=r"loss_masking/seed3 scored other utterances of "
                                       r"fake_task/test than .*: 0 ids only in it.*1 only in"):
    comparison.main(["--out", out, "--report_only"])


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, capsys):
  out = tmp_path / "out"
  assert comparison.main(["--out", str(out), "--dry_run"]) == 0
  printed = capsys.readouterr().out
  for method in plan_lib.DEFAULT_METHODS:
    for seed in range(5):
      assert f"# {method} seed {seed} -> {out}/{method}/seed{seed}:" in printed
  assert "--gin_file=gin_configs/objectives/sld.gin" in printed
  assert "sld_reference" not in printed      # the reference-target variant is opt-in
  assert "'--gin_bindings=trainer.train.stop_after_steps = 400'" in printed  # (3 + 1) x 100
  assert not out.exists()
