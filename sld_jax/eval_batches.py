"""Eval utterances as fixed-shape host batches: prompts, references, sources.

Eval batches are host numpy dicts of unpacked seqio decoder features, one
utterance per row, a fixed number ``B`` of rows (the last batch is padded
with all-zero dummy rows, whose results are dropped)::

  decoder_target_tokens  [B, L]  units <speech_end> text <text_end>, 0-padded
  decoder_input_tokens   [B, L]  the targets shifted right (0 first)
  decoder_loss_weights   [B, L]  1 on real tokens; an all-zero row is a dummy
  speech_length [B], id [B], text [B], truncated_units [B]
                                 optional passthrough features

Prompts are what training feeds before the first text token
(``sld_jax.model_inputs``): ``0 u1 .. uN <speech_end>``, the first
``speech_length + 1`` decoder inputs. Example, ``VocabLayout(text_size=14)``
(<speech_end>=14, unit u -> 15 + u), B=3 with one dummy row, L=8::

  targets        [[18, 15, 14,  5,  7,  1,  0,  0],   speech_length [3, 2, 0]
                  [16, 14,  9,  1,  0,  0,  0,  0],
                  [ 0,  0,  0,  0,  0,  0,  0,  0]]
  inputs         [[ 0, 18, 15, 14,  5,  7,  1,  0],
                  [ 0, 16, 14,  9,  1,  0,  0,  0],
                  [ 0,  0,  0,  0,  0,  0,  0,  0]]
  prompt_lengths [4, 3, 2]                            (dummy rows: 2)
  make_prompts(..., width=5)
                 [[ 0, 18, 15, 14,  0],
                  [ 0, 16, 14,  0,  0],
                  [ 0, 14,  0,  0,  0]]               (dummy: an empty utterance)
  reference_ids  [5, 7] and [9]   (targets from prompt_length - 1; used only
                                   when there is no ``text``)

Prompts are padded to a power-of-two bucket (``prompt_bucket``, >= 16) so
that decoding compiles once per bucket, not once per batch.

Sources: ``read_task_split`` is the one reader of a seqio task split (for
``sld_jax.eval``, training's dev evaluators and ``SeqioSource.eval_batches``):
one unshuffled, unpacked pass over this process's shard
(``tasks.get_dataset(pack=False)``), with ids and reference texts, and with
several processes the same number of batches on every process (all-padding
batches fill the shorter shards), since evaluation steps are collective.
``read_source`` reads a training pipeline's dev source.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from absl import logging
import jax
import numpy as np

from sld_jax import cross_process
from sld_jax import input_pipeline
from sld_jax import model_inputs
from sld_jax.vocab import VocabLayout

HostBatch = dict[str, np.ndarray]
Detokenizer = Callable[[Sequence[int]], str]
MIN_PROMPT_BUCKET = 16


def as_str(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def real_rows(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """[B] bool: rows holding an utterance (dummy padding rows have no weight)."""
  return np.asarray(batch["decoder_loss_weights"]).any(axis=1)


def prompt_lengths(batch: Mapping[str, np.ndarray], layout: VocabLayout,
                   where: str = "batch") -> np.ndarray:
  """[B] prompt lengths (0 + units + <speech_end>); 2 for dummy rows.

  Raises:
    ValueError: a real row has no <speech_end>, or disagrees with its
      ``speech_length`` feature.
  """
  targets = np.asarray(batch["decoder_target_tokens"])
  real = real_rows(batch)
  is_end = targets == layout.speech_end_id
  lengths = model_inputs.speech_lengths(targets, layout)
  for row in np.flatnonzero(real & ~is_end.any(axis=1)):
    raise ValueError(
        f"{where}: row {row} ({row_name(batch, row)}) has no <speech_end> "
        f"(id {layout.speech_end_id}) in decoder_target_tokens; expected "
        f"`units <speech_end> text <text_end>`, got {targets[row][:12].tolist()}...")
  if "speech_length" in batch:
    given = np.asarray(batch["speech_length"])
    for row in np.flatnonzero(real & (given != lengths)):
      raise ValueError(
          f"{where}: row {row} ({row_name(batch, row)}) has speech_length "
          f"{given[row]} but its first <speech_end> is at position {lengths[row] - 1}")
  return model_inputs.prompt_length(np.where(real, lengths, 1)).astype(np.int32)


def row_name(batch: Mapping[str, np.ndarray], row: int) -> str:
  return f"id {as_str(batch['id'][row])!r}" if "id" in batch else "no id"


def prompt_bucket(length: int, limit: int) -> int:
  """Power of two >= ``length`` (at least 16), at most ``limit``."""
  return min(max(MIN_PROMPT_BUCKET, 1 << max(int(length) - 1, 0).bit_length()), limit)


def make_prompts(batch: Mapping[str, np.ndarray], lengths: np.ndarray, width: int,
                 layout: VocabLayout) -> np.ndarray:
  """[B, width] prompts: the first ``lengths`` decoder inputs, 0 after.

  Built by ``model_inputs.batch_prompts`` from the targets, after checking
  that the batch's ``decoder_input_tokens`` (what teacher forcing feeds) are
  those targets shifted right; dummy rows get ``[0, <speech_end>]``.
  """
  real = real_rows(batch)
  targets = np.where(real[:, None], np.asarray(batch["decoder_target_tokens"]), 0)
  inputs = batch.get("decoder_input_tokens")
  if inputs is not None:
    inputs = np.where(real[:, None], np.asarray(inputs), 0)
  prompts, built = model_inputs.batch_prompts(targets, width, layout, inputs)
  if not np.array_equal(built, lengths):
    raise ValueError(f"make_prompts: lengths {np.asarray(lengths).tolist()} are not the "
                     f"prompt lengths of the batch {built.tolist()} (use prompt_lengths)")
  return prompts


def reference_ids(targets: np.ndarray, prompt_length: int, layout: VocabLayout) -> list[int]:
  """The transcript ids of one target row: from the target at the prompt's last
  position (``prompt_length - 1``, predicted from <speech_end>), before <text_end>."""
  text = targets[prompt_length - 1:]
  end = np.flatnonzero(text == layout.eos_id)
  return text[:end[0] if end.size else len(text)].tolist()


def unpack_rows(batches: Iterable[Mapping[str, np.ndarray]], rows: int) -> list[HostBatch]:
  """Packed rows (several ``decoder_segment_ids``) -> one utterance per row.

  Batches without segment ids are returned as they are. The utterances are
  re-batched into ``rows`` rows, the last batch padded with dummy rows.
  """
  batches = list(batches)
  if not batches or "decoder_segment_ids" not in batches[0]:
    return [dict(b) for b in batches]
  sequences = []
  for batch in batches:
    targets, segments = batch["decoder_target_tokens"], batch["decoder_segment_ids"]
    for row in range(targets.shape[0]):
      for segment in np.unique(segments[row][segments[row] > 0]):
        sequences.append(targets[row][segments[row] == segment])
  length = batches[0]["decoder_target_tokens"].shape[1]
  out = []
  for start in range(0, len(sequences), rows):
    chunk = sequences[start:start + rows]
    batch = {name: np.zeros((rows, length), np.int32) for name in model_inputs.REQUIRED_FEATURES}
    for row, sequence in enumerate(chunk):
      batch["decoder_target_tokens"][row, :len(sequence)] = sequence
      batch["decoder_loss_weights"][row, :len(sequence)] = 1
    batch["decoder_input_tokens"] = model_inputs.decoder_input_tokens(
        batch["decoder_target_tokens"])
    out.append(batch)
  return out


def ids_as_words(ids: Sequence[int]) -> str:
  """Detokenizer for data without a text model: ``[5, 7] -> "5 7"``."""
  return " ".join(str(int(i)) for i in ids)


# Sources.


def eval_splits(task_name: str) -> list[str]:
  """Every split of a registered task except the training ones."""
  return [s for s in _task(task_name).splits if not s.startswith("train")]


def _task(task_name: str):
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks  # noqa: F401  (registers the tasks)  pylint: disable=g-import-not-at-top
  try:
    return seqio.get_mixture_or_task(task_name)
  except ValueError as e:
    known = sorted(n for n in seqio.TaskRegistry.names() if n.startswith("sld_"))
    raise ValueError(f"unknown task {task_name!r}; registered sld tasks: {known}") from e


def check_split(task_name: str, split: str) -> None:
  splits = list(_task(task_name).splits)
  if split not in splits:
    raise ValueError(f"task {task_name!r} has no split {split!r}; its splits are {splits}")


def task_detokenizer(task_name: str) -> Detokenizer:
  """The task's text vocabulary decoder (drops non-text ids, stops at <text_end>)."""
  vocabulary = _task(task_name).output_features["targets"].vocabulary
  return lambda ids: vocabulary.decode([int(i) for i in ids])


