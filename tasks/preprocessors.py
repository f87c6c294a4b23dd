"""seqio preprocessors: prepared units + transcript -> one "targets" stream.

A prepared example (see ``sld_jax.speech.prepare``) holds speech units in
[0, K) and a normalised transcript. ``units_and_text_to_targets`` lays them
out in the shared vocabulary (``sld_jax.vocab.VocabLayout``)::

  layout: text_size=14 (0 PAD, 1 <text_end>, 2 UNK, 3..13 words),
          <speech_end>=14, unit u -> 15 + u
  units  [3, 0, 7]   text "one two" (SentencePiece ids [5, 7])

  targets       [18, 15, 22, 14, 5, 7, 1]
                 units....  <se> text <text_end>
  speech_length 4  (units + <speech_end>: the decoding prompt)

``truncate_speech_to_fit`` (the registered tasks' last step, every split)
then fits each example into ``sequence_length["targets"] = L`` as the
released code does: when ``n + 1 + m + 1 > L`` it keeps the first
``L - 2 - m`` units (``block_size - 2 - len(text)``), so no utterance is
dropped and the transcript stays whole; it records ``truncated_units`` per
example and logs how many examples it truncated. With L = 6 above::

  targets         [18, 15, 14, 5, 7, 1]     (the last unit, 22, dropped)
  speech_length   3,  truncated_units 1

Only an example whose transcript alone does not fit (``m + 2 > L``) is
dropped, with a logged count. ``filter_over_length`` (drop whole examples
that do not fit, with a count) is the alternative for training data.
"""

from __future__ import annotations

from typing import Mapping, Optional

from absl import logging
import seqio
import tensorflow as tf

from sld_jax import vocab as vocab_lib

PASSTHROUGH_FEATURES = ("id", "speaker", "text", "speech_length", "truncated_units")


