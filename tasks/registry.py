"""Registers the seqio tasks: embedded corpus x discretization, LibriSpeech.

Task names::

  sld_embedded_digits_whisper         digits_default, Whisper-tiny units K=128,
                                      repeats merged, word-level text (the
                                      demo's default task)
  sld_embedded_digits_logmel          digits_default, log-mel units K=128
  sld_embedded_sentences_whisper      sentences_default, Whisper K=256,
                                      unigram text model (1000 pieces)
  sld_embedded_sentences_logmel       sentences_default, log-mel K=256
  sld_embedded_digits_robust_whisper  digits_robust (slower voices, pauses,
                                      Piper, channel augmentation), Whisper
                                      K=128; plus an eval-only "real" split
                                      of real human speech (the demo's task)
  <each of the above>_smoke           the *_smoke corpus (150/30/30)
  sld_embedded_digits_*_compare       digits_compare: 6000/2000/2000, for the
                                      objective comparison (sld_jax.comparison)
  sld_librispeech_units               a prepared dir made elsewhere with
                                      scripts/prepare_data.py (the paper's
                                      setup: imported HuBERT/WavLM units)
  sld_librispeech_units_gpt2          the same prepared dir, its text encoded
                                      with a pretrained GPT-2's own BPE
                                      (``gpt2_tokenizer_dir()``), as the paper
                                      did with GPT-2 medium

Splits: "train", "dev", "test" (embedded; digits_robust adds "real"); "train", "dev_clean", "dev_other",
"test_clean", "test_other" (LibriSpeech).

Nothing is built at import time. An embedded task's data source synthesises
its corpus (``$SLD_DATA_DIR/tfds``) and prepares its units on first use,
under ``$SLD_DATA_DIR/prepared/<task name>``; the LibriSpeech tasks read
``librispeech_prepared_dir()`` (gin-configurable, default
``$SLD_DATA_DIR/prepared/librispeech``) when their dataset is requested.

Every task reads its prepared TFRecord shards through a
``seqio.TFExampleDataSource`` whose file patterns resolve on first use
(``PreparedFilePatterns``): with ``seqio.ShardInfo(i, n)`` each process
reads every n-th shard ("Sharding at the data source: i+1 of n"), the shard
order is shuffled with the seed before the examples are, and a prepared
dir of the older single-file layout is read too (seqio then shards its
examples instead).

The vocabularies are lazy too: ``sld_librispeech_units`` uses the prepared
SentencePiece text model, ``sld_librispeech_units_gpt2`` the GPT-2 BPE of
``gpt2_tokenizer_dir()`` (gin ``gpt2_tokenizer_dir.path``, else
``$SLD_GPT2_DIR``; a Hugging Face GPT-2 model dir holds its tokenizer) with
the prepared K. With the released GPT-2 (50257 ids) and K = 6000::

  layout = VocabLayout(text_size=50259, speech_size=6000)
  targets = units + 50260, 50259 (<speech_end>), GPT-2 ids + 3, 1 (<text_end>)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Mapping, Optional

import gin
import seqio
import tensorflow as tf

from sld_jax import gpt2_vocab
from sld_jax import seqio_vocab
from sld_jax import vocab as vocab_lib
from sld_jax.speech import embedded_corpus
from sld_jax.speech import prepare as prepare_lib
from tasks import preprocessors

EMBEDDED_SPLITS = ("train", "dev", "test")
LIBRISPEECH_SPLITS = ("train", "dev_clean", "dev_other", "test_clean",
                      "test_other")
LIBRISPEECH_TASK = "sld_librispeech_units"
LIBRISPEECH_GPT2_TASK = "sld_librispeech_units_gpt2"
LIBRISPEECH_TASKS = (LIBRISPEECH_TASK, LIBRISPEECH_GPT2_TASK)
GPT2_DIR_ENV = "SLD_GPT2_DIR"
DEFAULT_TASK = "sld_embedded_digits_whisper"

_LOGMEL = {"stack_frames": 2, "mean_var_norm": True}


@dataclasses.dataclass(frozen=True)
class EmbeddedTask:
  """An embedded corpus config and how it is discretised."""

  corpus: str
  options: prepare_lib.PrepareOptions
  splits: tuple[str, ...] = ("train", "dev", "test")


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
      if domain == "digits":
        tasks[name + "_compare"] = EmbeddedTask("digits_compare", options)
  robust = EmbeddedTask("digits_robust", tasks["sld_embedded_digits_whisper"]
                        .options, splits=("train", "dev", "test", "real"))
  tasks["sld_embedded_digits_robust_whisper"] = robust
  tasks["sld_embedded_digits_robust_whisper_smoke"] = dataclasses.replace(
      robust, corpus="digits_robust_smoke")
  return tasks


EMBEDDED_TASKS = _embedded_tasks()


def prepared_dir(task_name: str) -> str:
  """Where a task's prepared data lives (resolved when called)."""
  if task_name in LIBRISPEECH_TASKS:
    return librispeech_prepared_dir()
  if task_name not in EMBEDDED_TASKS:
    raise ValueError(f"unknown sld task {task_name!r}; known: "
                     f"{sorted(EMBEDDED_TASKS) + list(LIBRISPEECH_TASKS)}")
  return os.path.join(embedded_corpus.data_root(), "prepared", task_name)


@gin.configurable
def librispeech_prepared_dir(path: Optional[str] = None) -> str:
  """The LibriSpeech prepared dir: ``path`` or $SLD_DATA_DIR/prepared/librispeech."""
  return os.path.expanduser(path or os.path.join(
      embedded_corpus.data_root(), "prepared", "librispeech"))


