"""scripts/compare_objectives.py: the plan, one real comparison end to end,
and the statistics and report on fabricated run folders.

The real run trains and scores the smoke experiment (shrunk to a 1-layer,
32-wide model and 3 steps) through the script's subprocesses, with a sweep
point that fails; then a second invocation skips the finished run and
``--report_only`` rebuilds the report. The 2 methods x 2 seeds statistics,
the sweep table and the plots are checked on fabricated run folders with
known values, since four real runs would take minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest

import tiny_train

REPO = tiny_train.REPO_ROOT
SCRIPT = os.path.join(REPO, "scripts", "compare_objectives.py")
SMOKE_TASK = "sld_embedded_digits_whisper_smoke"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_script():
  spec = importlib.util.spec_from_file_location("compare_objectives", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["compare_objectives"] = module
  spec.loader.exec_module(module)
  return module


compare = _load_script()


def _check_png(path: str) -> None:
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE, path
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert image.std() > 0.01   # not a blank canvas


def _table_rows(markdown: str, header_start: str) -> list[list[str]]:
  """The cells of the markdown table whose header starts with ``header_start``."""
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip("|").split("|")])
  return rows


# ----------------------------------------------------------------------------
# The plan and the commands.
# ----------------------------------------------------------------------------


def test_plan_seeds_objective_order_and_sweep_defaults():
  plan = compare.build_plan(
      ["loss_masking", "sld"], [0, 1],
      [compare.parse_sweep("alpha=0.004,0.008"), compare.parse_sweep("temperature=1,2")],
      sweep_seeds=[1, 3])
  folders = list(dict.fromkeys(spec.run_dir for spec in plan))
  assert folders == ["loss_masking/seed0", "loss_masking/seed1", "sld/seed0", "sld/seed1",
                     "sweeps/sld_alpha_0.004/seed1", "sweeps/sld_alpha_0.004/seed3", "sld/seed3",
                     "sweeps/sld_temperature_2/seed1", "sweeps/sld_temperature_2/seed3"]
  # The defaults (alpha 0.008, T 1 from objectives/sld.gin) are the sld runs themselves.
  defaults = [(s.sweep_param, s.sweep_value, s.run_dir) for s in plan
              if s.group == "sweep" and not s.overrides]
  assert defaults == [("alpha", 0.008, "sld/seed1"), ("alpha", 0.008, "sld/seed3"),
                      ("temperature", 1.0, "sld/seed1"), ("temperature", 1.0, "sld/seed3")]

  recipe = compare.Recipe(("gin_configs/experiments/smoke.gin",), ("TRAIN_STEPS=7",),
                          ("decoder_config.dropout_rate=0.0",), ("evaluate.max_batches=1",))
  spec = next(s for s in plan if s.run_dir == "sweeps/sld_alpha_0.004/seed3")
  train = recipe.train_command(spec, "/out/x")
  assert train[1:3] == ["-m", "sld_jax.train"]
  assert train[3:] == [
      "--gin_file=gin_configs/experiments/smoke.gin", "--gin_file=gin_configs/objectives/sld.gin",
      "--gin.TRAIN_STEPS=7", "--gin.decoder_config.dropout_rate=0.0",
      "--gin.losses.LossConfig.alpha=0.004", '--gin.MODEL_DIR="/out/x"', "--gin.SEED=3",
      "--gin.DATA_SEED=3"]
  evaluate = recipe.eval_command(spec, "/out/x")
  assert evaluate[1:3] == ["-m", "sld_jax.eval"]
  assert evaluate[-3:] == ['--gin.CHECKPOINT_PATH="/out/x"', '--gin.EVAL_OUTPUT_DIR="/out/x/eval"',
                           "--gin.evaluate.max_batches=1"]
  fixed = dataclasses.replace(recipe, fixed_data_seed=5).train_command(spec, "/out/x")
  assert fixed[-2:] == ["--gin.SEED=3", "--gin.DATA_SEED=5"]

  # A --gin value of the objective moves the sweep's default.
  moved = compare.build_plan([], [], [compare.parse_sweep("alpha=0.008,0.5")],
                             bindings=["losses.LossConfig.alpha=0.5"])
  assert [(s.sweep_value, s.run_dir) for s in moved] == [
      (0.008, "sweeps/sld_alpha_0.008/seed0"), (0.5, "sld/seed0")]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "sld", "nope"], r"unknown method 'nope': there is no "
                                   r"gin_configs/objectives/nope.gin; methods: \['loss_masking'"),
    (["--sweep", "beta=1,2"], r"--sweep 'beta=1,2': want PARAM=V1,V2"),
    (["--sweep", "alpha=0.1,x"], r"'x' is not a number"),
    (["--sweep", "alpha=1", "--sweep_method", "loss_masking"],
     r"does not set losses.LossConfig.alpha; sweep an SLD method"),
    (["--gin.SEED=3"], r"--gin 'SEED=3': SEED is set by the script; use --seeds"),
    (["--gin", "TRAIN_STEPS=3"], r"TRAIN_STEPS is set by the script; use --steps"),
    (["--gin", "decoder_config.dropout_rate"], r"want NAME=VALUE"),
    (["--base_gin", "no/such.gin"], r"gin file 'no/such.gin' not found"),
    (["--seeds", "1", "1"], r"a seed is given twice"),
])
def test_bad_flags_fail_before_anything_runs(tmp_path, argv, message):
  with pytest.raises(SystemExit, match=message):
    compare.main(["--out", str(tmp_path / "out"), *argv])
  assert not os.path.exists(tmp_path / "out" / compare.PLAN_FILE)


# ----------------------------------------------------------------------------
# One real comparison, resumed, and its report rebuilt.
# ----------------------------------------------------------------------------

TINY = ["--gin.decoder_config.num_layers=1", "--gin.decoder_config.embed_dim=32",
        "--gin.decoder_config.mlp_dim=64", "--gin.decoder_config.num_heads=4",
        "--warmup_steps", "0", "--gin.EVAL_BATCHES=1", "--gin.DecodingConfig.max_decode_length=8",
        "--gin.trainer.train.log_every=1", "--gin.trainer.train.tensorboard=False",
        "--eval_gin.evaluate.max_batches=1"]


def _script(out: str, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, SCRIPT, "--out", out, *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


def test_real_comparison_resumes_and_reports(tmp_path):
  out = str(tmp_path / "compare")
  env = tiny_train.subprocess_env(1, str(tmp_path / "jax_cache"))
  base = ["--base_gin", "gin_configs/experiments/smoke.gin", "--methods", "loss_masking",
          "--seeds", "1", "--steps", "3", "--eval_every", "2", *TINY]
  # smoke.gin includes objectives/sld.gin: the method's objective must win.
  # epsilon=5 is refused by LossConfig: that run fails, the other goes on.
  first = _script(out, env, *base, "--sweep", "epsilon=5", "--sweep_method", "sld",
                  "--sweep_seeds", "1")
  assert first.returncode == 1, first.stdout + first.stderr[-3000:]
  failed_log = os.path.join(out, "sweeps", "sld_epsilon_5", "seed1", "train.log")
  assert "[1/2] loss_masking seed 1" in first.stdout
  assert re.search(r"train: step 3/3 \(100%\) loss [\d.]+ \|.*\| all ETA", first.stdout)
  assert "[2/2] sld epsilon=5 seed 1" in first.stdout
  assert f"FAILED in training (exit 1); log: {failed_log}" in first.stdout
  assert "epsilon must be in [0, 1], got 5.0" in open(failed_log).read()
  assert "1 run(s) failed" in first.stdout

  run_dir = os.path.join(out, "loss_masking", "seed1")
  config = compare.operative_config(run_dir)
  assert (config["LossConfig.method"], config["SEED"], config["DATA_SEED"],
          config["TRAIN_STEPS"]) == ("loss_masking", 1, 1, 3)
  train_rows = tiny_train.read_metrics(run_dir)
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  assert train_rows[-1]["loss"] == pytest.approx(train_rows[-1]["ce_text"])   # text CE only
  eval_rows = {r["split"]: r for r in tiny_train.read_metrics(run_dir, "eval/metrics.jsonl")}
  assert sorted(eval_rows) == ["dev", "test"] and eval_rows["dev"]["step"] == 3
  assert eval_rows["dev"]["num_utterances"] == 8     # --eval_gin: one batch of BATCH_SIZE

  results = json.load(open(os.path.join(out, "results.json")))
  method = results["tasks"][SMOKE_TASK]["methods"]["loss_masking"]
  for split in ("dev", "test"):
    for metric in ("wer", "cer"):
      summary = method["metrics"][split][metric]
      assert summary["n"] == 1 and summary["values"] == [eval_rows[split][metric]]
      assert summary["mean"] == pytest.approx(eval_rows[split][metric])
  assert [s for s, _, _ in next(r for r in results["runs"] if r["run_dir"] ==
                                "loss_masking/seed1")["dev_wer_during_training"]] == [2, 3]
  markdown = open(os.path.join(out, "results.md")).read()
  rows = _table_rows(markdown, "| method | seeds |")
  assert rows == [["loss_masking", "1", f"{eval_rows['dev']['wer']:.2f}",
                   f"{eval_rows['test']['wer']:.2f}", f"{eval_rows['dev']['cer']:.2f}",
                   f"{eval_rows['test']['cer']:.2f}"]]
  assert "--sweep epsilon=5" in markdown   # the command line
  assert f"failed in training; log: `{failed_log}`" in markdown
  for name in ("training_curves.png", "wer_per_method.png"):
    _check_png(os.path.join(out, name))

  # Resumed without the failing sweep: nothing is trained or scored again.
  logs = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in ("train.log",
                                                                           "eval.log")}
  second = _script(out, env, *base)
  assert second.returncode == 0, second.stdout + second.stderr[-3000:]
  assert "1 already done, 0 to run" in second.stdout and "[1/" not in second.stdout
  assert {name: os.path.getmtime(os.path.join(run_dir, name)) for name in logs} == logs

  # Another budget in the same folder is refused before anything runs.
  other = _script(out, env, *[f if f != "3" else "4" for f in base])
  assert other.returncode != 0
  assert "was trained with another command" in other.stderr
  assert "was: --gin.TRAIN_STEPS=3" in other.stderr

  os.remove(os.path.join(out, "results.md"))
  os.remove(os.path.join(out, "wer_per_method.png"))
  rebuilt = _script(out, env, "--report_only")
  assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
  assert _table_rows(open(os.path.join(out, "results.md")).read(), "| method | seeds |") == rows
  _check_png(os.path.join(out, "wer_per_method.png"))


# ----------------------------------------------------------------------------
# Statistics and report on fabricated runs (2 methods x 2 seeds, a sweep).
# ----------------------------------------------------------------------------

TASK = "fake_task"
# (method folder, seed) -> split -> (wer, cer) at the final step 20.
FINAL = {
    ("loss_masking/seed0", 0): {"dev": (20.0, 10.0), "test": (24.0, 12.0)},
    ("loss_masking/seed1", 1): {"dev": (22.0, 11.0), "test": (27.0, 13.5)},
    ("sld/seed0", 0): {"dev": (15.0, 7.0), "test": (18.0, 9.0)},
    ("sld/seed1", 1): {"dev": (16.5, 8.0), "test": (17.0, 8.5)},
    ("sweeps/sld_alpha_0.016/seed0", 0): {"dev": (14.0, 6.5), "test": (16.0, 7.5)},
}


def _write_jsonl(path: str, rows) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def _fabricate_run(out: str, run_dir: str, seed: int, method: str, splits) -> None:
  path = os.path.join(out, run_dir)
  rows = []
  for split, (wer, cer) in splits.items():
    # An older step and a first scoring that a rescoring replaced: both ignored.
    rows.append({"step": 10, "task": TASK, "split": split, "wer": 99.0, "cer": 99.0,
                 "num_utterances": 50})
    rows.append({"step": 20, "task": TASK, "split": split, "wer": 98.0, "cer": 98.0,
                 "num_utterances": 50})
  rows += [{"step": 20, "task": TASK, "split": split, "wer": wer, "cer": cer,
            "num_utterances": 50} for split, (wer, cer) in splits.items()]
  _write_jsonl(os.path.join(path, "eval", "metrics.jsonl"), rows)
  _write_jsonl(os.path.join(path, "metrics.jsonl"), [
      {"step": step, "loss": 5.0 - step / 10 + seed, "ce_text": 3.0 - step / 20,
       "ce_speech": 2.0, "kl_speech": 1.0 + seed, "step_time": 1.5} for step in (5, 10, 15, 20)])
  _write_jsonl(os.path.join(path, "eval_metrics.jsonl"), [
      {"step": 10, "dev/wer": 40.0 + seed, "dev/loss": 2.0},
      {"step": 20, "dev/wer": splits["dev"][0] + 1, "dev/loss": 1.5}])
  with open(os.path.join(path, "config.gin"), "w") as f:
    f.write(f"BATCH_SIZE = 16\nDATA_SEED = {seed}\nLEARNING_RATE = 0.001\nSEED = {seed}\n"
            f"SEQUENCE_LENGTH = 256\nTASK = '{TASK}'\nTRAIN_STEPS = 20\nWARMUP_STEPS = 2\n"
            f"# Parameters for LossConfig:\nLossConfig.alpha = 0.008\n"
            f"LossConfig.method = '{method}'\n")
  compare.write_state(path, {"status": "done", "train_done": True, "train_seconds": 30.0,
                             "eval_seconds": 5.0})


def test_statistics_tables_and_plots_from_run_folders(tmp_path):
  out = str(tmp_path / "compare")
  plan = compare.build_plan(["loss_masking", "sld"], [0, 1],
                            [compare.parse_sweep("alpha=0.008,0.016,0.032")], sweep_seeds=[0])
  for (run_dir, seed), splits in FINAL.items():
    _fabricate_run(out, run_dir, seed, run_dir.split("/")[0].split("_alpha")[0], splits)
  # The alpha=0.032 point failed in training.
  compare.write_state(os.path.join(out, "sweeps", "sld_alpha_0.032", "seed0"), {
      "status": "failed", "failed_stage": "training", "log": "/somewhere/train.log"})
  compare.save_plan(out, plan, [{"command": "python scripts/compare_objectives.py --x",
                                 "time": "then"}])
  assert compare.main(["--out", out, "--report_only"]) == 0
  results = json.load(open(os.path.join(out, "results.json")))
  markdown = open(os.path.join(out, "results.md")).read()

  # Means and spreads are those of the per-seed values read from each run.
  rows = _table_rows(markdown, "| method | seeds |")
  assert [row[:2] for row in rows] == [["loss_masking", "2"], ["sld", "2"]]
  for row, method in zip(rows, ("loss_masking", "sld")):
    for column, (split, index) in enumerate([("dev", 0), ("test", 0), ("dev", 1), ("test", 1)]):
      values = [FINAL[key][split][index] for key in FINAL if key[0].startswith(f"{method}/")]
      summary = results["tasks"][TASK]["methods"][method]["metrics"][split][
          ("wer", "cer")[index]]
      assert summary["values"] == values
      assert summary["mean"] == pytest.approx(np.mean(values))
      assert summary["std"] == pytest.approx(statistics.stdev(values))
      assert row[2 + column] == (f"{np.mean(values):.2f} ± {statistics.stdev(values):.2f} "
                                 f"({min(values):.2f}–{max(values):.2f})")
  per_seed = _table_rows(markdown, "| method | seed |")
  assert [r[:3] for r in per_seed] == [["loss_masking", "0", "20.00"],
                                       ["loss_masking", "1", "22.00"],
                                       ["sld", "0", "15.00"], ["sld", "1", "16.50"]]
  assert per_seed[0][6:8] == ["3.0000", "10: 40.0, 20: 21.0"]   # final loss, in-training WER
  assert "step 20; utterances scored: dev 50, test 50" in markdown

  # Sweep: alpha 0.008 is the sld run of seed 0, 0.032 has no finished run.
  sweep = _table_rows(markdown, "| alpha | seeds |")
  assert sweep == [["0.008 (default)", "1", "15.00", "18.00", "7.00", "9.00"],
                   ["0.016", "1", "14.00", "16.00", "6.50", "7.50"],
                   ["0.032", "0", "–", "–", "–", "–"]]
  assert ("`sweeps/sld_alpha_0.032/seed0` (sld alpha=0.032, seed 0): failed in training; "
          "log: `/somewhere/train.log`") in markdown

  # Training curves: mean and min-max over seeds at the common steps.
  loss = results["curves"]["loss_masking"]["loss"]
  assert loss["steps"] == [5, 10, 15, 20] and loss["n"] == 2
  np.testing.assert_allclose(loss["mean"], [5.0, 4.5, 4.0, 3.5])
  np.testing.assert_allclose(loss["max"], [5.5, 5.0, 4.5, 4.0])
  assert results["same_budget"] and results["budgets"][0]["TRAIN_STEPS"] == 20
  assert "python scripts/compare_objectives.py --x" in markdown
  for name in ("training_curves.png", "wer_per_method.png", "sweeps.png"):
    _check_png(os.path.join(out, name))


def test_bad_metrics_lines_name_the_file(tmp_path):
  _write_jsonl(str(tmp_path / "run" / "eval" / "metrics.jsonl"), [{"step": 1, "split": "dev",
                                                                    "wer": 1.0}])
  with pytest.raises(ValueError, match=r"eval/metrics.jsonl:1: no 'cer' field"):
    compare.final_eval_rows(str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl", "w") as f:
    f.write('{"step": 1}\n{"step": 2,\n')
  with pytest.raises(ValueError, match=r"run/metrics.jsonl:2: not a JSON line"):
    compare.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
