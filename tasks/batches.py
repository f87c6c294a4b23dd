"""Model-ready batches of a registered task for the trainer and evaluator.

Training batches are packed by ``seqio.DecoderFeatureConverter(pack=True)``:
several ``units <speech_end> text <text_end>`` streams share a row, told
apart by segment ids. With layout text_size=14 (<speech_end>=14, unit u ->
15 + u), examples targets [18, 15, 14, 5, 1] and [16, 14, 7, 1], length 12::

  decoder_target_tokens [18, 15, 14, 5, 1, 16, 14, 7, 1, 0, 0, 0]
  decoder_input_tokens  [ 0, 18, 15, 14, 5,  0, 16, 14, 7, 0, 0, 0]
  decoder_loss_weights  [ 1,  1,  1,  1, 1,  1,  1,  1, 1, 0, 0, 0]
  decoder_segment_ids   [ 1,  1,  1,  1, 1,  2,  2,  2, 2, 0, 0, 0]
  decoder_positions     [ 0,  1,  2,  3, 4,  0,  1,  2, 3, 0, 0, 0]

(the objectives split the loss weights into speech and text positions with
``VocabLayout.is_speech`` / ``is_text`` on the targets). Evaluation batches
are unpacked (one example per row, no segment ids / positions) and carry the
passthrough features ``id``, ``speaker``, ``text`` (the reference),
``speech_length`` (the prompt length: units + <speech_end>) and
``truncated_units``, converted in the same pass over the split as the model
features. ``sld_jax.eval_batches`` reads them into fixed-shape host batches.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import seqio
import tensorflow as tf

from tasks import preprocessors


def _lengths(sequence_length: Union[int, Mapping[str, int]]) -> dict[str, int]:
  if isinstance(sequence_length, int):
    return {"targets": sequence_length}
  if set(sequence_length) != {"targets"}:
    raise ValueError(f"sequence_length must be an int or {{'targets': n}}, "
                     f"got {dict(sequence_length)}")
  return dict(sequence_length)


class UnpackedWithPassthrough(seqio.LMFeatureConverter):
  """seqio's unpacked decoder features plus the scalar passthrough features.

  What ``seqio.DecoderFeatureConverter(pack=False)`` gives a targets-only
  task (it hands such tasks to ``LMFeatureConverter``), with
  ``preprocessors.PASSTHROUGH_FEATURES`` carried along in the same pass.
  seqio's converters accept ``passthrough_features`` but leave carrying them
  to subclasses, and ``LMFeatureConverter`` does not: only ``targets`` is
  padded, and the passthrough features are copied through::

    example  {"targets": [18, 14, 5, 1], "id": b"dev-3", "speech_length": 2, ...}
    length 6 {"decoder_target_tokens": [18, 14, 5, 1, 0, 0],
              "decoder_input_tokens":  [ 0, 18, 14, 5, 1, 0],
              "decoder_loss_weights":  [ 1,  1,  1, 1, 0, 0],
              "id": b"dev-3", "speech_length": 2, ...}
  """

  def __init__(self, element_spec: Mapping[str, tf.TensorSpec]):
    self.passthrough = tuple(preprocessors.PASSTHROUGH_FEATURES)
    self.passthrough_lengths = {name: 0 for name in self.passthrough}  # rank 0: not checked
    super().__init__(pack=False, passthrough_features={
        name: seqio.FeatureConverter.FeatureSpec(dtype=element_spec[name].dtype, rank=0)
        for name in self.passthrough})

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
                        ) -> tf.data.Dataset:
    ds = self._pack_or_pad(ds, {"targets": task_feature_lengths["targets"]})
    return ds.map(
        lambda ex: {**self._convert_example(ex), **{k: ex[k] for k in self.passthrough}},
        num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    return {**super().get_model_feature_lengths(task_feature_lengths),
            **{name: task_feature_lengths[name] for name in self.passthrough}}


def get_dataset(task_name: str, split: str,
                sequence_length: Union[int, Mapping[str, int]],
                batch_size: int, pack: bool = True, shuffle: bool = True,
                seed: Optional[int] = 0,
                shard_info: Optional[seqio.ShardInfo] = None,
                num_epochs: Optional[int] = 1,
                drop_remainder: Optional[bool] = None,
                shuffle_buffer_size: Optional[int] = None) -> tf.data.Dataset:
  """Batches of a registered task, deterministic for a seed.

  Args:
    task_name: a registered task (importing ``tasks`` registers them).
    split: e.g. "train", "dev", "test".
    sequence_length: targets length per row (int or {"targets": n});
      longer examples keep the first L - 2 - len(text) units (logged count).
    batch_size: rows per batch (per host when sharded).
    pack: pack examples (training) or one per row plus passthrough features
      (evaluation).
    shuffle: shuffle examples (seeded by ``seed``).
    seed: shuffle seed.
    shard_info: this host's shard, e.g. ``seqio.ShardInfo(index, num)``.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a last partial batch; default True when packing
      (fixed shapes for training), False otherwise (every eval example kept;
      the last batch may be smaller).
    shuffle_buffer_size: default the task's (10,000).

  Returns:
    A tf.data.Dataset of dicts of [batch_size, length] int32 arrays (plus
    [batch] passthrough features when ``pack=False``).
  """
  lengths = _lengths(sequence_length)
  task = seqio.get_mixture_or_task(task_name)
  if drop_remainder is None:
    drop_remainder = pack
  dataset = task.get_dataset(
      sequence_length=lengths, split=split, use_cached=False, shuffle=shuffle,
      shuffle_buffer_size=shuffle_buffer_size, seed=seed,
      shard_info=shard_info, num_epochs=1, trim_output_features=False)
  # seqio repeats *before* its post-cache preprocessors, which would make the
  # over-length count (one pass over the split) endless: repeat here instead.
  # Shuffling reshuffles each epoch, deterministically for the seed.
  if num_epochs != 1:
    dataset = dataset.repeat(num_epochs)
  if pack:
    model_features = seqio.DecoderFeatureConverter(pack=True)(dataset, lengths)
  else:
    converter = UnpackedWithPassthrough(dataset.element_spec)
    model_features = converter(dataset, {**lengths, **converter.passthrough_lengths})
  return model_features.batch(batch_size, drop_remainder=drop_remainder
                              ).prefetch(tf.data.AUTOTUNE)
