"""Decoding feeds the model the prefix it was trained on (sld_jax.model_inputs).

The prefix test takes real examples through the real seqio task (the
embedded digits smoke corpus, packed training rows and unpacked eval rows),
builds the decoding prompts as evaluation does, prefills them into the KV
cache and checks that the logits at every prompt position equal the
teacher-forced logits of the same utterance inside a packed training batch.
"""

from __future__ import annotations

import functools

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax import decoding
from sld_jax import eval_batches
from sld_jax import model_inputs
from sld_jax.lm import SpeechTextLM
from sld_jax.model import decoder as decoder_lib
from sld_jax.model.config import decoder_config
from sld_jax.vocab import VocabLayout

TASK = "sld_embedded_digits_whisper_smoke"
LENGTH = 128
DOC = VocabLayout(text_size=14, speech_size=8)


def test_docstring_example():
  targets = np.array([18, 15, 14, 5, 7, 1], np.int32)
  inputs = model_inputs.decoder_input_tokens(targets)
  np.testing.assert_array_equal(inputs, [0, 18, 15, 14, 5, 7])
  prompt = model_inputs.prompt_from_units([3, 0], DOC)
  np.testing.assert_array_equal(prompt, [0, 18, 15, 14])
  assert len(prompt) == model_inputs.prompt_length(3) == 4
  np.testing.assert_array_equal(prompt, inputs[:4])
  # The first text token is the target where the input is <speech_end>.
  assert inputs[len(prompt) - 1] == DOC.speech_end_id and targets[len(prompt) - 1] == 5
  packed = model_inputs.decoder_input_tokens(
      [[3, 8, 1, 9, 1, 5, 4, 1, 0, 0]], [[1, 1, 1, 2, 2, 3, 3, 3, 0, 0]])
  np.testing.assert_array_equal(packed, [[0, 3, 8, 0, 9, 0, 5, 4, 0, 0]])


def test_batch_prompts_reject_inputs_that_are_not_the_shifted_targets():
  targets = np.array([[18, 15, 14, 5, 1, 0]], np.int32)
  prompts, lengths = model_inputs.batch_prompts(targets, 6, DOC)
  np.testing.assert_array_equal(prompts, [[0, 18, 15, 14, 0, 0]])
  np.testing.assert_array_equal(lengths, [4])
  stale = targets.copy()   # the old, unshifted prompt layout
  with pytest.raises(ValueError, match="row 0's decoder_input_tokens are not its targets"):
    model_inputs.batch_prompts(targets, 6, DOC, inputs=stale)
  with pytest.raises(ValueError, match="does not fit width 3"):
    model_inputs.batch_prompts(targets, 3, DOC)


# ----------------------------------------------------------------------------
# The prefix test, on the real seqio task.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_batches():
  import tasks  # pylint: disable=g-import-not-at-top
  layout = tasks.get_layout(TASK)
  train = list(tasks.get_dataset(TASK, "dev", LENGTH, batch_size=4, pack=True, shuffle=False,
                                 drop_remainder=True).take(2).as_numpy_iterator())
  evals = eval_batches.read_task_split(TASK, "dev", sequence_length=LENGTH, batch_size=8)
  return layout, train, evals


def test_decoder_input_tokens_equal_the_seqio_converter(task_batches):
  _, train, evals = task_batches
  for batch in train:
    assert batch["decoder_segment_ids"].max() > 1   # really packed
    np.testing.assert_array_equal(
        model_inputs.decoder_input_tokens(batch["decoder_target_tokens"],
                                          batch["decoder_segment_ids"]),
        batch["decoder_input_tokens"])
  for batch in evals:
    np.testing.assert_array_equal(
        model_inputs.decoder_input_tokens(batch["decoder_target_tokens"]),
        batch["decoder_input_tokens"])