def units_and_text_to_targets(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """Builds ``targets = units <speech_end> text <text_end>``.

  Args:
    dataset: examples with "id", "speaker", "text" (tf.string scalars) and
      "units" (integer [n], values in [0, K)).
    output_features: must hold "targets" with a ``SpeechTextVocabulary``.

  Returns:
    Examples with "targets" (int32 [n + 1 + m + 1]), "speech_length"
    (int32 scalar, n + 1) and the "id", "speaker", "text" passthrough
    features. A unit outside [0, K) fails at iteration time with an error
    naming the example id.
  """
  vocabulary = output_features["targets"].vocabulary
  layout = vocabulary.layout
  speech_size = layout.speech_size
  speech_offset = layout.speech_offset
  speech_end = layout.speech_end_id

  def convert(example):
    units = tf.cast(example["units"], tf.int32)
    in_range = tf.reduce_all((units >= 0) & (units < speech_size))
    check = tf.debugging.Assert(in_range, [
        "example", example["id"], "has a speech unit outside [0, K), K =",
        speech_size, "units:", units], summarize=64)
    with tf.control_dependencies([check]):
      speech = units + speech_offset
    text_ids = tf.cast(vocabulary.encode_tf(example["text"]), tf.int32)
    targets = tf.concat([
        speech, tf.constant([speech_end], tf.int32), text_ids,
        tf.constant([vocab_lib.EOS_ID], tf.int32)], axis=0)
    return {
        "targets": targets,
        "speech_length": tf.size(speech, out_type=tf.int32) + 1,
        "id": example["id"],
        "speaker": example["speaker"],
        "text": example["text"],
    }

  return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def count_over_length(dataset: tf.data.Dataset, max_length: int,
                      feature: str = "targets") -> tuple[int, int]:
  """(examples longer than ``max_length``, all examples) by one pass."""
  lengths = dataset.map(lambda ex: tf.size(ex[feature], out_type=tf.int64),
                        num_parallel_calls=tf.data.AUTOTUNE)
  over, total = lengths.reduce(
      (tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
      lambda state, n: (state[0] + tf.cast(n > max_length, tf.int64),
                        state[1] + 1))
  return int(over), int(total)


def _fit_example(example, max_length: int, feature: str):
  targets = example[feature]
  units = example["speech_length"] - 1
  text = tf.size(targets, out_type=tf.int32) - units - 1       # m + 1 (<text_end>)
  keep = tf.clip_by_value(max_length - 1 - text, 0, units)      # L - 2 - m units
  fitted = tf.concat([targets[:keep], targets[units:]], axis=0)
  return {**example, feature: fitted, "speech_length": keep + 1,
          "truncated_units": units - keep}


def count_truncations(dataset: tf.data.Dataset, max_length: int,
                      feature: str = "targets") -> dict[str, int]:
  """One pass over fitted examples: how many were truncated (and kept), by how
  many units, and how many do not fit even without speech ("unfit")."""
  def step(state, example):
    fits = tf.size(example[feature]) <= max_length
    dropped = tf.where(fits, tf.cast(example["truncated_units"], tf.int64), 0)
    return (state[0] + tf.cast(dropped > 0, tf.int64), state[1] + dropped,
            state[2] + tf.cast(~fits, tf.int64), state[3] + 1)
  zero = tf.constant(0, tf.int64)
  truncated, units, unfit, total = dataset.reduce((zero, zero, zero, zero), step)
  return {"truncated": int(truncated), "truncated_units": int(units), "unfit": int(unfit),
          "total": int(total)}


def truncate_speech_to_fit(dataset: tf.data.Dataset,
                           sequence_length: Optional[Mapping[str, int]],
                           feature: str = "targets",
                           count: bool = True) -> tf.data.Dataset:
  """Keeps the first ``L - 2 - m`` units of examples longer than ``L`` (module doc).

  Adds ``truncated_units`` (int32, 0 when the example fits) and updates
  ``speech_length``. With ``count=True`` and eager execution (as when seqio
  builds a task's dataset) it reads the dataset once more and logs e.g.
  "truncated the speech of 3 of 120 examples (212 units) to fit 64 tokens".
  Examples whose transcript alone is too long are dropped with a logged
  count. Without a sequence length for ``feature`` nothing is truncated.
  """
  if not sequence_length or sequence_length.get(feature) is None:
    return dataset.map(lambda ex: {**ex, "truncated_units": tf.constant(0, tf.int32)})
  max_length = int(sequence_length[feature])
  if count and dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
    raise ValueError(
        "truncate_speech_to_fit cannot count the examples of a repeated dataset; "
        "repeat after truncating (tasks.get_dataset does)")
  # A cheap map: sequential, so the example order (and seeded shuffles) stay fixed.
  dataset = dataset.map(lambda ex: _fit_example(ex, max_length, feature))
  if count and tf.executing_eagerly():
    counts = count_truncations(dataset, max_length, feature)
    log = logging.warning if counts["truncated"] or counts["unfit"] else logging.info
    log("truncated the speech of %d of %d examples (%d units) to fit %d tokens, keeping "
        "the first L - 2 - len(text) units as released; dropped %d whose transcript alone "
        "does not fit", counts["truncated"], counts["total"], counts["truncated_units"],
        max_length, counts["unfit"])
  return dataset.filter(lambda ex: tf.size(ex[feature]) <= max_length)


def filter_over_length(dataset: tf.data.Dataset,
                       sequence_length: Optional[Mapping[str, int]],
                       feature: str = "targets",
                       count: bool = True) -> tf.data.Dataset:
  """Drops examples whose ``feature`` is longer than its sequence length.

  With ``count=True`` (and eager execution, as when seqio builds a task's
  dataset) the examples are counted first and the count is logged:
  "filtered 3 of 120 examples with targets longer than 64 tokens". That pass
  reads the dataset once more (cheap next to training). Without a sequence
  length for ``feature``, nothing is filtered.
  """
  if not sequence_length or sequence_length.get(feature) is None:
    return dataset
  max_length = int(sequence_length[feature])
  if count and dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
    raise ValueError(
        "filter_over_length cannot count the examples of a repeated dataset; "
        "repeat after filtering (tasks.get_dataset does)")
  if count and tf.executing_eagerly():
    over, total = count_over_length(dataset, max_length, feature)
    log = logging.warning if over else logging.info
    log("filtered %d of %d examples with %s longer than %d tokens "
        "(never trimmed; raise sequence_length[%r] to keep them)",
        over, total, feature, max_length, feature)
  return dataset.filter(lambda ex: tf.size(ex[feature]) <= max_length)
