"""Host batches whose order is a function of the training step.

Every source yields, for training step ``s``, this process's rows of the
global batch of step ``s``: the same for a run that started at 0 and for a
run resumed at ``s`` (the data position in a checkpoint is just the step).

* ``SeqioSource``: a task of the ``tasks`` package through
  ``tasks.get_dataset`` (``seqio.DecoderFeatureConverter``, packed), shuffled
  with a fixed seed and repeated, read by each process from its own shard
  (``seqio.ShardInfo(jax.process_index(), jax.process_count())``), batched
  with ``drop_remainder``; resuming at step ``s`` is ``skip(s)`` on that
  deterministic stream (tf.data replays the skipped batches, which costs time
  proportional to ``s`` but needs no iterator state).
* ``SyntheticSource``: generated speech/text rows for tests and throughput
  runs; the global batch of step ``s`` is drawn from ``(seed, s)`` alone, and
  process ``p`` of ``n`` takes rows ``[p * B/n, (p + 1) * B/n)``, so a
  two-process run sees exactly the batches of a one-process run.

Host batches are dicts of numpy arrays with the seqio decoder features::

  decoder_target_tokens  [b, L] int32   units <speech_end> text <text_end>, 0-padded
  decoder_input_tokens   [b, L] int32   targets shifted right (0 first, per segment)
  decoder_loss_weights   [b, L] int32   1 on real target tokens
  decoder_segment_ids    [b, L] int32   1, 2, ... per packed sequence, 0 = padding
  decoder_positions      [b, L] int32   0, 1, ... restarting per segment

(unpacked seqio rows have only the first three). Example of one packed row
holding two sequences, ``VocabLayout(text_size=8, speech_size=4)``
(<speech_end>=8, units 9..12, <text_end>=1), L=10::

  targets    [ 9 10 12  8  5  1 11  8  4  1]
  inputs     [ 0  9 10 12  8  5  0 11  8  4]
  weights    [ 1  1  1  1  1  1  1  1  1  1]
  segments   [ 1  1  1  1  1  1  2  2  2  2]
  positions  [ 0  1  2  3  4  5  0  1  2  3]
"""

from __future__ import annotations

import abc
from typing import Any, Iterator, Optional

from absl import logging
import gin
import jax
import numpy as np

from sld_jax import model_inputs
from sld_jax.model_inputs import FEATURES
from sld_jax.vocab import EOS_ID, VocabLayout

HostBatch = dict[str, np.ndarray]


def host_batch_size(global_batch_size: int, process_count: int) -> int:
  """Rows each process reads; the global batch must split evenly."""
  if global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the "
        f"{process_count} processes")
  return global_batch_size // process_count


class BatchSource(abc.ABC):
  """Step-indexed host batches (module docstring).

  Attributes:
    global_batch_size: rows per training step over all processes.
    sequence_length: tokens per row.
  """

  global_batch_size: int
  sequence_length: int

  @property
  @abc.abstractmethod
  def layout(self) -> VocabLayout:
    """The vocabulary layout of the ids in the batches."""

  @abc.abstractmethod
  def batches(self, start_step: int, process_index: int = 0,
              process_count: int = 1) -> Iterator[HostBatch]:
    """This process's rows for steps ``start_step, start_step + 1, ...``."""

  @abc.abstractmethod
  def description(self) -> dict[str, Any]:
    """What determines the order (JSON); compared when a run resumes."""

  def eval_batches(self, process_index: int = 0, process_count: int = 1,
                   max_batches: Optional[int] = None) -> list[HostBatch]:
    """Finite evaluation batches (one pass; the last one padded with weight-0 rows)."""
    raise NotImplementedError(f"{type(self).__name__} has no evaluation batches")

  def position(self, step: int) -> dict[str, Any]:
    """The data position stored with a checkpoint of ``step``."""
    return {"step": int(step), "examples": int(step) * self.global_batch_size,
            "source": self.description()}

  def check_resume(self, position: dict[str, Any], step: int) -> None:
    """Warns when a resumed run will not see the data of the original run."""
    if position.get("step") != step:
      raise ValueError(
          f"checkpoint data position says step {position.get('step')} but the state "
          f"is at step {step}")
    saved = position.get("source")
    if saved != self.description():
      logging.warning(
          "The data source differs from the checkpoint's (%s vs now %s): the resumed "
          "run will not continue the original data order exactly.", saved,
          self.description())


