"""A held-out check on real human speech: digit strings read by a real person.

Evaluation only: these recordings are never used for training, for the
codebook or for the text model (``prepare`` fits those on "train" only), and
their audio is read from the installed Debian package, never copied into the
repository or the TFDS corpus.

Source: Debian ``asterisk-core-sounds-en`` + ``asterisk-core-sounds-en-wav``
(CC-BY-SA-3.0, Allison Smith, one US English female voice, telephone-band
8 kHz 16-bit wav), installed under ``ASTERISK_SOUNDS_DIR``. Its ``digits/N.wav``
prompts say "zero".."nine" and ``letters/o.wav`` says "oh". Each prompt is an
isolated word with its own silence around it (about 0.2-0.3 s each side), so a
digit string built by concatenating prompts sounds like a person reading the
digits one at a time, with pauses, on a phone line::

  digits "4 0 7" (zero read as "oh" at random, like the synthetic corpus)
    -> digits/4.wav + letters/o.wav + digits/7.wav     8 kHz, ~2.4 s
    -> Utterance(id="real-asterisk-00000", transcript="four oh seven",
                 waveform=<float32 [19200]>, sample_rate=8000,
                 speaker="asterisk:en_US_f_Allison")

The digit strings are drawn like the synthetic test split's (2-7 digits, from
the strings whose hash puts them in "test"), so none of them is a training
transcript either.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from sld_jax.speech import audio
from sld_jax.speech import readers

ASTERISK_SOUNDS_DIR = "/usr/share/asterisk/sounds/en_US_f_Allison"
ASTERISK_PACKAGES = "asterisk-core-sounds-en asterisk-core-sounds-en-wav"
ASTERISK_SPEAKER = "asterisk:en_US_f_Allison"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
               "eight", "nine")
OH_PROMPT = os.path.join("letters", "o.wav")


def word_prompts(sounds_dir: Optional[str] = None) -> dict[str, str]:
  """Spoken word -> prompt file: "zero".."nine" and "oh".

  ``sounds_dir`` defaults to ``ASTERISK_SOUNDS_DIR`` (read at call time).

  Raises:
    FileNotFoundError: a prompt is missing (names the file and the packages).
  """
  sounds_dir = sounds_dir or ASTERISK_SOUNDS_DIR
  prompts = {w: os.path.join(sounds_dir, "digits", f"{d}.wav")
             for d, w in enumerate(DIGIT_WORDS)}
  prompts["oh"] = os.path.join(sounds_dir, OH_PROMPT)
  missing = [p for p in prompts.values() if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"real-speech eval set: missing prompt recordings {missing}; install "
        f"the Debian packages {ASTERISK_PACKAGES} (apt-get install "
        f"{ASTERISK_PACKAGES}) or point sounds_dir at an Asterisk en sounds "
        "directory")
  return prompts


def digit_strings(count: int, *, seed: int, min_digits: int = 2,
                  max_digits: int = 7, split: str = "test"
                  ) -> list[list[str]]:
  """``count`` digit strings as word lists, drawn from ``split``'s strings.

  Zero is read "zero" or "oh" at random; the split assignment is
  ``embedded_corpus.text_split`` of the digits (so "test" strings never occur
  in the synthetic train split of the same seed).
  """
  from sld_jax.speech import embedded_corpus  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng([seed, 4242])
  strings = []
  while len(strings) < count:
    length = int(rng.integers(min_digits, max_digits + 1))
    digits = rng.integers(0, 10, size=length)
    if embedded_corpus.text_split("".join(map(str, digits)), seed) != split:
      continue
    strings.append([("oh" if rng.random() < 0.5 else "zero") if d == 0
                    else DIGIT_WORDS[d] for d in digits])
  return strings


def concatenate_prompts(words: Sequence[str], prompts: dict[str, str]
                        ) -> tuple[np.ndarray, int]:
  """The prompts of ``words`` back to back: (float32 samples, sample rate)."""
  pieces, rate = [], None
  for word in words:
    if word not in prompts:
      raise ValueError(f"no prompt recording for word {word!r}; known: "
                       f"{sorted(prompts)}")
    samples, file_rate = audio.read_audio(prompts[word])
    if rate is not None and file_rate != rate:
      raise ValueError(f"{prompts[word]}: sample rate {file_rate} Hz, the "
                       f"other prompts have {rate} Hz")
    rate = file_rate
    pieces.append(audio.to_mono(samples))
  return np.concatenate(pieces).astype(np.float32), rate


def asterisk_digit_utterances(count: int, *, seed: int = 1234,
                              sounds_dir: Optional[str] = None,
                              min_digits: int = 2, max_digits: int = 7
                              ) -> list[readers.Utterance]:
  """The real-speech eval set: ``count`` digit strings read by one person."""
  if count < 1:
    raise ValueError(f"asterisk_digit_utterances: count must be >= 1, got "
                     f"{count}")
  sounds_dir = sounds_dir or ASTERISK_SOUNDS_DIR
  prompts = word_prompts(sounds_dir)
  utterances = []
  for i, words in enumerate(digit_strings(count, seed=seed,
                                          min_digits=min_digits,
                                          max_digits=max_digits)):
    waveform, rate = concatenate_prompts(words, prompts)
    utterances.append(readers.Utterance(
        id=f"real-asterisk-{i:05d}", transcript=" ".join(words),
        waveform=waveform, sample_rate=rate, speaker=ASTERISK_SPEAKER,
        source=f"{sounds_dir} (Debian {ASTERISK_PACKAGES})"))
  return utterances
