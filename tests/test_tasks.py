"""Preprocessors, vocabulary and batches on a tiny in-memory task (golden ids)."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import seqio
import tensorflow as tf

from sld_jax import seqio_vocab
from sld_jax.speech import text_normalize
import tasks
from tasks import preprocessors

# Text model: 0 <pad>, 1 </s> = <text_end>, 2 <unk>, 3 one, 4 two, 5 three,
# 6 four. Layout(text_size=7, K=5): <speech_end> = 7, unit u -> 8 + u.
K = 5
EXAMPLES = [
    # id, speaker, text, units
    ("a", "s1", "one two", [0, 3, 3, 4]),
    ("b", "s2", "four", [2]),
    ("c", "s1", "three one", [1] * 10),   # 14 tokens > 12: 8 units kept
    ("d", "s3", "two", [4, 0]),
]
TARGETS = {
    "a": [8, 11, 11, 12, 7, 3, 4, 1],
    "b": [10, 7, 6, 1],
    "c": [9] * 10 + [7, 5, 3, 1],
    "d": [12, 8, 7, 4, 1],
}
LENGTH = 12


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
  directory = tmp_path_factory.mktemp("text_model")
  return text_normalize.train_text_model(
      ["one two three four", "one two three", "one two", "one"], 64,
      os.path.join(directory, "text"), "word")


@pytest.fixture(scope="module")
def vocabulary(text_model):
  return seqio_vocab.SpeechTextVocabulary(text_model, K, name="tiny")


def _dataset(examples):
  def generate():
    for utt_id, speaker, text, units in examples:
      yield {"id": utt_id, "speaker": speaker, "text": text,
             "units": np.asarray(units, np.int64),
             "duration": np.float32(len(units) / 50)}
  return tf.data.Dataset.from_generator(generate, output_signature={
      "id": tf.TensorSpec([], tf.string),
      "speaker": tf.TensorSpec([], tf.string),
      "text": tf.TensorSpec([], tf.string),
      "units": tf.TensorSpec([None], tf.int64),
      "duration": tf.TensorSpec([], tf.float32)})


@pytest.fixture(scope="module")
def tiny_task(vocabulary):
  name = "sld_test_tiny_task"
  tasks.register_task(
      name, ("train", "bad"), vocabulary=vocabulary,
      dataset_fn=lambda split, shuffle_files, seed=None: _dataset(
          EXAMPLES if split == "train" else [("x", "s", "one", [1, K])]))
  yield name
  seqio.TaskRegistry.remove(name)


def test_vocabulary_layout_and_text_ids(vocabulary):
  assert vocabulary.encode("one two three four") == [3, 4, 5, 6]
  assert (vocabulary.text_size, vocabulary.speech_size) == (7, K)
  assert vocabulary.speech_end_id == 7 and vocabulary.speech_offset == 8
  assert vocabulary.vocab_size == 128 == vocabulary.layout.size
  assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
  assert vocabulary.encode_units([0, 3, 4]) == [8, 11, 12]


def test_vocabulary_decode_drops_units_and_stops_at_text_end(vocabulary):
  row = TARGETS["a"] + [6, 6, 0, 0]  # anything after <text_end> is ignored
  assert vocabulary.decode(row) == "one two"
  decoded = vocabulary.decode_tf(tf.constant([row, TARGETS["d"] + [0] * 7]))
  assert decoded.numpy().tolist() == [b"one two", b"two"]
  assert vocabulary.decode_tf(tf.constant(TARGETS["b"])).numpy() == b"four"
  assert vocabulary.encode_tf(tf.constant("two four")).numpy().tolist() == [4, 6]


def test_vocabulary_pickles_and_compares(vocabulary, text_model):
  clone = pickle.loads(pickle.dumps(vocabulary))
  assert clone == vocabulary
  assert clone != seqio_vocab.SpeechTextVocabulary(text_model, K + 1)


def test_vocabulary_rejects_models_with_other_special_ids(tmp_path):
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["one two", "two three"]),
      model_prefix=str(tmp_path / "bad"), model_type="word", vocab_size=6,
      minloglevel=2)  # default ids: unk 0, bos 1, eos 2
  vocab = seqio_vocab.SpeechTextVocabulary(str(tmp_path / "bad.model"), K)
  with pytest.raises(ValueError, match="bad.model has special ids"):
    _ = vocab.layout


def test_units_and_text_to_targets_stream_layout(vocabulary):
  output_features = {"targets": seqio.Feature(vocabulary, add_eos=False)}
  converted = list(preprocessors.units_and_text_to_targets(
      _dataset(EXAMPLES), output_features).as_numpy_iterator())
  assert [ex["targets"].tolist() for ex in converted] == [
      TARGETS[e[0]] for e in EXAMPLES]
  assert [int(ex["speech_length"]) for ex in converted] == [5, 2, 11, 3]
  assert [ex["id"] for ex in converted] == [b"a", b"b", b"c", b"d"]
  assert converted[0]["text"] == b"one two"
  assert converted[0]["targets"].dtype == np.int32


def test_filter_counts_and_never_trims(vocabulary, caplog):
  output_features = {"targets": seqio.Feature(vocabulary, add_eos=False)}
  dataset = preprocessors.units_and_text_to_targets(_dataset(EXAMPLES),
                                                    output_features)
  assert preprocessors.count_over_length(dataset, LENGTH) == (1, 4)
  with caplog.at_level(logging.INFO):
    kept = preprocessors.filter_over_length(dataset, {"targets": LENGTH})
  assert "filtered 1 of 4 examples with targets longer than 12" in caplog.text
  kept = list(kept.as_numpy_iterator())
  assert [ex["id"] for ex in kept] == [b"a", b"b", b"d"]
  assert [ex["targets"].tolist() for ex in kept] == [
      TARGETS["a"], TARGETS["b"], TARGETS["d"]]
  # Without a length nothing is filtered.
  assert len(list(preprocessors.filter_over_length(dataset, None))) == 4


def test_packed_training_batch_golden(tiny_task):
  batches = list(tasks.get_dataset(tiny_task, "train", LENGTH, batch_size=2,
                                   pack=True, shuffle=False)
                 .as_numpy_iterator())
  assert len(batches) == 1
  batch = batches[0]
  # "c" keeps its first 12 - 2 - 2 = 8 units (as released) and fills row 1.
  np.testing.assert_array_equal(batch["decoder_target_tokens"], [
      [8, 11, 11, 12, 7, 3, 4, 1, 10, 7, 6, 1],
      [9, 9, 9, 9, 9, 9, 9, 9, 7, 5, 3, 1]])
  np.testing.assert_array_equal(batch["decoder_input_tokens"], [
      [0, 8, 11, 11, 12, 7, 3, 4, 0, 10, 7, 6],
      [0, 9, 9, 9, 9, 9, 9, 9, 9, 7, 5, 3]])
  np.testing.assert_array_equal(batch["decoder_loss_weights"], [
      [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
      [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(batch["decoder_segment_ids"], [
      [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2],
      [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(batch["decoder_positions"], [
      [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3],
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
  assert set(batch) == {"decoder_target_tokens", "decoder_input_tokens",
                        "decoder_loss_weights", "decoder_segment_ids",
                        "decoder_positions"}


def test_unpacked_eval_batches_golden(tiny_task):
  batches = list(tasks.get_dataset(tiny_task, "train", LENGTH, batch_size=2,
                                   pack=False, shuffle=False)
                 .as_numpy_iterator())
  assert [len(b["id"]) for b in batches] == [2, 2]  # every example kept
  first, last = batches
  np.testing.assert_array_equal(first["decoder_target_tokens"], [
      [8, 11, 11, 12, 7, 3, 4, 1, 0, 0, 0, 0],
      [10, 7, 6, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
  # Unpacked rows are shifted as a whole: <text_end> (1) reappears as the
  # input of the first padding position, whose loss weight is 0.
  np.testing.assert_array_equal(first["decoder_input_tokens"], [
      [0, 8, 11, 11, 12, 7, 3, 4, 1, 0, 0, 0],
      [0, 10, 7, 6, 1, 0, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(first["decoder_loss_weights"], [
      [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
      [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
  assert first["id"].tolist() == [b"a", b"b"]
  assert first["speaker"].tolist() == [b"s1", b"s2"]
  assert first["text"].tolist() == [b"one two", b"four"]
  assert first["speech_length"].tolist() == [5, 2]
  assert first["truncated_units"].tolist() == [0, 0]
  assert last["id"].tolist() == [b"c", b"d"]
  np.testing.assert_array_equal(last["decoder_target_tokens"],
                                [[9, 9, 9, 9, 9, 9, 9, 9, 7, 5, 3, 1],
                                 [12, 8, 7, 4, 1, 0, 0, 0, 0, 0, 0, 0]])
  assert last["speech_length"].tolist() == [9, 3]
  assert last["truncated_units"].tolist() == [2, 0]


def test_truncate_speech_to_fit_keeps_every_example_and_counts(vocabulary, caplog):
  output_features = {"targets": seqio.Feature(vocabulary, add_eos=False)}
  dataset = preprocessors.units_and_text_to_targets(_dataset(EXAMPLES), output_features)
  with caplog.at_level(logging.INFO):
    fitted = preprocessors.truncate_speech_to_fit(dataset, {"targets": LENGTH})
  assert "truncated the speech of 1 of 4 examples (2 units) to fit 12 tokens" in caplog.text
  fitted = list(fitted.as_numpy_iterator())
  assert [ex["id"] for ex in fitted] == [b"a", b"b", b"c", b"d"]
  assert [ex["targets"].tolist() for ex in fitted] == [
      TARGETS["a"], TARGETS["b"], [9] * 8 + [7, 5, 3, 1], TARGETS["d"]]
  assert [int(ex["speech_length"]) for ex in fitted] == [5, 2, 9, 3]
  assert [int(ex["truncated_units"]) for ex in fitted] == [0, 0, 2, 0]
  # A transcript that alone does not fit (2 + 2 > 3) cannot be kept: counted, dropped.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    tiny = list(preprocessors.truncate_speech_to_fit(dataset, {"targets": 3}))
  assert ("truncated the speech of 2 of 4 examples (3 units) to fit 3 tokens" in caplog.text
          and "dropped 2 whose transcript alone does not fit" in caplog.text)
  assert [ex["id"] for ex in tiny] == [b"b", b"d"]
  assert [ex["targets"].numpy().tolist() for ex in tiny] == [[7, 6, 1], [7, 4, 1]]
  # Without a length nothing is truncated.
  assert [int(ex["truncated_units"])
          for ex in preprocessors.truncate_speech_to_fit(dataset, None)] == [0] * 4


def test_shuffled_batches_are_deterministic_for_a_seed(tiny_task):
  def ids(seed, num_epochs=3):
    ds = tasks.get_dataset(tiny_task, "train", LENGTH, batch_size=1,
                           pack=False, shuffle=True, seed=seed, num_epochs=num_epochs)
    return [b["id"][0] for b in ds.as_numpy_iterator()]
  # One epoch only: the reshuffle of later epochs depends on how many datasets
  # with that seed this process built before (tf.data's seed generator), which
  # 4 examples expose; a fresh process (a resumed run) is unaffected.
  assert ids(3, 1) == ids(3, 1)
  assert sorted(ids(3)) == sorted([b"a", b"b", b"c", b"d"] * 3)


# Twenty short examples in file order "e00" ... "e19": a shuffled order equal
# to file order by chance has probability 1 / 20!.
MANY_EXAMPLES = [(f"e{i:02d}", "s1", "one two"[: 3 + i % 2 * 4], [i % K])
                 for i in range(20)]


@pytest.fixture(scope="module")
def many_task(vocabulary):
  name = "sld_test_many_task"
  tasks.register_task(
      name, ("train",), vocabulary=vocabulary,
      dataset_fn=lambda split, shuffle_files, seed=None: _dataset(MANY_EXAMPLES))
  yield name
  seqio.TaskRegistry.remove(name)


def test_shuffle_changes_the_order_reproducibly_for_a_seed(many_task):
  def ids(shuffle, seed=0, num_epochs=1):
    ds = tasks.get_dataset(many_task, "train", LENGTH, batch_size=1, pack=False,
                           shuffle=shuffle, seed=seed, num_epochs=num_epochs)
    return [b["id"][0].decode() for b in ds.as_numpy_iterator()]

  file_order = [e[0] for e in MANY_EXAMPLES]
  assert ids(shuffle=False) == file_order
  shuffled = ids(shuffle=True, seed=1)
  assert sorted(shuffled) == file_order and shuffled != file_order
  assert ids(shuffle=True, seed=1) == shuffled          # same seed, same order
  assert ids(shuffle=True, seed=2) != shuffled          # another seed, another
  two_epochs = ids(shuffle=True, seed=1, num_epochs=2)  # each epoch reshuffled
  assert sorted(two_epochs[:20]) == sorted(two_epochs[20:]) == file_order
  assert two_epochs[:20] != two_epochs[20:]


def test_sharded_batches_split_the_examples(tiny_task):
  seen = []
  for index in range(2):
    ds = tasks.get_dataset(tiny_task, "train", LENGTH, batch_size=1,
                           pack=False, shuffle=False,
                           shard_info=seqio.ShardInfo(index, 2))
    seen += [b["id"][0] for b in ds.as_numpy_iterator()]
  assert sorted(seen) == [b"a", b"b", b"c", b"d"]


def test_unit_out_of_range_names_the_example(tiny_task):
  # The truncation count reads the data when the dataset is built, so the
  # error already comes from get_dataset.
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"\[example\] \[x\] \[has a speech unit outside"):
    ds = tasks.get_dataset(tiny_task, "bad", LENGTH, batch_size=1, pack=False,
                           shuffle=False)
    list(ds.as_numpy_iterator())


def test_registered_task_names():
  names = set(seqio.TaskRegistry.names())
  for name in ("sld_embedded_digits_whisper", "sld_embedded_digits_logmel",
               "sld_embedded_sentences_whisper",
               "sld_embedded_sentences_logmel",
               "sld_embedded_digits_whisper_smoke",
               "sld_embedded_digits_logmel_smoke",
               "sld_librispeech_units"):
    assert name in names
  assert tasks.DEFAULT_TASK == "sld_embedded_digits_whisper"


def test_librispeech_task_resolves_its_dir_lazily(tmp_path, monkeypatch):
  monkeypatch.setenv("SLD_DATA_DIR", str(tmp_path))
  assert tasks.prepared_dir("sld_librispeech_units") == str(
      tmp_path / "prepared" / "librispeech")
  with pytest.raises(ValueError, match="holds no prepared data"):
    tasks.get_layout("sld_librispeech_units")
