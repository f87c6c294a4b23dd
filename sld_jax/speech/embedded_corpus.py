"""The embedded speech corpus: synthetic English speech built on this machine.

No speech corpus can be downloaded here, so the default data is synthesised
with offline TTS (``sld_jax.speech.tts``: espeak-ng and flite) as a
tensorflow-datasets builder, ``SldEmbeddedSpeech``, built on first use and
cached under ``$SLD_DATA_DIR/tfds`` (default ``~/.cache/sld_jax/tfds``).

Two text domains:

  digits     connected digit strings of 2-7 digits spoken as words, 0 read
             as "zero" or "oh" at random: "four oh seven one".
  sentences  English example sentences quoted in WordNet glosses (Debian
             ``wordnet-base``), 4-20 words, every word among the pool's
             ``top_words`` most frequent words: "she writes books for
             children". WordNet 3.0 Copyright 2006 by Princeton University;
             see docs/corpora.md for the licence notice.

Splits are disjoint twice over:

* by voice: dev and test are spoken only by voices never used in train
  (``split_voices``): dev by espeak-ng accent en-029 and flite slt, test by
  espeak-ng accent en-gb-scotland and flite kal16, each accent with two
  variants train also uses and two variants it never uses. Train uses six
  other espeak-ng accents x 10 variants plus flite awb and rms (flite kal,
  the same speaker as kal16, is not used at all).
* by text: every digit string / sentence belongs to one split, chosen by a
  hash of its text and the seed (80% train, 10% dev, 10% test), so dev and
  test transcripts never occur in train (digit strings are compared as
  digits: "oh" and "zero" are the same string).

Every base voice gives ``speakers_per_voice`` pseudo-speakers with a speaking
rate in [0.85, 1.2] and pitch factor in [0.85, 1.2] drawn from the seed.
Everything (texts, voices, assignment, audio) is a deterministic function of
the config; ``corpus_plan(config)`` returns the full plan without
synthesising anything.

Features: id, speaker (the ``Voice.id``), text (lower-case, normalised),
audio (int16, 16 kHz), duration (seconds).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import glob
import hashlib
import os
import re
from typing import Iterator, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from sld_jax.speech import text_normalize
from sld_jax.speech import tts

SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")
DOMAINS = ("digits", "sentences")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
               "eight", "nine")
WORDNET_GLOB = "/usr/share/wordnet/data.*"

TRAIN_ACCENTS = ("en-us", "en-gb", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                 "en-gb-x-rp", "en-us-nyc")
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "klatt")
TRAIN_FLITE = ("awb", "rms")
HELD_OUT = {
    # split: (espeak accent, its variants, flite voices)
    "dev": ("en-029", ("", "f2", "m6", "f4"), ("slt",)),
    "test": ("en-gb-scotland", ("m3", "f1", "m7", "f5"), ("kal16",)),
}
SPEED_RANGE = (0.85, 1.2)
PITCH_RANGE = (0.85, 1.2)


def data_root() -> str:
  """``$SLD_DATA_DIR`` or ``~/.cache/sld_jax``: root of all cached data."""
  return os.path.expanduser(os.environ.get("SLD_DATA_DIR",
                                           "~/.cache/sld_jax"))


def default_tfds_dir() -> str:
  return os.path.join(data_root(), "tfds")


@dataclasses.dataclass(eq=False)
class EmbeddedCorpusConfig(tfds.core.BuilderConfig):
  """Size and content of one embedded corpus.

  Attributes:
    domain: "digits" or "sentences".
    num_train, num_dev, num_test: utterances per split.
    seed: fixes texts, text split assignment, pseudo-speakers and pairing.
    min_words, max_words: utterance length in words (digits per string for
      "digits").
    top_words: "sentences" only: keep sentences whose words are all among
      the pool's ``top_words`` most frequent words.
    speakers_per_voice: pseudo-speakers (rate/pitch settings) per base voice.
  """

  domain: str = "digits"
  num_train: int = 150
  num_dev: int = 30
  num_test: int = 30
  seed: int = 1234
  min_words: int = 2
  max_words: int = 7
  top_words: int = 5000
  speakers_per_voice: int = 2

  def __post_init__(self):
    if self.domain not in DOMAINS:
      raise ValueError(f"EmbeddedCorpusConfig.domain must be one of {DOMAINS}, "
                       f"got {self.domain!r}")
    if not 1 <= self.min_words <= self.max_words:
      raise ValueError(f"need 1 <= min_words <= max_words, got "
                       f"{self.min_words}, {self.max_words}")
    for field in ("num_train", "num_dev", "num_test", "speakers_per_voice"):
      if getattr(self, field) < 1:
        raise ValueError(f"EmbeddedCorpusConfig.{field} must be >= 1")

  def split_size(self, split: str) -> int:
    return {"train": self.num_train, "dev": self.num_dev,
            "test": self.num_test}[split]


def _config(name, domain, sizes, **kwargs):
  words = {"digits": (2, 7), "sentences": (4, 20)}[domain]
  return EmbeddedCorpusConfig(
      name=name, domain=domain, num_train=sizes[0], num_dev=sizes[1],
      num_test=sizes[2], min_words=words[0], max_words=words[1],
      description=f"{domain}, {sizes[0]}/{sizes[1]}/{sizes[2]} utterances",
      **kwargs)


SMOKE_SIZES = (150, 30, 30)
DEFAULT_SIZES = (6000, 300, 300)
# The objective comparison's corpus (sld_jax.comparison): the default train
# set with dev and test large enough to resolve a 1-point WER difference.
COMPARE_SIZES = (6000, 2000, 2000)
CONFIGS = {
    c.name: c for c in (
        _config("digits_smoke", "digits", SMOKE_SIZES),
        _config("digits_default", "digits", DEFAULT_SIZES),
        _config("digits_compare", "digits", COMPARE_SIZES),
        _config("sentences_smoke", "sentences", SMOKE_SIZES),
        _config("sentences_default", "sentences", DEFAULT_SIZES),
    )
}


# ----------------------------------------------------------------------------
# Texts.


def _hash_fraction(key: str, seed: int) -> float:
  digest = hashlib.md5(f"{seed}\x00{key}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def text_split(key: str, seed: int) -> str:
  """The split a text belongs to: 80% train, 10% dev, 10% test by hash."""
  fraction = _hash_fraction(key, seed)
  if fraction < 0.1:
    return "dev"
  if fraction < 0.2:
    return "test"
  return "train"


def _digit_texts(split: str, count: int, config: EmbeddedCorpusConfig,
                 rng: np.random.Generator) -> list[tuple[str, str]]:
  """``count`` (spoken text, transcript) digit strings of ``split``."""
  texts = []
  while len(texts) < count:
    length = int(rng.integers(config.min_words, config.max_words + 1))
    digits = rng.integers(0, 10, size=length)
    if text_split("".join(map(str, digits)), config.seed) != split:
      continue
    words = [("oh" if rng.random() < 0.5 else "zero") if d == 0
             else DIGIT_WORDS[d] for d in digits]
    texts.append((" ".join(words), " ".join(words)))
  return texts


_SENTENCE_CHARS = re.compile(r"^[A-Za-z][A-Za-z ,;:'\-]*[.?!]?$")
_QUOTED = re.compile(r'"([^"]+)"')


@functools.lru_cache(maxsize=4)
def wordnet_sentences(top_words: int, min_words: int, max_words: int,
                      pattern: str = WORDNET_GLOB) -> tuple[tuple[str, str], ...]:
  """WordNet example sentences as sorted (spoken text, transcript) pairs.

  Sentences are the double-quoted examples after the first ';' of each gloss,
  made only of letters, spaces and light punctuation (no digits, which TTS
  would read differently from the transcript), with ``min_words`` to
  ``max_words`` words after ``normalize_transcript``, all among the
  ``top_words`` most frequent words of that pool. One spoken form is kept per
  distinct transcript.
  """
  files = sorted(glob.glob(pattern))
  if not files:
    raise FileNotFoundError(
        f"no WordNet data files match {pattern}; the 'sentences' corpus needs "
        "the Debian package wordnet-base (apt-get install wordnet-base)")
  spoken_by_text = {}
  for path in files:
    with open(path, encoding="latin-1") as f:
      for line in f:
        if line.startswith("  ") or "|" not in line:
          continue
        gloss = line.split("|", 1)[1]
        if ";" not in gloss:
          continue
        for quoted in _QUOTED.findall(gloss.split(";", 1)[1]):
          spoken = quoted.strip()
          if not _SENTENCE_CHARS.match(spoken):
            continue
          text = text_normalize.normalize_transcript(spoken)
          if min_words <= len(text.split()) <= max_words:
            spoken_by_text.setdefault(text, spoken)
  counts = collections.Counter(
      w for text in spoken_by_text for w in text.split())
  ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
  vocabulary = {w for w, _ in ranked[:top_words]}
  return tuple(sorted(
      (spoken, text) for text, spoken in spoken_by_text.items()
      if all(w in vocabulary for w in text.split())))


def _sentence_texts(split: str, count: int, config: EmbeddedCorpusConfig,
                    rng: np.random.Generator) -> list[tuple[str, str]]:
  pool = [pair for pair in wordnet_sentences(config.top_words,
                                             config.min_words,
                                             config.max_words)
          if text_split(pair[1], config.seed) == split]
  if not pool:
    raise ValueError(f"no WordNet sentences fall in split {split!r} "
                     f"(top_words={config.top_words})")
  if count <= len(pool):
    order = rng.permutation(len(pool))[:count]
  else:
    logging.warning("sentences %s: %d utterances from %d distinct sentences; "
                    "some sentences repeat (with other voices)", split, count,
                    len(pool))
    order = np.concatenate([rng.permutation(len(pool))
                            for _ in range(-(-count // len(pool)))])[:count]
  return [pool[int(i)] for i in order]


# ----------------------------------------------------------------------------
# Voices.


def split_base_voices(split: str) -> list[tts.Voice]:
  """The base voices (default rate and pitch) of a split."""
  if split == "train":
    voices = [tts.Voice("espeak", accent, variant)
              for accent in TRAIN_ACCENTS for variant in TRAIN_VARIANTS]
    voices += [tts.Voice("flite", name) for name in TRAIN_FLITE]
    return voices
  accent, variants, flite_names = HELD_OUT[split]
  return ([tts.Voice("espeak", accent, v) for v in variants]
          + [tts.Voice("flite", name) for name in flite_names])


def split_voices(split: str, config: EmbeddedCorpusConfig) -> list[tts.Voice]:
  """Pseudo-speakers of a split: each base voice at seeded rates/pitches."""
  voices = []
  for base in split_base_voices(split):
    rng = np.random.default_rng(
        int(_hash_fraction(f"{split}/{base.base_id}", config.seed) * 2**32))
    for _ in range(config.speakers_per_voice):
      speed = round(float(rng.uniform(*SPEED_RANGE)), 2)
      pitch = round(float(rng.uniform(*PITCH_RANGE)), 2)
      voices.append(dataclasses.replace(base, speed=speed, pitch=pitch))
  return voices


# ----------------------------------------------------------------------------
# The plan: what each utterance says and who says it.


@dataclasses.dataclass(frozen=True)
class PlannedUtterance:
  id: str
  voice: tts.Voice
  spoken: str        # what the TTS engine reads
  text: str          # the transcript (normalised, lower case)


def corpus_plan(config: EmbeddedCorpusConfig
                ) -> dict[str, list[PlannedUtterance]]:
  """Every utterance of every split, without synthesising audio."""
  plan = {}
  for split_index, split in enumerate(SPLITS):
    rng = np.random.default_rng([config.seed, split_index])
    count = config.split_size(split)
    make_texts = (_digit_texts if config.domain == "digits"
                  else _sentence_texts)
    texts = make_texts(split, count, config, rng)
    voices = split_voices(split, config)
    # Every pseudo-speaker speaks about equally often, in a seeded order.
    speaker_order = np.concatenate([
        rng.permutation(len(voices)) for _ in range(-(-count // len(voices)))
    ])[:count]
    plan[split] = [
        PlannedUtterance(id=f"{config.domain}-{split}-{i:05d}",
                         voice=voices[int(speaker_order[i])],
                         spoken=spoken, text=text)
        for i, (spoken, text) in enumerate(texts)]
  return plan


def synthesize_utterance(utterance: PlannedUtterance) -> np.ndarray:
  """int16 16 kHz samples of one planned utterance."""
  try:
    waveform = tts.synthesize(utterance.spoken, utterance.voice,
                              sample_rate=SAMPLE_RATE)
  except (RuntimeError, ValueError) as e:
    raise RuntimeError(f"embedded corpus utterance {utterance.id}: {e}") from e
  return np.clip(np.round(waveform * 32767.0), -32768, 32767).astype(np.int16)


def synthesize_all(utterances: Sequence[PlannedUtterance], *,
                   num_workers: int = 2, desc: str = "synthesising"
                   ) -> Iterator[tuple[PlannedUtterance, np.ndarray]]:
  """(utterance, int16 audio) in order, synthesised by ``num_workers`` threads.

  Each thread waits on its own TTS subprocess, so threads are enough to keep
  ``num_workers`` cores busy.
  """
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    audio = pool.map(synthesize_utterance, utterances)
    for utterance, samples in tqdm.tqdm(zip(utterances, audio),
                                        total=len(utterances), desc=desc,
                                        unit="utt", mininterval=2.0):
      yield utterance, samples


# ----------------------------------------------------------------------------
# The tensorflow-datasets builder.


class SldEmbeddedSpeech(tfds.core.GeneratorBasedBuilder):
  """Synthetic English speech (espeak-ng + flite) for digits and sentences."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = list(CONFIGS.values())
  DEFAULT_CONFIG_NAME = "digits_default"
  NUM_WORKERS = min(2, os.cpu_count() or 1)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "speaker": tfds.features.Text(),
            "text": tfds.features.Text(),
            # int16 samples at 16 kHz, stored as raw bytes (tfds Audio
            # would store them as varint int64s, ~3x larger).
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                          encoding="bytes"),
            "duration": np.float32,
        }),
        supervised_keys=("audio", "text"),
        homepage="https://wordnet.princeton.edu/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    for engine in tts.ENGINES:
      tts.check_engine(engine)
    plan = corpus_plan(self.builder_config)
    return {split: self._generate_examples(plan[split], split)
            for split in SPLITS}

  def _generate_examples(self, utterances, split):
    desc = f"{self.builder_config.name}/{split}"
    for utterance, samples in synthesize_all(
        utterances, num_workers=self.NUM_WORKERS, desc=desc):
      yield utterance.id, {
          "id": utterance.id,
          "speaker": utterance.voice.id,
          "text": utterance.text,
          "audio": samples,
          "duration": np.float32(samples.shape[0] / SAMPLE_RATE),
      }


def load_builder(config: str | EmbeddedCorpusConfig = "digits_default", *,
                 data_dir: Optional[str] = None,
                 prepare: bool = True) -> SldEmbeddedSpeech:
  """The corpus builder, synthesised into ``data_dir`` first if needed.

  Args:
    config: a config name from ``CONFIGS`` or an ``EmbeddedCorpusConfig``
      (e.g. another seed or size; give it a distinct name).
    data_dir: TFDS data dir (default ``default_tfds_dir()``).
    prepare: run ``download_and_prepare`` (a no-op once built).
  """
  if isinstance(config, str):
    if config not in CONFIGS:
      raise ValueError(f"unknown embedded corpus config {config!r}; known: "
                       f"{sorted(CONFIGS)}")
    config = CONFIGS[config]
  builder = SldEmbeddedSpeech(config=config,
                              data_dir=data_dir or default_tfds_dir())
  if prepare:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