def pad_rows(batch: HostBatch, rows: int) -> HostBatch:
  """Appends all-zero rows (weight 0, segment 0) up to ``rows`` rows."""
  have = next(iter(batch.values())).shape[0]
  if have > rows:
    raise ValueError(f"pad_rows: batch has {have} rows, more than {rows}")
  return {name: np.concatenate([value, np.zeros((rows - have,) + value.shape[1:], value.dtype)])
          for name, value in batch.items()}


# ----------------------------------------------------------------------------
# Synthetic rows.
# ----------------------------------------------------------------------------


@gin.configurable
class SyntheticSource(BatchSource):
  """Generated ``units <speech_end> text <text_end>`` sequences.

  Units follow a random walk over [0, K); the transcript is a function of
  the units (unit ``u`` at even offsets gives text id ``3 + u % (G - 3)``),
  so text is predictable from speech and the loss can fall well below chance.
  Rows are packed (several sequences per row) or one sequence per row.
  """

  def __init__(self, text_size: int = 32, speech_size: int = 64,
               global_batch_size: int = 8, sequence_length: int = 64, seed: int = 0,
               pack: bool = True, min_units: int = 4, max_units: int = 16):
    if not 1 <= min_units <= max_units:
      raise ValueError(f"SyntheticSource: need 1 <= min_units <= max_units, got "
                       f"{min_units}, {max_units}")
    longest = max_units + 1 + (max_units + 1) // 2 + 1
    if longest > sequence_length:
      raise ValueError(
          f"SyntheticSource: sequences reach {longest} tokens, longer than "
          f"sequence_length={sequence_length}; lower max_units")
    self._layout = VocabLayout(text_size, speech_size)
    self.global_batch_size = global_batch_size
    self.sequence_length = sequence_length
    self.seed = seed
    self.pack = pack
    self.min_units = min_units
    self.max_units = max_units

  @property
  def layout(self) -> VocabLayout:
    return self._layout

  def description(self) -> dict[str, Any]:
    return {"kind": "synthetic", "text_size": self._layout.text_size,
            "speech_size": self._layout.speech_size,
            "global_batch_size": self.global_batch_size,
            "sequence_length": self.sequence_length, "seed": self.seed, "pack": self.pack,
            "units": [self.min_units, self.max_units]}

  def _sequence(self, rng: np.random.Generator) -> np.ndarray:
    layout = self._layout
    n = int(rng.integers(self.min_units, self.max_units + 1))
    steps = rng.integers(-2, 3, size=n)
    units = (int(rng.integers(layout.speech_size)) + np.cumsum(steps)) % layout.speech_size
    text = 3 + units[::2] % (layout.text_size - 3)
    return np.concatenate([layout.units_to_ids(units), [layout.speech_end_id], text,
                           [EOS_ID]]).astype(np.int32)

  def _row(self, rng: np.random.Generator) -> HostBatch:
    length = self.sequence_length
    row = {name: np.zeros(length, np.int32) for name in FEATURES}
    used, segment = 0, 0
    while True:
      sequence = self._sequence(rng)
      if used + len(sequence) > length or (segment and not self.pack):
        break
      segment += 1
      span = slice(used, used + len(sequence))
      row["decoder_target_tokens"][span] = sequence
      row["decoder_input_tokens"][span] = model_inputs.decoder_input_tokens(sequence)
      row["decoder_loss_weights"][span] = 1
      row["decoder_segment_ids"][span] = segment
      row["decoder_positions"][span] = np.arange(len(sequence))
      used += len(sequence)
    return row

  def global_batch(self, step: int, seed_offset: int = 0) -> HostBatch:
    """The whole batch of ``step``; a pure function of ``(seed, step)``."""
    rng = np.random.default_rng([self.seed + seed_offset, step])
    rows = [self._row(rng) for _ in range(self.global_batch_size)]
    return {name: np.stack([row[name] for row in rows]) for name in FEATURES}

  def batches(self, start_step, process_index=0, process_count=1):
    rows = host_batch_size(self.global_batch_size, process_count)
    step = start_step
    while True:
      batch = self.global_batch(step)
      yield {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}
      step += 1

  def eval_batches(self, process_index=0, process_count=1, max_batches=None):
    rows = host_batch_size(self.global_batch_size, process_count)
    batches = []
    for index in range(max_batches or 2):
      batch = self.global_batch(index, seed_offset=1_000_003)  # a disjoint "dev split"
      batches.append(
          {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()})
    return batches


