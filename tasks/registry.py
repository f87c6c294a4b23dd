"""Registers the seqio tasks: embedded corpus x discretization, LibriSpeech.

Task names::

  sld_embedded_digits_whisper         digits_default, Whisper-tiny units K=128,
                                      repeats merged, word-level text (the
                                      demo's default task)
  sld_embedded_digits_logmel          digits_default, log-mel units K=128
  sld_embedded_sentences_whisper      sentences_default, Whisper K=256,
                                      unigram text model (1000 pieces)
  sld_embedded_sentences_logmel       sentences_default, log-mel K=256
  <each of the above>_smoke           the *_smoke corpus (150/30/30)
  sld_librispeech_units               a prepared dir made elsewhere with
                                      scripts/prepare_data.py (the paper's
                                      setup: imported HuBERT/WavLM units)

Splits: "train", "dev", "test" (embedded); "train", "dev_clean", "dev_other",
"test_clean", "test_other" (LibriSpeech).

Nothing is built at import time. An embedded task's data source synthesises
its corpus (``$SLD_DATA_DIR/tfds``) and prepares its units on first use,
under ``$SLD_DATA_DIR/prepared/<task name>``; the LibriSpeech task reads
``librispeech_prepared_dir()`` (gin-configurable, default
``$SLD_DATA_DIR/prepared/librispeech``) when its dataset is requested.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional

import gin
import seqio
import tensorflow as tf

from sld_jax import seqio_vocab
from sld_jax import vocab as vocab_lib
from sld_jax import wer
from sld_jax.speech import embedded_corpus
from sld_jax.speech import prepare as prepare_lib
from tasks import preprocessors

EMBEDDED_SPLITS = ("train", "dev", "test")
LIBRISPEECH_SPLITS = ("train", "dev_clean", "dev_other", "test_clean",
                      "test_other")
LIBRISPEECH_TASK = "sld_librispeech_units"
DEFAULT_TASK = "sld_embedded_digits_whisper"

_LOGMEL = {"stack_frames": 2, "mean_var_norm": True}


@dataclasses.dataclass(frozen=True)
class EmbeddedTask:
  """An embedded corpus config and how it is discretised."""

  corpus: str
  options: prepare_lib.PrepareOptions


def _embedded_tasks() -> dict[str, EmbeddedTask]:
  tasks = {}
  for domain, clusters, text_type in (("digits", 128, "word"),
                                      ("sentences", 256, "unigram")):
    for extractor, kwargs in (("whisper", {}), ("logmel", _LOGMEL)):
      options = prepare_lib.PrepareOptions(
          extractor=extractor, extractor_kwargs=kwargs,
          num_clusters=clusters, merge_repeats=True,
          text_model_type=text_type, text_vocab_size=1000)
      name = f"sld_embedded_{domain}_{extractor}"
      tasks[name] = EmbeddedTask(f"{domain}_default", options)
      tasks[name + "_smoke"] = EmbeddedTask(f"{domain}_smoke", options)
  return tasks


EMBEDDED_TASKS = _embedded_tasks()


def prepared_dir(task_name: str) -> str:
  """Where a task's prepared data lives (resolved when called)."""
  if task_name == LIBRISPEECH_TASK:
    return librispeech_prepared_dir()
  if task_name not in EMBEDDED_TASKS:
    raise ValueError(f"unknown sld task {task_name!r}; known: "
                     f"{sorted(EMBEDDED_TASKS) + [LIBRISPEECH_TASK]}")
  return os.path.join(embedded_corpus.data_root(), "prepared", task_name)


@gin.configurable
def librispeech_prepared_dir(path: Optional[str] = None) -> str:
  """The LibriSpeech prepared dir: ``path`` or $SLD_DATA_DIR/prepared/librispeech."""
  return os.path.expanduser(path or os.path.join(
      embedded_corpus.data_root(), "prepared", "librispeech"))


def ensure_prepared(task_name: str) -> str:
  """Builds an embedded task's corpus and units if needed; returns its dir."""
  out_dir = prepared_dir(task_name)
  if task_name == LIBRISPEECH_TASK:
    if not prepare_lib.is_prepared(out_dir):
      raise prepare_lib.PrepareError(
          f"task {task_name}: {out_dir} holds no prepared data. Prepare it "
          "with scripts/prepare_data.py (e.g. `units --split "
          "train=train.km:train.txt ...`) and point "
          "librispeech_prepared_dir.path (gin) or SLD_DATA_DIR at it")
    return out_dir
  spec = EMBEDDED_TASKS[task_name]
  prepare_lib.prepare(prepare_lib.EmbeddedSource(spec.corpus), out_dir,
                      spec.options)
  return out_dir


def get_layout(task_name: str) -> vocab_lib.VocabLayout:
  """The task's VocabLayout from its prepared metadata (prepares if needed)."""
  metadata = prepare_lib.load_metadata(ensure_prepared(task_name))
  return vocab_lib.VocabLayout(text_size=metadata["text_size"],
                               speech_size=metadata["speech_size"])


def _vocabulary_files(task_name: str) -> tuple[str, int]:
  out_dir = ensure_prepared(task_name)
  metadata = prepare_lib.load_metadata(out_dir)
  return (os.path.join(out_dir, metadata["files"]["text_model"]),
          metadata["speech_size"])


def _dataset_fn(task_name: str, split: str, shuffle_files: bool,
                seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed  # one file per split; examples are shuffled by seqio
  return prepare_lib.read_split(ensure_prepared(task_name), split)


def register_task(task_name: str, splits, *,
                  vocabulary: Optional[seqio.Vocabulary] = None,
                  dataset_fn: Optional[Callable[..., tf.data.Dataset]] = None
                  ) -> seqio.Task:
  """Registers (or replaces) one task reading prepared data.

  Args:
    task_name: registry name.
    splits: split names the source offers.
    vocabulary: default: a lazy ``SpeechTextVocabulary`` over the task's
      prepared text model and speech size.
    dataset_fn: default: reads ``prepared_dir(task_name)`` (preparing it
      first for embedded tasks).
  """
  vocabulary = vocabulary or seqio_vocab.SpeechTextVocabulary(
      resolver=functools.partial(_vocabulary_files, task_name), name=task_name)
  dataset_fn = dataset_fn or functools.partial(_dataset_fn, task_name)
  seqio.TaskRegistry.remove(task_name)
  return seqio.TaskRegistry.add(
      task_name,
      source=seqio.FunctionDataSource(dataset_fn=dataset_fn, splits=splits),
      preprocessors=[preprocessors.units_and_text_to_targets,
                     preprocessors.filter_over_length],
      output_features={"targets": seqio.Feature(
          vocabulary=vocabulary, add_eos=False, dtype=tf.int32)},
      metric_fns=[wer.wer_metric],
      shuffle_buffer_size=10_000)


def register_all() -> None:
  for task_name in EMBEDDED_TASKS:
    register_task(task_name, EMBEDDED_SPLITS)
  register_task(LIBRISPEECH_TASK, LIBRISPEECH_SPLITS)


register_all()