@gin.configurable
def gpt2_tokenizer_dir(path: Optional[str] = None) -> str:
  """The GPT-2 tokenizer dir of the ``*_gpt2`` tasks: ``path`` or $SLD_GPT2_DIR.

  Any Hugging Face GPT-2 dir will do (``tokenizer.json`` or ``vocab.json`` +
  ``merges.txt``; its ``config.json`` vocab_size, when present, sets the
  number of GPT-2 rows): the experiments bind ``path`` to ``%INIT_FROM`` so
  the text ids are the pretrained model's own.

  Raises:
    ValueError: neither ``path`` nor $SLD_GPT2_DIR is set.
  """
  path = path or os.environ.get(GPT2_DIR_ENV)
  if not path:
    raise ValueError(
        "no GPT-2 tokenizer directory for the GPT-2 text vocabulary: set "
        f"gpt2_tokenizer_dir.path (gin, e.g. --gin.INIT_FROM=\\\"/path/to/gpt2\\\" in "
        f"the librispeech_* experiments) or the environment variable {GPT2_DIR_ENV}")
  return os.path.expanduser(path)


def ensure_prepared(task_name: str) -> str:
  """Builds an embedded task's corpus and units if needed; returns its dir."""
  out_dir = prepared_dir(task_name)
  if task_name in LIBRISPEECH_TASKS:
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
  """The VocabLayout of a registered task's vocabulary (prepares if needed).

  The layout is the vocabulary's, so it is right for both text vocabularies:
  the prepared SentencePiece model (text_size from the prepared metadata) or
  GPT-2 BPE (text_size = GPT-2 vocab - 1 + 3).
  """
  if task_name in EMBEDDED_TASKS or task_name in LIBRISPEECH_TASKS:
    ensure_prepared(task_name)  # builds an embedded task; a clear error if missing
  task = seqio.get_mixture_or_task(task_name)
  return task.output_features["targets"].vocabulary.layout


def _vocabulary_files(task_name: str) -> tuple[str, int]:
  out_dir = ensure_prepared(task_name)
  metadata = prepare_lib.load_metadata(out_dir)
  return (os.path.join(out_dir, metadata["files"]["text_model"]),
          metadata["speech_size"])


def _gpt2_vocabulary_files(task_name: str) -> tuple[str, int]:
  metadata = prepare_lib.load_metadata(ensure_prepared(task_name))
  return gpt2_tokenizer_dir(), metadata["speech_size"]


def gpt2_vocabulary(task_name: str) -> gpt2_vocab.Gpt2SpeechTextVocabulary:
  """A lazy GPT-2 BPE vocabulary over the task's prepared K, resolved on first use."""
  return gpt2_vocab.Gpt2SpeechTextVocabulary(
      resolver=functools.partial(_gpt2_vocabulary_files, task_name), name=task_name)


class PreparedFilePatterns(Mapping[str, str]):
  """split -> glob of a task's prepared shards, resolved (and prepared) on lookup.

  seqio's ``FileDataSource`` looks a pattern up only in ``list_shards`` /
  ``get_dataset``, so registering a task builds nothing, and
  ``$SLD_DATA_DIR`` / ``librispeech_prepared_dir`` are read when data is.
  """

  def __init__(self, task_name: str, splits):
    self._task_name = task_name
    self._splits = tuple(splits)

  def __getitem__(self, split: str) -> str:
    if split not in self._splits:
      raise KeyError(split)
    return prepare_lib.split_pattern(ensure_prepared(self._task_name), split)

  def __iter__(self):
    return iter(self._splits)

  def __len__(self) -> int:
    return len(self._splits)

  def __repr__(self) -> str:
    return f"PreparedFilePatterns({self._task_name!r}, {self._splits})"


def prepared_data_source(task_name: str, splits) -> seqio.TFExampleDataSource:
  """The shards of ``prepared_dir(task_name)`` as a seqio file data source."""
  return seqio.TFExampleDataSource(
      PreparedFilePatterns(task_name, splits),
      feature_description=prepare_lib.FEATURE_SPEC)


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
    dataset_fn: a ``seqio.FunctionDataSource`` function to read instead
      (tests); default: the TFRecord shards of ``prepared_dir(task_name)``
      (preparing it first for embedded tasks), ``prepared_data_source``.
  """
  vocabulary = vocabulary or seqio_vocab.SpeechTextVocabulary(
      resolver=functools.partial(_vocabulary_files, task_name), name=task_name)
  if dataset_fn is None:
    source = prepared_data_source(task_name, splits)
  else:
    source = seqio.FunctionDataSource(dataset_fn=dataset_fn, splits=splits)
  seqio.TaskRegistry.remove(task_name)
  return seqio.TaskRegistry.add(
      task_name,
      source=source,
      preprocessors=[preprocessors.units_and_text_to_targets,
                     preprocessors.truncate_speech_to_fit],
      output_features={"targets": seqio.Feature(
          vocabulary=vocabulary, add_eos=False, dtype=tf.int32)},
      shuffle_buffer_size=10_000)


def register_librispeech_tasks() -> None:
  """(Re-)registers the LibriSpeech tasks with fresh, unresolved vocabularies.

  A vocabulary resolves its files once; re-register after pointing
  ``librispeech_prepared_dir`` or ``gpt2_tokenizer_dir`` elsewhere in the
  same process.
  """
  register_task(LIBRISPEECH_TASK, LIBRISPEECH_SPLITS)
  register_task(LIBRISPEECH_GPT2_TASK, LIBRISPEECH_SPLITS,
                vocabulary=gpt2_vocabulary(LIBRISPEECH_GPT2_TASK))


def register_all() -> None:
  for task_name, spec in EMBEDDED_TASKS.items():
    register_task(task_name, spec.splits)
  register_librispeech_tasks()


register_all()
