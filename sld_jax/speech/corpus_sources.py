"""Corpora to prepare: utterances per split, from TFDS or from the readers.

``prepare.prepare`` takes a ``Source``:

  EmbeddedSource("digits_default")   the synthetic TFDS corpus (built on first
                                     use), waveforms at 16 kHz
  UtteranceSource({"train": [...], "dev": [...]})
                                     ``readers.Utterance`` records (LibriSpeech,
                                     manifests, imported units or features)

A source's ``kind`` says what its utterances carry: "audio", "features"
(``features_path``) or "units".
"""

from __future__ import annotations

import abc
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from sld_jax.speech import embedded_corpus
from sld_jax.speech import readers


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
    return embedded_corpus.SPLITS

  def num_utterances(self, split):
    return self.config.split_size(split)

  def utterances(self, split):
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
    return {"type": "embedded", "config": self.config.name,
            "version": str(embedded_corpus.SldEmbeddedSpeech.VERSION),
            **{f: getattr(self.config, f) for f in fields}}


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
