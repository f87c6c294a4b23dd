"""Channel augmentation (sld_jax.speech.augment): each effect measured."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from sld_jax.speech import augment

SR = augment.SAMPLE_RATE


def _tone(freq_hz: float, seconds: float = 0.5) -> np.ndarray:
  t = np.arange(int(seconds * SR)) / SR
  return (0.5 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def _power(x: np.ndarray) -> float:
  return float(np.mean(np.square(x, dtype=np.float64)))


def test_identity_and_padding():
  x = _tone(440.0)
  np.testing.assert_array_equal(augment.apply(x, augment.Augmentation()), x)
  assert augment.Augmentation().id == "clean"
  padded = augment.apply(x, augment.Augmentation(lead_s=0.25, trail_s=0.1))
  assert padded.shape == (x.shape[0] + 4000 + 1600,)
  assert not padded[:4000].any() and not padded[-1600:].any()
  np.testing.assert_array_equal(padded[4000:-1600], x)


def test_telephone_band_keeps_speech_band_only():
  def kept(freq):
    x = _tone(freq)
    y = augment.telephone_channel(x)
    assert y.shape == x.shape
    return _power(y[2000:-2000]) / _power(x[2000:-2000])
  assert kept(1000.0) > 0.8
  assert kept(6000.0) < 1e-3   # above 8 kHz Nyquist/band edge: removed
  assert kept(80.0) < 0.05      # below 300 Hz: strongly attenuated


def test_mu_law_has_at_most_256_levels_and_small_relative_error():
  x = np.linspace(-1.0, 1.0, 20001).astype(np.float32)
  y = augment.mu_law_roundtrip(x)
  assert len(np.unique(y)) <= 256
  big = np.abs(x) > 0.05
  assert np.max(np.abs(y[big] - x[big]) / np.abs(x[big])) < 0.05


@pytest.mark.parametrize("kind", augment.NOISE_KINDS)
def test_noise_has_the_requested_snr(kind):
  x = _tone(500.0, seconds=1.0)
  y = augment.add_noise(x, kind, 10.0, np.random.default_rng(0))
  snr = 10 * np.log10(_power(x) / _power(y - x))
  assert abs(snr - 10.0) < 0.1


def test_pink_and_brown_noise_tilt_down():
  rng = np.random.default_rng(1)
  slopes = {}
  for kind in augment.NOISE_KINDS:
    freqs, psd = signal.welch(augment.colored_noise(SR * 4, kind, rng), fs=SR,
                              nperseg=4096)
    low = psd[(freqs > 100) & (freqs < 200)].mean()
    high = psd[(freqs > 3200) & (freqs < 6400)].mean()
    octaves = np.log2(np.sqrt(3200 * 6400) / np.sqrt(100 * 200))  # 5
    slopes[kind] = 10 * np.log10(high / low) / octaves  # dB per octave
  assert abs(slopes["white"]) < 1.0
  assert -4.0 < slopes["pink"] < -2.0    # -3 dB/octave
  assert -7.0 < slopes["brown"] < -5.0   # -6 dB/octave


def test_apply_is_deterministic_and_clipped():
  x = _tone(700.0)
  aug = augment.Augmentation(lead_s=0.1, telephone=True, mu_law=True,
                             noise="pink", snr_db=5.0, gain_db=12.0, seed=3)
  a, b = augment.apply(x, aug), augment.apply(x, aug)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (x.shape[0] + 1600,) and np.abs(a).max() <= 1.0
  other = augment.apply(x, augment.Augmentation(**{**aug.__dict__, "seed": 4}))
  assert not np.array_equal(a, other)
  assert aug.id == "pad0.10+0.00,tel,mulaw,pink@5dB,+12dB"


def test_draw_follows_the_policy():
  policy = augment.AugmentPolicy(pad_prob=0.5, telephone_prob=0.3,
                                 mu_law_prob=0.5, noise_prob=0.2)
  rng = np.random.default_rng(0)
  augs = [augment.draw(rng, policy) for _ in range(3000)]
  frac = lambda pred: np.mean([pred(a) for a in augs])
  assert abs(frac(lambda a: a.telephone) - 0.3) < 0.03
  assert abs(frac(lambda a: a.noise is not None) - 0.2) < 0.03
  assert abs(frac(lambda a: a.lead_s > 0) - 0.5) < 0.03
  assert abs(frac(lambda a: a.mu_law) - 0.15) < 0.03
  assert all(a.telephone for a in augs if a.mu_law)
  assert all(5.0 <= a.snr_db <= 30.0 for a in augs)
  rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
  assert ([augment.draw(rng_a, policy) for _ in range(5)]
          == [augment.draw(rng_b, policy) for _ in range(5)])


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="noise"):
    augment.Augmentation(noise="purple")
  with pytest.raises(ValueError, match="mu_law needs telephone"):
    augment.Augmentation(mu_law=True)
  with pytest.raises(ValueError, match="lead_s"):
    augment.Augmentation(lead_s=-1.0)
  with pytest.raises(ValueError, match="telephone_prob"):
    augment.AugmentPolicy(telephone_prob=1.5)
  with pytest.raises(ValueError, match="snr_range_db"):
    augment.AugmentPolicy(snr_range_db=(30.0, 5.0))
