"""Corpora to prepare: utterances per split, from TFDS or from the readers.

``prepare.prepare`` takes a ``Source``:

  EmbeddedSource("digits_default")   the synthetic TFDS corpus (built on first
                                     use), waveforms at 16 kHz; configs with
                                     ``num_real`` > 0 add an evaluation-only
                                     "real" split of real human speech
                                     (``real_speech``, 8 kHz)
  UtteranceSource({"train": [...], "dev": [...]})
                                     ``readers.Utterance`` records (LibriSpeech,
                                     manifests, imported units or features)

A source's ``kind`` says what its utterances carry: "audio", "features"
(``features_path``) or "units".
"""

from __future__ import annotations

import abc
from typing import Any, Iterator, Mapping, Optional, Sequence

import dataclasses

import numpy as np

from sld_jax.speech import embedded_corpus
from sld_jax.speech import readers
from sld_jax.speech import real_speech

REAL_SPLIT = "real"


class Source(abc.ABC):
  """A corpus to prepare: utterances per split.

  ``kind`` says what the utterances carry: "audio" (waveform or audio file),
  "features" (``features_path``) or "units".
  """

  kind: str

  @abc.abstractmethod
  def splits(self) -> tuple[str, ...]:
    """Split names; one must be "train"."""

  @abc.abstractmethod
  def num_utterances(self, split: str) -> int:
    ...

  @abc.abstractmethod
  def utterances(self, split: str) -> Iterator[readers.Utterance]:
    """The split's utterances, always in the same order."""

  @abc.abstractmethod
  def description(self) -> dict[str, Any]:
    """JSON facts identifying the corpus (stored with the options)."""


class EmbeddedSource(Source):
  """The embedded TFDS corpus (synthesised on first use)."""

  kind = "audio"

  def __init__(self, config: str | embedded_corpus.EmbeddedCorpusConfig,
               tfds_data_dir: Optional[str] = None):
    if isinstance(config, str):
      if config not in embedded_corpus.CONFIGS:
        raise ValueError(f"unknown embedded corpus config {config!r}; "
                           f"known: {sorted(embedded_corpus.CONFIGS)}")
      config = embedded_corpus.CONFIGS[config]
    self.config = config
    self.tfds_data_dir = tfds_data_dir
    self._builder = None

  @property
  def builder(self):
    if self._builder is None:
      self._builder = embedded_corpus.load_builder(
          self.config, data_dir=self.tfds_data_dir)
    return self._builder

  def splits(self):
    if self.config.num_real:
      return embedded_corpus.SPLITS + (REAL_SPLIT,)
    return embedded_corpus.SPLITS

  def num_utterances(self, split):
    if split == REAL_SPLIT:
      return self.config.num_real
    return self.config.split_size(split)

  def utterances(self, split):
    if split == REAL_SPLIT:
      yield from real_speech.asterisk_digit_utterances(
          self.config.num_real, seed=self.config.seed,
          min_digits=self.config.min_words, max_digits=self.config.max_words)
      return
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    dataset = self.builder.as_dataset(split=split, shuffle_files=False)
    where = f"{self.builder.name}/{self.config.name}/{split}"
    for example in tfds.as_numpy(dataset):
      yield readers.Utterance(
          id=example["id"].decode(), transcript=example["text"].decode(),
          waveform=example["audio"].astype(np.float32) / 32768.0,
          sample_rate=embedded_corpus.SAMPLE_RATE,
          speaker=example["speaker"].decode(), source=where)

  def description(self):
    fields = ("domain", "num_train", "num_dev", "num_test", "seed",
              "min_words", "max_words", "top_words", "speakers_per_voice")
    description = {"type": "embedded", "config": self.config.name,
                   "version": str(embedded_corpus.SldEmbeddedSpeech.VERSION),
                   **{f: getattr(self.config, f) for f in fields}}
    if self.config.robust or self.config.num_real:
      policy = self.config.augment_policy
      description.update(
          train_speed_range=list(self.config.train_speed_range),
          pause_prob=self.config.pause_prob,
          piper_share=self.config.piper_share,
          piper_speakers=self.config.piper_speakers,
          augment_policy=dataclasses.asdict(policy) if policy else None,
          real={"count": self.config.num_real,
                "source": real_speech.ASTERISK_SPEAKER})
    return description


class UtteranceSource(Source):
  """Utterances already read (e.g. by ``sld_jax.speech.readers``)."""

  def __init__(self, splits: Mapping[str, Sequence[readers.Utterance]],
               name: str = "utterances"):
    self._splits = {k: list(v) for k, v in splits.items()}
    self.name = name
    first = next((u for us in self._splits.values() for u in us), None)
    if first is None:
      raise ValueError(f"{name}: no utterances in any split")
    self.kind = _kind_of(first)
    for split, utterances in self._splits.items():
      for utt in utterances:
        if _kind_of(utt) != self.kind:
          raise ValueError(
              f"{utt.source or utt.id}: utterance {utt.id} of split {split} "
              f"carries {_kind_of(utt)}, others carry {self.kind}")

  def splits(self):
    return tuple(self._splits)

  def num_utterances(self, split):
    return len(self._splits[split])

  def utterances(self, split):
    return iter(self._splits[split])

  def description(self):
    return {"type": "utterances", "name": self.name, "kind": self.kind,
            "counts": {k: len(v) for k, v in self._splits.items()}}


def _kind_of(utt: readers.Utterance) -> str:
  if utt.units is not None:
    return "units"
  if utt.features_path is not None:
    return "features"
  return "audio"
