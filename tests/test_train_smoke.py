"""The smoke experiment trains with one command; seqio batches follow the step.

``python -m sld_jax.train --gin_file=gin_configs/experiments/smoke.gin
--gin.MODEL_DIR=...`` builds the embedded digits smoke corpus on first use
(under ``$SLD_DATA_DIR``; a fresh directory for the test unless the
environment sets one), trains the tiny model and writes metrics, TensorBoard
events, checkpoints and the operative config. TRAIN_STEPS is lowered to 12
to keep the suite short; the loss must still fall clearly. The run's console
is the quiet one a user sees (their shell has no TF_CPP_MIN_LOG_LEVEL):
progress, the paths written and our "dropped N" lines, none of the libraries'
start-up lines (``--verbose`` is test_console.py's). (A missing MODEL_DIR
failing loudly is tested in test_gin_configs.py.)
"""

from __future__ import annotations

import glob
import os
import re
import sys

import numpy as np

import tiny_train

STEPS = 12
METRICS = ("step", "loss", "ce_text", "ce_speech", "kl_speech", "accuracy_text",
           "accuracy_speech", "learning_rate", "grad_norm", "tokens_per_second", "step_time")


def _run_smoke_command(data_dir: str, model_dir: str) -> str:
  env = tiny_train.subprocess_env(1)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)    # what a user's shell has
  env["SLD_DATA_DIR"] = data_dir
  command = [sys.executable, "-m", "sld_jax.train",
             "--gin_file=gin_configs/experiments/smoke.gin", f'--gin.MODEL_DIR="{model_dir}"',
             f"--gin.TRAIN_STEPS={STEPS}", "--gin.EVAL_EVERY=6"]
  return tiny_train.run(command, env, timeout=900).stderr


def test_smoke_experiment_trains_and_its_data_follows_the_step(tmp_path, monkeypatch):
  # One test, so that the corpus is built once even when tests are spread
  # over pytest-xdist workers.
  data_dir = os.environ.get("SLD_DATA_DIR") or str(tmp_path / "sld_data")
  model_dir = str(tmp_path / "run")
  log = _run_smoke_command(data_dir, model_dir)
  _check_training_outputs(model_dir, log)
  monkeypatch.setenv("SLD_DATA_DIR", data_dir)
  _check_seqio_batches_follow_the_step()


def _check_training_outputs(model_dir: str, log: str) -> None:
  lines = tiny_train.read_metrics(model_dir)
  assert [line["step"] for line in lines] == [5, 10, 12]
  for key in METRICS:
    assert key in lines[-1], key
  assert all(line["tokens_per_second"] > 0 and line["step_time"] > 0 for line in lines)
  losses = [line["loss"] for line in lines]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.3, losses
  assert lines[-1]["learning_rate"] < lines[0]["learning_rate"]   # linear decay after warmup

  evaluations = tiny_train.read_metrics(model_dir, "eval_metrics.jsonl")
  assert [line["step"] for line in evaluations] == [6, 12]
  assert evaluations[-1]["dev/loss"] < evaluations[0]["dev/loss"]
  assert [line["dev/num_utterances"] for line in evaluations] == [16, 16]  # 2 batches of 8
  # A known run (CPU, seed 0): dev WER 100.0 at step 6, 97.6 at step 12; twelve
  # steps teach the model the format and at most a few words. Over 100 means
  # insertions (decoding past <text_end>), far below means it saw the labels.
  assert [line["dev/wer"] for line in evaluations] == sorted(
      (line["dev/wer"] for line in evaluations), reverse=True)
  assert 90.0 <= evaluations[-1]["dev/wer"] <= 100.0, evaluations
  assert 90.0 <= evaluations[-1]["dev/cer"] <= 100.0, evaluations

  assert os.listdir(os.path.join(model_dir, "checkpoints")) == [str(STEPS)]
  assert glob.glob(os.path.join(model_dir, "tensorboard", "train", "events.out.tfevents.*"))
  assert glob.glob(os.path.join(model_dir, "tensorboard", "eval", "events.out.tfevents.*"))
  config = open(os.path.join(model_dir, "config.gin")).read()
  assert "sld_embedded_digits_whisper_smoke" in config
  assert "decoder_config.num_layers = 2" in config
  assert re.search(r"step 12/12 \(100%\) loss [\d.]+ .*\| ETA 0:00:00", log), log[-3000:]
  for noise in ("cuInit", "normalizer.cc", "absl::InitializeLog", "dataset_providers.py",
                "Generating train examples"):
    assert noise not in log, (noise, log[-4000:])
  assert "Wrote the operative gin config to" in log
  assert re.search(r"truncated the speech of \d+ of \d+ examples .* dropped \d+", log)


def _check_seqio_batches_follow_the_step() -> None:
  from sld_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  source = input_pipeline.SeqioSource("sld_embedded_digits_whisper_smoke", "train",
                                      global_batch_size=4, sequence_length=256, seed=3)
  assert source.layout.speech_size == 128
  first = [batch for _, batch in zip(range(4), source.batches(0))]
  resumed = next(source.batches(3))
  # Step 0 is the dataset's first batch: an independent anchor, since an
  # off-by-one in batches() would shift the resumed and the first run alike.
  dataset_first = next(source._dataset(0, 1, pack=source.pack, shuffle=source.shuffle,  # pylint: disable=protected-access
                                       num_epochs=None).as_numpy_iterator())
  for name in input_pipeline.FEATURES:
    np.testing.assert_array_equal(resumed[name], first[3][name])
    np.testing.assert_array_equal(first[0][name], dataset_first[name])
    assert first[0][name].shape == (4, 256)
  assert not np.array_equal(first[0]["decoder_target_tokens"], first[1]["decoder_target_tokens"])

  # Two processes each read half the rows, from their own shard.
  halves = [next(source.batches(0, index, 2)) for index in range(2)]
  assert all(h["decoder_target_tokens"].shape == (2, 256) for h in halves)
  assert not np.array_equal(halves[0]["decoder_target_tokens"], halves[1]["decoder_target_tokens"])

  dev = input_pipeline.SeqioSource("sld_embedded_digits_whisper_smoke", "dev",
                                   global_batch_size=8, sequence_length=256, pack=False,
                                   shuffle=False)
  batches = dev.eval_batches()
  assert sorted(batches[0]) == ["decoder_input_tokens", "decoder_loss_weights",
                                "decoder_target_tokens"]
  # 30 dev utterances: 4 batches of 8 rows, the last padded with 2 empty rows.
  assert len(batches) == 4
  rows_with_tokens = sum(int(np.any(b["decoder_loss_weights"], axis=1).sum()) for b in batches)
  assert rows_with_tokens == 30
