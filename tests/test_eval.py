"""Evaluation: eval batches, WER/CER against jiwer under a mesh, bad input, and
the eval CLI end to end on a checkpoint of the smoke experiment."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jiwer
import numpy as np
import pytest

from sld_jax import eval as eval_lib
from sld_jax import eval_data
from sld_jax import evaluation
from sld_jax import partitioning
from sld_jax.lm import SpeechTextLM
from sld_jax.model.config import decoder_config
from sld_jax.vocab import VocabLayout

jax.config.update("jax_default_matmul_precision", "highest")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_GIN = "gin_configs/experiments/smoke.gin"
SMOKE_TASK = "sld_embedded_digits_whisper_smoke"

# ----------------------------------------------------------------------------
# Eval batches.
# ----------------------------------------------------------------------------

DOC = VocabLayout(text_size=14, speech_size=128)   # <speech_end>=14, unit u -> 15 + u


def _features(targets):
  targets = np.asarray(targets, np.int32)
  inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  return {"decoder_target_tokens": targets, "decoder_input_tokens": inputs,
          "decoder_loss_weights": (targets > 0).astype(np.int32)}


def test_prompts_references_and_buckets_of_the_docstring_example():
  batch = _features([[18, 15, 14, 5, 7, 1, 0, 0],
                     [16, 14, 9, 1, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0]])
  batch["speech_length"] = np.array([3, 2, 0], np.int32)
  np.testing.assert_array_equal(eval_data.real_rows(batch), [True, True, False])
  lengths = eval_data.prompt_lengths(batch, DOC)
  np.testing.assert_array_equal(lengths, [4, 3, 2])   # 0 u1 .. uN <speech_end>
  np.testing.assert_array_equal(eval_data.make_prompts(batch, lengths, 5, DOC),
                                [[0, 18, 15, 14, 0], [0, 16, 14, 0, 0], [0, 14, 0, 0, 0]])
  assert eval_data.reference_ids(batch["decoder_target_tokens"][0], 4, DOC) == [5, 7]
  assert eval_data.reference_ids(batch["decoder_target_tokens"][1], 3, DOC) == [9]
  assert [eval_data.prompt_bucket(n, 256) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128,
                                                                              256]
  assert eval_data.prompt_bucket(300, 256) == 256


def test_bad_rows_name_the_utterance():
  batch = _features([[18, 15, 5, 1, 0], [16, 14, 9, 1, 0]])
  batch["id"] = np.array([b"utt-a", b"utt-b"], object)
  with pytest.raises(ValueError, match=r"row 0 \(id 'utt-a'\) has no <speech_end> \(id 14\)"):
    eval_data.prompt_lengths(batch, DOC)
  batch = _features([[16, 14, 9, 1, 0]])
  batch["speech_length"] = np.array([3], np.int32)
  with pytest.raises(ValueError, match="speech_length 3 but its first <speech_end> is at"):
    eval_data.prompt_lengths(batch, DOC)


def test_unpack_rows_gives_one_utterance_per_row():
  packed = _features([[18, 14, 5, 1, 16, 14, 9, 1], [17, 17, 14, 1, 0, 0, 0, 0]])
  packed["decoder_segment_ids"] = np.array([[1, 1, 1, 1, 2, 2, 2, 2],
                                            [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
  batches = eval_data.unpack_rows([packed], rows=2)
  np.testing.assert_array_equal(batches[0]["decoder_target_tokens"],
                                [[18, 14, 5, 1, 0, 0, 0, 0], [16, 14, 9, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batches[0]["decoder_input_tokens"][1],   # as seqio shifts
                                [0, 16, 14, 9, 1, 0, 0, 0])
  np.testing.assert_array_equal(batches[1]["decoder_target_tokens"],
                                [[17, 17, 14, 1, 0, 0, 0, 0], [0] * 8])
  np.testing.assert_array_equal(eval_data.real_rows(batches[1]), [True, False])


# ----------------------------------------------------------------------------
# Scoring under a mesh, against jiwer.
# ----------------------------------------------------------------------------

LAYOUT = VocabLayout(text_size=20, speech_size=50)
MODEL = SpeechTextLM(LAYOUT, decoder=functools.partial(
    decoder_config, size="tiny", num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
    max_length=48, dropout_rate=0.0))
DECODING = evaluation.DecodingConfig(max_decode_length=10)
# Reference texts as the words of `ids_as_words`; one empty, one upper-case.
UTTERANCES = [("u0", [30, 40, 50, 21], "3 5 7"), ("u1", [22, 23], "4"),
              ("u2", [60] * 12, ""), ("u3", [25, 26, 27], "Nine NINE"),
              ("u4", [33], "8 8 8 8")]


def _random_params():
  """Scaled-up random parameters (decisive, varied logits) without compiling the init."""
  shapes = nn.meta.unbox(jax.eval_shape(MODEL.init_params, jax.random.key(0)))
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    if "scale" in jax.tree_util.keystr(path):
      return np.ones(leaf.shape, np.float32)
    if leaf.ndim >= 2:
      return rng.normal(0.0, 0.8, leaf.shape).astype(np.float32)
    return np.zeros(leaf.shape, np.float32)
  params = jax.tree_util.tree_map_with_path(fill, shapes)
  params["token_embedder"]["embedding"][1] = params["token_embedder"]["embedding"][9] * 1.1
  return params


def _batches(rows=4, length=32):
  examples = []
  for utt_id, units, text in UTTERANCES:
    reference = [int(w) for w in text.split() if w.isdigit()]
    targets = [u for u in units] + [LAYOUT.speech_end_id] + reference + [1]
    examples.append((utt_id, np.pad(targets, (0, length - len(targets))), len(units) + 1, text))
  batches = []
  for start in range(0, len(examples), rows):
    chunk = examples[start:start + rows]
    batch = _features([e[1] for e in chunk])
    batch["id"] = np.array([e[0].encode() for e in chunk], object)
    batch["text"] = np.array([e[3].encode() for e in chunk], object)
    batch["speech_length"] = np.array([e[2] for e in chunk], np.int32)
    batches.append(batch)
  return [eval_data.input_pipeline.pad_rows(b, rows) for b in batches]


@pytest.fixture(scope="module")
def sharded_scorer():
  mesh = partitioning.make_mesh(data=4, fsdp=1, model=2)
  return evaluation.Scorer(MODEL, mesh, decoding_config=DECODING)


def _check_against_jiwer(score):
  refs = [p["reference"] for p in score.predictions]
  hyps = [p["hypothesis"] for p in score.predictions]
  assert score.metrics["wer"] == pytest.approx(100 * jiwer.wer(refs, hyps))
  assert score.metrics["cer"] == pytest.approx(100 * jiwer.cer(refs, hyps))
  words = jiwer.process_words(refs, hyps)
  assert (score.metrics["substitutions"], score.metrics["deletions"],
          score.metrics["insertions"]) == (words.substitutions, words.deletions,
                                           words.insertions)
  assert score.metrics["word_errors"] == sum(p["word_errors"] for p in score.predictions)
  assert score.metrics["reference_words"] == sum(p["word_count"] for p in score.predictions)
  for p in score.predictions:
    alone = jiwer.process_words(p["reference"], p["hypothesis"])
    assert p["word_errors"] == alone.substitutions + alone.deletions + alone.insertions


def test_sharded_scoring_matches_jiwer_and_one_device(sharded_scorer):
  params = _random_params()
  batches = _batches()
  score = evaluation.score_batches(sharded_scorer, params, batches, eval_data.ids_as_words,
                                   name="toy", progress=False)
  assert [p["id"] for p in score.predictions] == [u[0] for u in UTTERANCES]  # dummies dropped
  assert score.predictions[3]["reference"] == "nine nine"                   # lower-cased
  assert score.metrics["num_utterances"] == 5
  assert any(p["hypothesis"] for p in score.predictions)
  assert any(p["ended"] for p in score.predictions)
  _check_against_jiwer(score)
  # Both batches fall in prompt bucket 16: one decode and one score compile.
  assert len(sharded_scorer._compiled) == 2  # pylint: disable=protected-access
  for name in ("ce_text", "ce_speech", "ppl_text", "utterances_per_second", "tokens_per_second"):
    assert np.isfinite(score.metrics[name]) and score.metrics[name] > 0
  assert score.metrics["ppl_text"] == pytest.approx(np.exp(score.metrics["ce_text"]))
  text_tokens = sum(p["transcript_tokens"] for p in score.predictions)
  assert text_tokens == score.metrics["num_text_tokens"]
  assert -sum(p["transcript_logprob"] for p in score.predictions) / text_tokens == pytest.approx(
      score.metrics["ce_text"], rel=1e-4)

  one_device = evaluation.Scorer(MODEL, partitioning.make_mesh(devices=jax.devices()[:1]),
                                 decoding_config=DECODING)
  alone = evaluation.score_batches(one_device, params, batches, eval_data.ids_as_words,
                                   progress=False)
  assert [p["hypothesis"] for p in alone.predictions] == [
      p["hypothesis"] for p in score.predictions]
  assert alone.metrics["ce_text"] == pytest.approx(score.metrics["ce_text"], rel=1e-4)


def test_empty_hypotheses_and_reference_like_jiwer(sharded_scorer, tmp_path):
  params = _random_params()
  params["final_norm"]["scale"][:] = 0.0        # all logits 0: <text_end> (lowest text id) first
  score = evaluation.score_batches(sharded_scorer, params, _batches(), eval_data.ids_as_words,
                                   progress=False)
  assert [p["hypothesis"] for p in score.predictions] == [""] * 5
  assert all(p["ended"] and p["hypothesis_tokens"] == 0 for p in score.predictions)
  _check_against_jiwer(score)
  assert score.metrics["deletions"] == score.metrics["reference_words"] == 10
  assert len(sharded_scorer._compiled) == 2  # pylint: disable=protected-access  (reused)

  evaluation.write_split(str(tmp_path), score, {"step": 1})
  lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
  assert [json.loads(line)["id"] for line in lines] == [u[0] for u in UTTERANCES]
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["wer"] == pytest.approx(100.0) and metrics["step"] == 1
  table = evaluation.summary_table([{"task": "t", "split": "s", **metrics}])
  assert table.splitlines()[2].startswith("| 1 | t | s | 5 | 100.00 |")


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def test_missing_or_empty_checkpoint_dirs_raise(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*expected a MODEL_DIR"):
    eval_lib.locate_checkpoints(str(tmp_path / "nope"))
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no checkpoints in .*empty/checkpoints"):
    eval_lib.locate_checkpoints(str(tmp_path / "empty"))
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"no checkpoints in .*junk \(found \['notes.txt'\]"):
    eval_lib.locate_checkpoints(str(tmp_path / "junk"))


def test_unknown_split_and_task_raise():
  with pytest.raises(ValueError, match=r"has no split 'bogus'; its splits are \['train', 'dev', "
                                       r"'test'\]"):
    eval_data.check_split(SMOKE_TASK, "bogus")
  with pytest.raises(ValueError, match="unknown task 'sld_nope'; registered sld tasks"):
    eval_data.check_split("sld_nope", "dev")
  assert eval_data.eval_splits(SMOKE_TASK) == ["dev", "test"]


# ----------------------------------------------------------------------------
# End to end: train the smoke experiment briefly, then `python -m sld_jax.eval`.
# ----------------------------------------------------------------------------

STEPS = 2
EVAL_FLAGS = ["--gin.DecodingConfig.max_decode_length=12"]


def _run(module, *flags):
  process = subprocess.run([sys.executable, "-m", module, f"--gin_file={SMOKE_GIN}", *flags],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-4000:]
  return process


@pytest.fixture(scope="module")
def smoke_model_dir(tmp_path_factory):
  """A 2-step smoke run whose periodic dev evaluation is the DecodingEvaluator."""
  model_dir = str(tmp_path_factory.mktemp("smoke_run"))
  _run("sld_jax.train", f'--gin.MODEL_DIR="{model_dir}"', f"--gin.TRAIN_STEPS={STEPS}",
       "--gin.WARMUP_STEPS=0", "--gin.trainer.train.tensorboard=False",
       "--gin_bindings=import sld_jax.evaluation",
       "--gin.trainer.train.evaluators=[@evaluation.DecodingEvaluator]",
       "--gin.evaluation.DecodingEvaluator.data=@dev_data/input_pipeline.SeqioSource()",
       "--gin.evaluation.DecodingEvaluator.max_batches=1", *EVAL_FLAGS)
  return model_dir


def test_eval_cli_end_to_end(smoke_model_dir, tmp_path, monkeypatch):
  out = str(tmp_path / "eval")
  process = _run("sld_jax.eval", f'--gin.CHECKPOINT_PATH="{smoke_model_dir}"',
                 f'--gin.EVAL_OUTPUT_DIR="{out}"', "--gin.evaluate.max_batches=1", *EVAL_FLAGS)
  assert "| step | task | split |" in process.stdout
  for split in ("dev", "test"):
    directory = os.path.join(out, f"step_{STEPS}", SMOKE_TASK, split)
    with open(os.path.join(directory, "metrics.json")) as f:
      metrics = json.load(f)
    with open(os.path.join(directory, "predictions.jsonl")) as f:
      predictions = [json.loads(line) for line in f]
    assert metrics["num_utterances"] == len(predictions) == 8     # one batch of BATCH_SIZE
    assert {"id", "reference", "hypothesis", "word_errors", "word_count"} <= set(predictions[0])
    refs = [p["reference"] for p in predictions]
    hyps = [p["hypothesis"] for p in predictions]
    assert metrics["wer"] == pytest.approx(100 * jiwer.wer(refs, hyps))
    assert metrics["cer"] == pytest.approx(100 * jiwer.cer(refs, hyps))
    for key in ("substitutions", "deletions", "insertions", "ce_text", "ce_speech", "ppl_text",
                "utterances_per_second", "tokens_per_second"):
      assert key in metrics
    assert metrics["step"] == STEPS and metrics["method"] == "greedy"
  with open(os.path.join(smoke_model_dir, "eval_metrics.jsonl")) as f:
    during_training = json.loads(f.readlines()[-1])
  dev, test = (json.load(open(os.path.join(out, f"step_{STEPS}", SMOKE_TASK, split,
                                           "metrics.json"))) for split in ("dev", "test"))
  # Training's dev evaluation ran the same code on the same batch.
  assert during_training["step"] == STEPS
  assert during_training["dev/wer"] == pytest.approx(dev["wer"])
  assert during_training["dev/ce_text"] == pytest.approx(dev["ce_text"], rel=1e-5)

  # Scored splits are skipped on a second run (no checkpoint is read).
  def no_restore(*args, **kwargs):
    raise AssertionError("a scored step was restored again")
  monkeypatch.setattr(eval_lib, "restore_params", no_restore)
  model = functools.partial(SpeechTextLM, decoder=functools.partial(
      decoder_config, size="tiny", num_layers=2, embed_dim=128, mlp_dim=512, max_length=256))
  rows = eval_lib.evaluate(smoke_model_dir, out, task_names=[SMOKE_TASK], batch_size=8,
                           sequence_length=256, max_batches=1, model=model,
                           decoding_config=evaluation.DecodingConfig(max_decode_length=12),
                           progress=False)
  assert [(r["split"], r["wer"]) for r in rows] == [("dev", dev["wer"]), ("test", test["wer"])]


def test_checkpoint_of_another_model_or_vocabulary_raises(smoke_model_dir):
  location = eval_lib.locate_checkpoints(os.path.join(smoke_model_dir, "checkpoints",
                                                      str(STEPS)))
  assert location.step == STEPS
  mesh = partitioning.make_mesh()
  smoke_layout = VocabLayout(text_size=14, speech_size=128)
  other = SpeechTextLM(smoke_layout, decoder=functools.partial(
      decoder_config, size="tiny", num_layers=3, embed_dim=64, mlp_dim=512, max_length=256))
  abstract, _ = evaluation.abstract_params(other, mesh, partitioning.DEFAULT_LOGICAL_AXIS_RULES)
  with pytest.raises(ValueError, match=r"does not fit the configured model[\s\S]*"
                                       r"layers_2/\S+: in the model, not in the checkpoint"
                                       r"[\s\S]*token_embedder/embedding: checkpoint "
                                       r"\[256, 128\], model \[256, 64\]"):
    eval_lib.restore_params(location, STEPS, abstract, smoke_layout, "tiny x3", [SMOKE_TASK])

  same_shapes = SpeechTextLM(VocabLayout(text_size=20, speech_size=128), decoder=functools.partial(
      decoder_config, size="tiny", num_layers=2, embed_dim=128, mlp_dim=512, max_length=256))
  abstract, _ = evaluation.abstract_params(same_shapes, mesh,
                                           partitioning.DEFAULT_LOGICAL_AXIS_RULES)
  with pytest.raises(ValueError, match="was trained on .*sld_embedded_digits_whisper_smoke.*"
                                       "wrong vocabulary"):
    eval_lib.restore_params(location, STEPS, abstract, same_shapes.layout, "", ["other_task"])