def _model(layout):
  model = SpeechTextLM(layout, decoder=functools.partial(
      decoder_config, size="tiny", num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
      max_length=LENGTH, dropout_rate=0.0))
  shapes = nn.meta.unbox(jax.eval_shape(model.init_params, jax.random.key(0)))
  rng = np.random.default_rng(0)

  def fill(path, leaf):  # decisive, varied logits
    if "scale" in jax.tree_util.keystr(path):
      return np.ones(leaf.shape, np.float32)
    return rng.normal(0.0, 0.5 if leaf.ndim >= 2 else 0.1, leaf.shape).astype(np.float32)
  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def _segments(batch):
  """(row, start, end) of every packed segment of a training batch."""
  for row, segments in enumerate(batch["decoder_segment_ids"]):
    for segment in np.unique(segments[segments > 0]):
      where = np.flatnonzero(segments == segment)
      yield row, int(where[0]), int(where[-1]) + 1


def test_prefill_logits_equal_teacher_forced_logits_of_training(task_batches):
  layout, train, evals = task_batches
  model, params = _model(layout)
  assert model.config.dtype == "float32"
  # Teacher-forced logits of the packed training rows, as training computes them.
  train_logits = [np.asarray(jax.jit(model.logits)(params, {k: jnp.asarray(v) for k, v in
                                                            b.items()})) for b in train]
  by_targets = {}
  for batch, logits in zip(train, train_logits):
    for row, start, end in _segments(batch):
      key = batch["decoder_target_tokens"][row, start:end].tobytes()
      by_targets[key] = logits[row, start:end]

  width = 64
  prefill = jax.jit(functools.partial(decoder_lib.prefill, model.module, logits="all"))
  cached_prefill, _ = decoding.cached_fns(model.module, params, layout)
  uncached_prefill, _ = decoding.uncached_fns(model.module, params)
  matched = 0
  for index, batch in enumerate(evals):
    lengths = eval_batches.prompt_lengths(batch, layout, f"dev batch {index}")
    prompts = eval_batches.make_prompts(batch, lengths, width, layout)
    rows = prompts.shape[0]
    cache = decoder_lib.init_cache(model.module, rows, width + 8)
    logits, _ = prefill(params, cache, jnp.asarray(prompts), jnp.asarray(lengths))
    logits = np.asarray(logits)
    next_cached = np.asarray(cached_prefill(cache, jnp.asarray(prompts),
                                            jnp.asarray(lengths))[0])
    next_uncached = decoding.next_token_logits(uncached_prefill(
        decoding.init_uncached_state(rows, width), jnp.asarray(prompts),
        jnp.asarray(lengths))[0], jnp.asarray(lengths))
    # The old prompt, `u1 .. uN <speech_end>` without the leading 0.
    old_prompts = np.pad(prompts[:, 1:], ((0, 0), (0, 1)))
    old_next = np.asarray(cached_prefill(cache, jnp.asarray(old_prompts),
                                         jnp.asarray(lengths - 1))[0])
    for row in np.flatnonzero(eval_batches.real_rows(batch)):
      targets = batch["decoder_target_tokens"][row]
      key = targets[:int(np.sum(targets > 0))].tobytes()
      if key not in by_targets:
        continue   # this utterance is not in the two training batches
      trained = by_targets[key]
      n = int(lengths[row])
      assert prompts[row, 0] == 0 and prompts[row, n - 1] == layout.speech_end_id
      # Two programs compiled apart (prefill, training): float32 rounding of
      # a few ulps of the largest logit; a wrong position or mask is > 0.1.
      np.testing.assert_allclose(logits[row, :n], trained[:n], rtol=1e-5,
                                 atol=1e-5 * max(1.0, float(np.abs(trained[:n]).max())))
      # What decoding reads: the next-token logits of the whole prompt (the
      # first text token), through the cached and the uncached paths.
      text = slice(0, layout.text_size)
      np.testing.assert_allclose(next_cached[row], trained[n - 1, text], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(next_uncached)[row], trained[n - 1],
                                 rtol=1e-5, atol=1e-5)
      assert targets[n - 1] not in (0, layout.speech_end_id)   # the first text token
      assert layout.is_text(targets[n - 1])
      # The old prompt gives other next-token logits: the test can tell.
      assert np.abs(old_next[row] - trained[n - 1, text]).max() > 1e-2
      matched += 1
  assert matched >= 6, matched
