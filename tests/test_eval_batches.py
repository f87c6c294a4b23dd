"""Eval batches (sld_jax.eval_batches): prompts, references and buckets of the
docstring example, bad rows, unpacking, task splits; eval splits are scored in
full: over-long utterances keep their transcript and the first
``L - 2 - len(text)`` units, with counts."""

import numpy as np
import pytest

from sld_jax import eval_batches
from sld_jax import model_inputs
from sld_jax.vocab import VocabLayout

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
  np.testing.assert_array_equal(eval_batches.real_rows(batch), [True, True, False])
  lengths = eval_batches.prompt_lengths(batch, DOC)
  np.testing.assert_array_equal(lengths, [4, 3, 2])   # 0 u1 .. uN <speech_end>
  np.testing.assert_array_equal(eval_batches.make_prompts(batch, lengths, 5, DOC),
                                [[0, 18, 15, 14, 0], [0, 16, 14, 0, 0], [0, 14, 0, 0, 0]])
  assert eval_batches.reference_ids(batch["decoder_target_tokens"][0], 4, DOC) == [5, 7]
  assert eval_batches.reference_ids(batch["decoder_target_tokens"][1], 3, DOC) == [9]
  assert [eval_batches.prompt_bucket(n, 256) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128,
                                                                              256]
  assert eval_batches.prompt_bucket(300, 256) == 256


def test_bad_rows_name_the_utterance():
  batch = _features([[18, 15, 5, 1, 0], [16, 14, 9, 1, 0]])
  batch["id"] = np.array([b"utt-a", b"utt-b"], object)
  with pytest.raises(ValueError, match=r"row 0 \(id 'utt-a'\) has no <speech_end> \(id 14\)"):
    eval_batches.prompt_lengths(batch, DOC)
  batch = _features([[16, 14, 9, 1, 0]])
  batch["speech_length"] = np.array([3], np.int32)
  with pytest.raises(ValueError, match="speech_length 3 but its first <speech_end> is at"):
    eval_batches.prompt_lengths(batch, DOC)


def test_unpack_rows_gives_one_utterance_per_row():
  packed = _features([[18, 14, 5, 1, 16, 14, 9, 1], [17, 17, 14, 1, 0, 0, 0, 0]])
  packed["decoder_segment_ids"] = np.array([[1, 1, 1, 1, 2, 2, 2, 2],
                                            [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
  batches = eval_batches.unpack_rows([packed], rows=2)
  np.testing.assert_array_equal(batches[0]["decoder_target_tokens"],
                                [[18, 14, 5, 1, 0, 0, 0, 0], [16, 14, 9, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batches[0]["decoder_input_tokens"][1],   # as seqio shifts
                                [0, 16, 14, 9, 1, 0, 0, 0])
  np.testing.assert_array_equal(batches[1]["decoder_target_tokens"],
                                [[17, 17, 14, 1, 0, 0, 0, 0], [0] * 8])
  np.testing.assert_array_equal(eval_batches.real_rows(batches[1]), [True, False])



SMOKE_TASK = TASK = "sld_embedded_digits_whisper_smoke"


def test_every_dev_utterance_is_kept_and_truncations_are_counted():
  import tasks  # pylint: disable=g-import-not-at-top
  layout = tasks.get_layout(TASK)
  full = eval_batches.read_task_split(TASK, "dev", sequence_length=128, batch_size=8)
  short = eval_batches.read_task_split(TASK, "dev", sequence_length=32, batch_size=8)
  rows = lambda batches: sum(int(eval_batches.real_rows(b).sum()) for b in batches)
  assert rows(full) == rows(short) == 30            # nothing dropped
  assert eval_batches.truncation_counts(full).tolist() == [0, 0]
  truncated, units = eval_batches.truncation_counts(short).tolist()
  assert 0 < truncated <= 30 and units >= truncated
  by_id = {}
  for batch in full:
    for row in np.flatnonzero(eval_batches.real_rows(batch)):
      by_id[batch["id"][row]] = batch["decoder_target_tokens"][row]
  seen = 0
  for index, batch in enumerate(short):
    lengths = eval_batches.prompt_lengths(batch, layout, f"batch {index}")
    eval_batches.make_prompts(batch, lengths, 32, layout)   # fits, consistent with the inputs
    for row in np.flatnonzero(eval_batches.real_rows(batch)):
      whole = by_id[batch["id"][row]]
      whole = whole[whole > 0]
      cut = batch["decoder_target_tokens"][row]
      cut = cut[cut > 0]
      dropped = int(batch["truncated_units"][row])
      units = int(model_inputs.speech_lengths(whole, layout)) - 1
      text = len(whole) - units - 1                   # transcript + <text_end>
      assert len(cut) <= 32
      assert dropped == max(0, units - (32 - 1 - text))   # keeps L - 2 - len(text) units
      np.testing.assert_array_equal(cut, np.concatenate([whole[:units - dropped],
                                                         whole[units:]]))
      assert int(batch["speech_length"][row]) == units - dropped + 1
      seen += 1
  assert seen == 30


def test_unknown_split_and_task_raise():
  with pytest.raises(ValueError, match=r"has no split 'bogus'; its splits are \['train', 'dev', "
                                       r"'test'\]"):
    eval_batches.check_split(SMOKE_TASK, "bogus")
  with pytest.raises(ValueError, match="unknown task 'sld_nope'; registered sld tasks"):
    eval_batches.check_split("sld_nope", "dev")
  assert eval_batches.eval_splits(SMOKE_TASK) == ["dev", "test"]


def test_one_pass_gives_what_seqio_and_the_passthrough_walk_gave():
  """``tasks.batches.UnpackedWithPassthrough`` = seqio's unpacked decoder
  features zipped with a second walk over the passthrough features."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tasks import batches as task_batches  # pylint: disable=g-import-not-at-top
  from tasks import preprocessors  # pylint: disable=g-import-not-at-top
  names = preprocessors.PASSTHROUGH_FEATURES
  examples = tf.data.Dataset.from_generator(
      lambda: iter([{"targets": [18, 15, 14, 5, 7, 1], "id": "a", "speaker": "s1",
                     "text": "5 7", "speech_length": 3, "truncated_units": 0},
                    {"targets": [16, 14, 9, 1], "id": "b", "speaker": "s2", "text": "9",
                     "speech_length": 2, "truncated_units": 4}]),
      output_signature={"targets": tf.TensorSpec([None], tf.int32),
                        **{k: tf.TensorSpec([], tf.string) for k in ("id", "speaker", "text")},
                        "speech_length": tf.TensorSpec([], tf.int32),
                        "truncated_units": tf.TensorSpec([], tf.int32)})
  lengths = {"targets": 8}
  converter = task_batches.UnpackedWithPassthrough(examples.element_spec)
  one_pass = list(converter(examples, {**lengths, **converter.passthrough_lengths})
                  .batch(2).as_numpy_iterator())
  model = seqio.DecoderFeatureConverter(pack=False)(
      examples.map(lambda ex: {"targets": ex["targets"]}), lengths)
  extra = examples.map(lambda ex: {k: ex[k] for k in names})
  two_walks = list(tf.data.Dataset.zip((model, extra)).map(lambda m, e: {**m, **e})
                   .batch(2).as_numpy_iterator())
  assert len(one_pass) == len(two_walks) == 1
  assert list(one_pass[0]) == list(two_walks[0])
  for name, value in two_walks[0].items():
    np.testing.assert_array_equal(one_pass[0][name], value, err_msg=name)
  np.testing.assert_array_equal(one_pass[0]["decoder_input_tokens"][1],
                                [0, 16, 14, 9, 1, 0, 0, 0])