def read_task_split(task_name: str, split: str, *, sequence_length: int, batch_size: int,
                    process_index: int = 0, process_count: int = 1,
                    max_batches: Optional[int] = None, passthrough: bool = True
                    ) -> list[HostBatch]:
  """One unshuffled pass over this process's shard of a task split, unpacked.

  ``batch_size`` is global; this process reads its shard of the examples in
  ``batch_size / process_count`` rows per batch, the last batch padded with
  dummy rows; every process returns the same number of batches. Examples
  longer than ``sequence_length`` keep the first ``L - 2 - len(text)``
  units, as released (``tasks.preprocessors.truncate_speech_to_fit``): the
  split is scored in full, and ``truncated_units`` says by how much each row
  was cut (``truncation_counts``).

  Args:
    task_name / split: a registered task and one of its splits.
    sequence_length: tokens per row.
    batch_size: global rows per batch.
    process_index / process_count: this process's shard.
    max_batches: stop after this many batches.
    passthrough: keep ``id``, ``speaker``, ``text``, ``speech_length``,
      ``truncated_units`` (else only the model features).

  Raises:
    ValueError: an unknown task or split, or this shard has no example.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks  # pylint: disable=g-import-not-at-top
  check_split(task_name, split)
  rows = input_pipeline.host_batch_size(batch_size, process_count)
  dataset = tasks.get_dataset(
      task_name, split, sequence_length, rows, pack=False, shuffle=False, seed=None,
      shard_info=seqio.ShardInfo(process_index, process_count), num_epochs=1,
      drop_remainder=False)
  batches = []
  for batch in dataset.as_numpy_iterator():
    if not passthrough:
      batch = {k: v for k, v in batch.items() if k in model_inputs.FEATURES}
    batch = {k: (np.asarray(v, np.int32) if np.asarray(v).dtype.kind in "iu" else np.asarray(v))
             for k, v in batch.items()}
    batches.append(input_pipeline.pad_rows(batch, rows))
    if max_batches is not None and len(batches) == max_batches:
      break
  if not batches:
    raise ValueError(
        f"task {task_name!r} split {split!r} has no examples of at most {sequence_length} "
        f"tokens" + (f" for process {process_index} of {process_count}; use fewer processes"
                     if process_count > 1 else ""))
  batches = _pad_batch_count(batches)
  if passthrough:
    truncated, units = truncation_counts(batches)
    (logging.warning if truncated else logging.info)(
        "%s/%s: %d utterances to score, %d with speech truncated to fit %d tokens "
        "(%d units dropped)", task_name, split, int(sum(real_rows(b).sum() for b in batches)),
        truncated, sequence_length, units)
  return batches


def _pad_batch_count(batches: list[HostBatch]) -> list[HostBatch]:
  """Appends all-padding batches up to the most batches of any process."""
  missing = int(cross_process.all_max(len(batches))) - len(batches)
  if not missing:
    return batches
  return batches + [{k: np.zeros_like(v) for k, v in batches[0].items()}] * missing


TRUNCATION_METRICS = ("num_truncated_utterances", "truncated_units")


def truncation_counts(batches: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
  """``[utterances whose speech was truncated to fit, units dropped]`` over real rows.

  Batches without ``truncated_units`` (e.g. synthetic sources) count 0; the
  names are ``TRUNCATION_METRICS`` (the keys in each split's metrics.json).
  """
  counts = np.zeros(2, np.int64)
  for batch in batches:
    if "truncated_units" in batch:
      dropped = np.asarray(batch["truncated_units"])[real_rows(batch)]
      counts += [int(np.sum(dropped > 0)), int(np.sum(dropped))]
  return counts


def read_source(source: input_pipeline.BatchSource, max_batches: Optional[int] = None
                ) -> tuple[list[HostBatch], Detokenizer, str]:
  """``(batches, detokenize, name)`` of a training pipeline's dev source.

  A ``SeqioSource`` is read with its passthrough features (ids, reference
  text) and decoded with the task's vocabulary; other sources (synthetic)
  are unpacked into one utterance per row and their ids printed as words.
  """
  index, count = jax.process_index(), jax.process_count()
  if isinstance(source, input_pipeline.SeqioSource):
    batches = read_task_split(source.task_name, source.split,
                              sequence_length=source.sequence_length,
                              batch_size=source.global_batch_size, process_index=index,
                              process_count=count, max_batches=max_batches)
    return (batches, task_detokenizer(source.task_name),
            f"{source.task_name}/{source.split}")
  rows = input_pipeline.host_batch_size(source.global_batch_size, count)
  batches = _pad_batch_count(unpack_rows(source.eval_batches(index, count, max_batches), rows))
  return batches, ids_as_words, type(source).__name__