# ----------------------------------------------------------------------------
# seqio tasks.
# ----------------------------------------------------------------------------


@gin.configurable
class SeqioSource(BatchSource):
  """Batches of a registered seqio task, through ``tasks.get_dataset``.

  Attributes:
    task_name: a task registered by the ``tasks`` package.
    split: e.g. "train", "dev", "dev_clean".
    global_batch_size / sequence_length: rows per step and tokens per row.
    pack: pack several sequences per row (training).
    shuffle / seed: deterministic shuffling (same order for the same seed).
    shuffle_buffer_size: None = the task's default.
  """

  def __init__(self, task_name: str = gin.REQUIRED, split: str = "train",
               global_batch_size: int = 64, sequence_length: int = 1024,
               pack: bool = True, shuffle: bool = True, seed: int = 0,
               shuffle_buffer_size: Optional[int] = None):
    self.task_name = task_name
    self.split = split
    self.global_batch_size = global_batch_size
    self.sequence_length = sequence_length
    self.pack = pack
    self.shuffle = shuffle
    self.seed = seed
    self.shuffle_buffer_size = shuffle_buffer_size

  @property
  def layout(self) -> VocabLayout:
    import tasks  # pylint: disable=g-import-not-at-top  (registers the tasks; imports TF)
    return tasks.get_layout(self.task_name)

  def description(self) -> dict[str, Any]:
    # Each process reads its own shard: the order depends on how many there are.
    return {"kind": "seqio", "task": self.task_name, "split": self.split,
            "global_batch_size": self.global_batch_size,
            "sequence_length": self.sequence_length, "pack": self.pack,
            "shuffle": self.shuffle, "seed": self.seed, "num_shards": jax.process_count()}

  def _dataset(self, process_index: int, process_count: int, *, pack: bool, shuffle: bool,
               num_epochs: Optional[int]):
    import seqio  # pylint: disable=g-import-not-at-top
    import tasks  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    dataset = tasks.get_dataset(
        self.task_name, self.split, self.sequence_length,
        host_batch_size(self.global_batch_size, process_count), pack=pack, shuffle=shuffle,
        seed=self.seed, shard_info=seqio.ShardInfo(process_index, process_count),
        num_epochs=num_epochs, shuffle_buffer_size=self.shuffle_buffer_size)
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)

  def batches(self, start_step, process_index=0, process_count=1):
    dataset = self._dataset(process_index, process_count, pack=self.pack,
                            shuffle=self.shuffle, num_epochs=None).skip(start_step)
    for batch in dataset.as_numpy_iterator():
      yield {name: np.asarray(batch[name], np.int32) for name in FEATURES if name in batch}

  def eval_batches(self, process_index=0, process_count=1, max_batches=None):
    """One unshuffled, unpacked pass of this shard (model features only).

    The last batch is padded with weight-0 rows; with several processes every
    process returns the same number of batches (all-padding batches fill the
    shorter shards), since evaluation steps are collective.
    """
    from sld_jax import eval_batches  # pylint: disable=g-import-not-at-top
    return eval_batches.read_task_split(
        self.task_name, self.split, sequence_length=self.sequence_length,
        batch_size=self.global_batch_size, process_index=process_index,
        process_count=process_count, max_batches=max_batches, passthrough=False)
