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
passthrough features ``id``, ``speaker``, ``text`` (the reference) and
``speech_length`` (the prompt length: units + <speech_end>).

``eval_batches`` is the one reader of evaluation batches (``sld_jax.eval``,
training's dev evaluators and ``SeqioSource.eval_batches`` all read through
it): fixed-shape host numpy batches, the last one padded with all-zero rows
(weight 0: dropped from every metric), and with several processes the same
number of batches on every process (all-padding batches fill the shorter
shards), since evaluation steps are collective.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import numpy as np
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
  converter = seqio.DecoderFeatureConverter(pack=pack)
  if pack:
    model_features = converter(dataset, lengths)
  else:
    model_features = converter(
        dataset.map(lambda ex: {"targets": ex["targets"]}), lengths)
    passthrough = dataset.map(
        lambda ex: {k: ex[k] for k in preprocessors.PASSTHROUGH_FEATURES})
    model_features = tf.data.Dataset.zip((model_features, passthrough)).map(
        lambda model, extra: {**model, **extra})
  return model_features.batch(batch_size, drop_remainder=drop_remainder
                              ).prefetch(tf.data.AUTOTUNE)


def eval_batches(task_name: str, split: str, *,
                 sequence_length: Union[int, Mapping[str, int]], batch_size: int,
                 shard_info: Optional[seqio.ShardInfo] = None,
                 max_batches: Optional[int] = None,
                 passthrough: bool = True) -> list[dict[str, np.ndarray]]:
  """One unshuffled, unpacked pass over this shard of a task split.

  Args:
    task_name / split / sequence_length: as ``get_dataset``; examples longer
      than ``sequence_length`` are filtered by the task (a logged count).
    batch_size: rows per batch on this process.
    shard_info: this process's shard (default: the whole split).
    max_batches: stop after this many batches.
    passthrough: keep ``id``, ``speaker``, ``text``, ``speech_length``
      (else only the model features).

  Returns:
    Host batches of ``batch_size`` rows: int32 ``[rows, length]`` features,
    the last batch padded with all-zero rows.

  Raises:
    ValueError: this shard has no example of at most ``sequence_length`` tokens.
  """
  from sld_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  dataset = get_dataset(task_name, split, sequence_length, batch_size, pack=False,
                        shuffle=False, seed=None, shard_info=shard_info, num_epochs=1,
                        drop_remainder=False)
  batches = []
  for batch in dataset.as_numpy_iterator():
    if not passthrough:
      batch = {k: v for k, v in batch.items() if k in input_pipeline.FEATURES}
    batch = {k: (np.asarray(v, np.int32) if np.asarray(v).dtype.kind in "iu" else np.asarray(v))
             for k, v in batch.items()}
    batches.append(input_pipeline.pad_rows(batch, batch_size))
    if max_batches is not None and len(batches) == max_batches:
      break
  index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
  if not batches:
    raise ValueError(
        f"task {task_name!r} split {split!r} has no examples of at most {sequence_length} "
        f"tokens" + (f" for process {index} of {count}; use fewer processes"
                     if count > 1 else ""))
  most = len(batches)
  if count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    most = int(np.max(multihost_utils.process_allgather(np.array(len(batches)))))
  return batches + [{k: np.zeros_like(v) for k, v in batches[0].items()}] * (most - len(batches))
