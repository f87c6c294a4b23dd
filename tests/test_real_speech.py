"""The real-speech eval set builder (sld_jax.speech.real_speech) on a fake
Asterisk sounds tree made here, and its "real" split of the embedded source."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from sld_jax.speech import corpus_sources
from sld_jax.speech import embedded_corpus as ec
from sld_jax.speech import real_speech

WORDS = real_speech.DIGIT_WORDS + ("oh",)


def _fake_sounds(root, rate=8000) -> dict[str, int]:
  """digits/0..9.wav and letters/o.wav, each a tone of its own length."""
  lengths = {}
  for i, word in enumerate(WORDS):
    path = (os.path.join(root, "letters", "o.wav") if word == "oh"
            else os.path.join(root, "digits", f"{i}.wav"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = rate // 4 + 100 * i
    sf.write(path, (0.1 * np.sin(np.arange(n) * (i + 1) / 10)).astype(
        np.float32), rate, subtype="PCM_16")
    lengths[word] = n
  return lengths


def test_digit_strings_are_read_from_the_prompts(tmp_path):
  lengths = _fake_sounds(str(tmp_path))
  utts = real_speech.asterisk_digit_utterances(40, seed=1234,
                                               sounds_dir=str(tmp_path))
  assert len(utts) == 40 and len({u.id for u in utts}) == 40
  for u in utts:
    words = u.transcript.split()
    assert 2 <= len(words) <= 7 and set(words) <= set(WORDS)
    assert u.sample_rate == 8000
    assert u.waveform.shape == (sum(lengths[w] for w in words),)
    assert u.speaker == real_speech.ASTERISK_SPEAKER
    # 16 kHz for the extractor, through the Utterance's own resampling
    assert u.load_waveform().shape[0] == 2 * u.waveform.shape[0]
  seen = {w for u in utts for w in u.transcript.split()}
  assert {"oh", "zero"} <= seen
  again = real_speech.asterisk_digit_utterances(40, seed=1234,
                                                sounds_dir=str(tmp_path))
  assert [u.transcript for u in again] == [u.transcript for u in utts]


def test_digit_strings_are_never_train_texts():
  strings = real_speech.digit_strings(200, seed=1234)
  train = {"".join(str(ec.DIGIT_WORDS.index(w)) if w in ec.DIGIT_WORDS
                   else "0" for w in u.text.split())
           for u in ec.corpus_plan(ec.CONFIGS["digits_robust_smoke"])["train"]}
  keys = {"".join("0" if w == "oh" else str(ec.DIGIT_WORDS.index(w))
                  for w in s) for s in strings}
  assert not keys & train
  assert all(ec.text_split(k, 1234) == "test" for k in keys)


def test_missing_prompts_name_the_packages(tmp_path):
  with pytest.raises(FileNotFoundError, match="asterisk-core-sounds-en"):
    real_speech.asterisk_digit_utterances(3, sounds_dir=str(tmp_path))


def test_embedded_source_offers_an_eval_only_real_split(tmp_path, monkeypatch):
  _fake_sounds(str(tmp_path))
  monkeypatch.setattr(real_speech, "ASTERISK_SOUNDS_DIR", str(tmp_path))
  source = corpus_sources.EmbeddedSource("digits_robust_smoke")
  assert source.splits() == ("train", "dev", "test", "real")
  assert source.num_utterances("real") == 30
  real = list(source.utterances("real"))  # read without building the corpus
  assert len(real) == 30 and all(u.id.startswith("real-") for u in real)
  assert source.description()["real"]["count"] == 30
  plain = corpus_sources.EmbeddedSource("digits_default")
  assert plain.splits() == ec.SPLITS
  assert "real" not in plain.description()  # prepared dirs stay valid


def test_demo_task_scores_the_real_split_with_dev_and_test():
  import seqio  # pylint: disable=g-import-not-at-top
  from sld_jax import eval_batches  # pylint: disable=g-import-not-at-top
  import tasks  # pylint: disable=g-import-not-at-top
  for name, spec in tasks.EMBEDDED_TASKS.items():
    # the task offers exactly the splits its corpus source prepares
    assert tuple(seqio.get_mixture_or_task(name).splits) == \
        corpus_sources.EmbeddedSource(spec.corpus).splits(), name
  assert eval_batches.eval_splits("sld_embedded_digits_robust_whisper") == [
      "dev", "test", "real"]
  assert eval_batches.eval_splits("sld_embedded_digits_whisper") == ["dev", "test"]
