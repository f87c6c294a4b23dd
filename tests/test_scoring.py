"""Scoring (sld_jax.scoring): WER/CER against jiwer under a mesh and on one
device, empty hypotheses and references, the per-split files and table."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jiwer
import numpy as np
import pytest

from sld_jax import eval_batches
from sld_jax import input_pipeline
from sld_jax import partitioning
from sld_jax import scoring
from sld_jax.lm import SpeechTextLM
from sld_jax.model.config import decoder_config
from sld_jax.vocab import VocabLayout

jax.config.update("jax_default_matmul_precision", "highest")


def _features(targets):
  targets = np.asarray(targets, np.int32)
  inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  return {"decoder_target_tokens": targets, "decoder_input_tokens": inputs,
          "decoder_loss_weights": (targets > 0).astype(np.int32)}


# ----------------------------------------------------------------------------
# Scoring under a mesh, against jiwer.
# ----------------------------------------------------------------------------

LAYOUT = VocabLayout(text_size=20, speech_size=50)
MODEL = SpeechTextLM(LAYOUT, decoder=functools.partial(
    decoder_config, size="tiny", num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
    max_length=48, dropout_rate=0.0))
DECODING = scoring.DecodingConfig(max_decode_length=10)
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
  return [input_pipeline.pad_rows(b, rows) for b in batches]


@pytest.fixture(scope="module")
def sharded_scorer():
  mesh = partitioning.make_mesh(data=4, fsdp=1, model=2)
  return scoring.Scorer(MODEL, mesh, decoding_config=DECODING)


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
  score = scoring.score_batches(sharded_scorer, params, batches, eval_batches.ids_as_words,
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

  one_device = scoring.Scorer(MODEL, partitioning.make_mesh(devices=jax.devices()[:1]),
                                 decoding_config=DECODING)
  alone = scoring.score_batches(one_device, params, batches, eval_batches.ids_as_words,
                                   progress=False)
  assert [p["hypothesis"] for p in alone.predictions] == [
      p["hypothesis"] for p in score.predictions]
  assert alone.metrics["ce_text"] == pytest.approx(score.metrics["ce_text"], rel=1e-4)


def test_empty_hypotheses_and_reference_like_jiwer(sharded_scorer, tmp_path):
  params = _random_params()
  params["final_norm"]["scale"][:] = 0.0        # all logits 0: <text_end> (lowest text id) first
  score = scoring.score_batches(sharded_scorer, params, _batches(), eval_batches.ids_as_words,
                                   progress=False)
  assert [p["hypothesis"] for p in score.predictions] == [""] * 5
  assert all(p["ended"] and p["hypothesis_tokens"] == 0 for p in score.predictions)
  _check_against_jiwer(score)
  assert score.metrics["deletions"] == score.metrics["reference_words"] == 10
  assert len(sharded_scorer._compiled) == 2  # pylint: disable=protected-access  (reused)

  scoring.write_split(str(tmp_path), score, {"step": 1})
  lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
  assert [json.loads(line)["id"] for line in lines] == [u[0] for u in UTTERANCES]
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["wer"] == pytest.approx(100.0) and metrics["step"] == 1
  table = scoring.summary_table([{"task": "t", "split": "s", **metrics}])
  assert table.splitlines()[2].startswith("| 1 | t | s | 5 | 100.00 |")
