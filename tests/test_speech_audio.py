"""Tests for sld_jax.speech.audio: reading, mono, resampling, speed perturbation."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import soundfile as sf

from sld_jax.speech import audio

POCKETSPHINX = "/usr/share/pocketsphinx/test/data"


def _sine(freq, rate, seconds=1.0):
  t = np.arange(int(rate * seconds)) / rate
  return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x, rate):
  spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.fft.rfftfreq(len(x), 1.0 / rate)[np.argmax(spectrum)]


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resample_to_16k_keeps_sine_frequency(rate):
  x = _sine(1000.0, rate)
  y = audio.resample(x, rate, 16000)
  assert y.dtype == np.float32
  assert abs(len(y) - 16000) <= 1
  assert abs(_peak_hz(y, 16000) - 1000.0) < 2.0
  # Amplitude survives (no gain change in the passband).
  assert abs(np.abs(y[1000:-1000]).max() - 0.5) < 0.02


def test_resample_identity_and_bad_rate():
  x = _sine(440.0, 16000)
  np.testing.assert_array_equal(audio.resample(x, 16000, 16000), x)
  with pytest.raises(ValueError, match="rates must be positive"):
    audio.resample(x, 0, 16000)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_changes_duration_and_pitch(factor):
  x = _sine(1000.0, 16000, seconds=2.0)
  y = audio.speed_perturb(x, factor)
  assert abs(len(y) - len(x) / factor) <= 1
  assert abs(_peak_hz(y, 16000) - 1000.0 * factor) < 2.0
  np.testing.assert_array_equal(y, audio.speed_perturb(x, factor))


def test_speed_perturb_identity_and_range():
  x = _sine(300.0, 16000)
  np.testing.assert_array_equal(audio.speed_perturb(x, 1.0), x)
  with pytest.raises(ValueError, match="factor"):
    audio.speed_perturb(x, 0.0)


def test_load_espeak_wav_resamples_from_22050(tmp_path):
  path = str(tmp_path / "hello.wav")
  subprocess.run(["espeak-ng", "-w", path, "hello world, this is a test"],
                 check=True)
  raw, rate = audio.read_audio(path)
  assert rate == 22050
  y = audio.load_audio(path)
  assert y.dtype == np.float32 and y.ndim == 1
  assert abs(len(y) - len(raw) * 16000 / 22050) <= 1
  assert np.abs(y).max() > 0.05


def test_stereo_flac_is_mixed_to_mono(tmp_path):
  left, right = _sine(500.0, 16000), _sine(1500.0, 16000)
  path = str(tmp_path / "stereo.flac")
  sf.write(path, np.stack([left, right], axis=1), 16000)
  wave, rate = audio.read_audio(path)
  assert wave.shape == (16000, 2) and rate == 16000
  mono = audio.load_audio(path)
  np.testing.assert_allclose(mono, (left + right) / 2, atol=2e-4)


def test_raw_pcm_needs_rate_and_reads_as_16k():
  path = os.path.join(POCKETSPHINX, "goforward.raw")
  with pytest.raises(audio.AudioError, match="goforward.raw.*raw_sample_rate"):
    audio.read_audio(path)
  wave, rate = audio.read_audio(path, raw_sample_rate=16000)
  expected = np.fromfile(path, "<i2").astype(np.float32) / 32768
  np.testing.assert_array_equal(wave, expected)
  assert rate == 16000
  y = audio.load_audio(path, raw_sample_rate=8000)  # reinterpreted, then 2x
  assert abs(len(y) - 2 * len(expected)) <= 1


def test_raw_pcm_with_odd_size_is_an_error(tmp_path):
  path = tmp_path / "odd.raw"
  path.write_bytes(b"\x00\x01\x02")
  with pytest.raises(audio.AudioError, match="odd.raw.*whole number"):
    audio.read_audio(str(path), raw_sample_rate=16000)


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00garbage" * 10,
                                     b"fLaC" + bytes(100)])
def test_corrupt_audio_names_the_file(tmp_path, content):
  path = tmp_path / "broken.flac"
  path.write_bytes(content)
  with pytest.raises(audio.AudioError, match="broken.flac"):
    audio.load_audio(str(path))
  with pytest.raises(audio.AudioError, match="broken.flac"):
    audio.audio_info(str(path))


def test_missing_and_empty_audio(tmp_path):
  with pytest.raises(audio.AudioError, match="not found: .*nope.wav"):
    audio.load_audio(str(tmp_path / "nope.wav"))
  empty = str(tmp_path / "empty.wav")
  sf.write(empty, np.zeros((0,), np.float32), 16000)
  with pytest.raises(audio.AudioError, match="empty.wav has no samples"):
    audio.load_audio(empty)


def test_to_mono_rejects_bad_rank():
  with pytest.raises(ValueError, match="to_mono"):
    audio.to_mono(np.zeros((2, 3, 4)))
