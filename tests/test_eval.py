"""The eval command (sld_jax.eval) end to end on a checkpoint of the smoke
experiment, and checkpoints of another model or vocabulary refused."""

from __future__ import annotations

import functools
import json
import os

import jax
import jiwer
import pytest

import tiny_train

from sld_jax import eval as eval_lib
from sld_jax import partitioning
from sld_jax import scoring
from sld_jax import trained_run
from sld_jax.lm import SpeechTextLM
from sld_jax.model.config import decoder_config
from sld_jax.vocab import VocabLayout

# Its module fixtures are built once: all of it on one xdist worker (scripts/test.sh).
pytestmark = pytest.mark.xdist_group("eval")

jax.config.update("jax_default_matmul_precision", "highest")
SMOKE_TASK = "sld_embedded_digits_whisper_smoke"

# ----------------------------------------------------------------------------
# End to end: train the smoke experiment briefly, then `python -m sld_jax.eval`.
# ----------------------------------------------------------------------------

STEPS = 2
EVAL_FLAGS = ["--gin.DecodingConfig.max_decode_length=12"]


_run = tiny_train.run_smoke


@pytest.fixture(scope="module")
def smoke_model_dir(tmp_path_factory):
  """A 2-step smoke run whose periodic dev evaluation is the DecodingEvaluator."""
  model_dir = str(tmp_path_factory.mktemp("smoke_run"))
  _run("sld_jax.train", f'--gin.MODEL_DIR="{model_dir}"', f"--gin.TRAIN_STEPS={STEPS}",
       "--gin.WARMUP_STEPS=0", "--gin.trainer.train.tensorboard=False",
       "--gin_bindings=import sld_jax.evaluators",
       "--gin.trainer.train.evaluators=[@evaluators.DecodingEvaluator]",
       "--gin.evaluators.DecodingEvaluator.data=@dev_data/input_pipeline.SeqioSource()",
       "--gin.evaluators.DecodingEvaluator.max_batches=1", *EVAL_FLAGS)
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
  monkeypatch.setattr(trained_run, "restore_params", no_restore)
  model = functools.partial(SpeechTextLM, decoder=functools.partial(
      decoder_config, size="tiny", num_layers=2, embed_dim=128, mlp_dim=512, max_length=256))
  rows = eval_lib.evaluate(smoke_model_dir, out, task_names=[SMOKE_TASK], batch_size=8,
                           sequence_length=256, max_batches=1, model=model,
                           decoding_config=scoring.DecodingConfig(max_decode_length=12),
                           progress=False)
  assert [(r["split"], r["wer"]) for r in rows] == [("dev", dev["wer"]), ("test", test["wer"])]


def test_checkpoint_of_another_model_or_vocabulary_raises(smoke_model_dir):
  location = trained_run.locate_checkpoints(os.path.join(smoke_model_dir, "checkpoints",
                                                      str(STEPS)))
  assert location.step == STEPS
  mesh = partitioning.make_mesh()
  smoke_layout = VocabLayout(text_size=14, speech_size=128)
  other = SpeechTextLM(smoke_layout, decoder=functools.partial(
      decoder_config, size="tiny", num_layers=3, embed_dim=64, mlp_dim=512, max_length=256))
  abstract, _ = partitioning.abstract_state(other.init_params, jax.random.key(0), mesh=mesh)
  with pytest.raises(ValueError, match=r"does not fit the configured model[\s\S]*"
                                       r"layers_2/\S+: in the model, not in the checkpoint"
                                       r"[\s\S]*token_embedder/embedding: checkpoint "
                                       r"\[256, 128\], model \[256, 64\]"):
    trained_run.restore_params(location, STEPS, abstract, smoke_layout, "tiny x3", [SMOKE_TASK])

  same_shapes = SpeechTextLM(VocabLayout(text_size=20, speech_size=128), decoder=functools.partial(
      decoder_config, size="tiny", num_layers=2, embed_dim=128, mlp_dim=512, max_length=256))
  abstract, _ = partitioning.abstract_state(same_shapes.init_params, jax.random.key(0), mesh=mesh)
  with pytest.raises(ValueError, match="was trained on .*sld_embedded_digits_whisper_smoke.*"
                                       "wrong vocabulary"):
    trained_run.restore_params(location, STEPS, abstract, same_shapes.layout, "", ["other_task"])
