"""Channel augmentation of synthetic speech: what real recordings add to TTS.

TTS voices speak into a perfect microphone: full band, no noise, almost no
silence around the words. Real recordings (a telephone prompt, a laptop
microphone) differ in ways a unit model trained only on TTS never hears. An
``Augmentation`` describes one utterance's channel; ``apply`` renders it::

  Augmentation(lead_s=0.3, trail_s=0.5, telephone=True, mu_law=True,
               noise="pink", snr_db=15.0, gain_db=-6.0, seed=7)

  waveform [N] at 16 kHz
    -> pad: 0.3 s of silence before, 0.5 s after     [N + 12800]
    -> telephone: 300-3400 Hz band-pass, down to 8 kHz and back up, 8-bit
       mu-law quantisation (G.711-like)
    -> noise: pink noise at 15 dB SNR (against the speech power, measured
       before padding so silence does not lower it)
    -> gain: x10^(-6/20), clipped to [-1, 1]

Every step is optional (``Augmentation()`` is the identity) and
deterministic: the noise comes from ``numpy.random.default_rng(seed)``.
``draw(rng, policy)`` picks one utterance's augmentation from an
``AugmentPolicy`` (probabilities and ranges).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from scipy import signal

from sld_jax.speech import audio

SAMPLE_RATE = 16000
TELEPHONE_RATE = 8000
TELEPHONE_BAND_HZ = (300.0, 3400.0)
NOISE_KINDS = ("white", "pink", "brown")
MU = 255


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """One utterance's channel; the default is the identity.

  Attributes:
    lead_s, trail_s: seconds of silence added before / after the speech.
    telephone: band-pass 300-3400 Hz and resample through 8 kHz.
    mu_law: with ``telephone``: 8-bit mu-law quantisation (G.711).
    noise: None or one of ``NOISE_KINDS`` (spectral tilt 0, -3, -6 dB/oct).
    snr_db: speech-to-noise power ratio of the added noise.
    gain_db: overall level change (clipped to [-1, 1] afterwards).
    seed: seeds the noise.
  """

  lead_s: float = 0.0
  trail_s: float = 0.0
  telephone: bool = False
  mu_law: bool = False
  noise: Optional[str] = None
  snr_db: float = 20.0
  gain_db: float = 0.0
  seed: int = 0

  def __post_init__(self):
    if self.lead_s < 0 or self.trail_s < 0:
      raise ValueError(f"Augmentation: lead_s and trail_s must be >= 0, got "
                       f"{self.lead_s}, {self.trail_s}")
    if self.noise is not None and self.noise not in NOISE_KINDS:
      raise ValueError(f"Augmentation.noise must be None or one of "
                       f"{NOISE_KINDS}, got {self.noise!r}")
    if self.mu_law and not self.telephone:
      raise ValueError("Augmentation.mu_law needs telephone=True")

  @property
  def id(self) -> str:
    """Short description, e.g. ``pad0.30+0.50,tel,mulaw,pink@15dB,-6dB``."""
    parts = []
    if self.lead_s or self.trail_s:
      parts.append(f"pad{self.lead_s:.2f}+{self.trail_s:.2f}")
    if self.telephone:
      parts.append("tel")
    if self.mu_law:
      parts.append("mulaw")
    if self.noise:
      parts.append(f"{self.noise}@{self.snr_db:.0f}dB")
    if self.gain_db:
      parts.append(f"{self.gain_db:+.0f}dB")
    return ",".join(parts) or "clean"


def colored_noise(num_samples: int, kind: str,
                  rng: np.random.Generator) -> np.ndarray:
  """Unit-power noise whose power spectrum falls as f^-alpha.

  white: alpha 0; pink: alpha 1 (-3 dB/octave); brown: alpha 2 (-6 dB/oct).
  Made by shaping white Gaussian noise in the frequency domain.
  """
  if kind not in NOISE_KINDS:
    raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
  white = rng.standard_normal(num_samples)
  if kind != "white" and num_samples > 1:
    alpha = {"pink": 1.0, "brown": 2.0}[kind]
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(num_samples)
    freqs[0] = freqs[1]
    spectrum /= freqs ** (alpha / 2)
    white = np.fft.irfft(spectrum, n=num_samples)
  power = np.mean(white ** 2)
  return (white / np.sqrt(power if power > 0 else 1.0)).astype(np.float32)


def add_noise(waveform: np.ndarray, kind: str, snr_db: float,
              rng: np.random.Generator,
              speech_power: Optional[float] = None) -> np.ndarray:
  """``waveform`` plus ``kind`` noise at ``snr_db`` below ``speech_power``.

  ``speech_power`` defaults to the mean square of ``waveform``.
  """
  if speech_power is None:
    speech_power = float(np.mean(np.square(waveform))) if waveform.size else 0.0
  noise = colored_noise(waveform.shape[0], kind, rng)
  scale = np.sqrt(speech_power / 10.0 ** (snr_db / 10.0))
  return (waveform + scale * noise).astype(np.float32)


def telephone_channel(waveform: np.ndarray, *, sample_rate: int = SAMPLE_RATE,
                      mu_law: bool = False) -> np.ndarray:
  """A narrow-band telephone line: 300-3400 Hz, 8 kHz, optional mu-law.

  Returns the waveform at ``sample_rate`` again, same length.
  """
  sos = signal.butter(4, TELEPHONE_BAND_HZ, btype="bandpass", fs=sample_rate,
                      output="sos")
  band = signal.sosfilt(sos, waveform).astype(np.float32)
  narrow = audio.resample(band, sample_rate, TELEPHONE_RATE)
  if mu_law:
    narrow = mu_law_roundtrip(narrow)
  wide = audio.resample(narrow, TELEPHONE_RATE, sample_rate)
  out = np.zeros_like(waveform, dtype=np.float32)
  n = min(out.shape[0], wide.shape[0])
  out[:n] = wide[:n]
  return out


def mu_law_roundtrip(waveform: np.ndarray) -> np.ndarray:
  """Quantises to 8-bit mu-law (mu=255) and back, as G.711 does."""
  x = np.clip(waveform, -1.0, 1.0)
  compressed = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
  codes = np.round((compressed + 1.0) / 2.0 * MU)
  y = codes / MU * 2.0 - 1.0
  return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(MU)) / MU
          ).astype(np.float32)


def apply(waveform: np.ndarray, aug: Augmentation, *,
          sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Renders ``aug`` on a float32 mono waveform; see the module docstring."""
  waveform = np.asarray(waveform, np.float32)
  speech_power = float(np.mean(np.square(waveform))) if waveform.size else 0.0
  lead = int(round(aug.lead_s * sample_rate))
  trail = int(round(aug.trail_s * sample_rate))
  if lead or trail:
    waveform = np.concatenate([np.zeros(lead, np.float32), waveform,
                               np.zeros(trail, np.float32)])
  if aug.telephone:
    waveform = telephone_channel(waveform, sample_rate=sample_rate,
                                 mu_law=aug.mu_law)
  if aug.noise:
    waveform = add_noise(waveform, aug.noise, aug.snr_db,
                         np.random.default_rng(aug.seed), speech_power)
  if aug.gain_db:
    waveform = waveform * np.float32(10.0 ** (aug.gain_db / 20.0))
  return np.clip(waveform, -1.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class AugmentPolicy:
  """How often and how strongly training utterances are augmented.

  Each effect is drawn independently per utterance.

  Attributes:
    pad_prob: probability of leading/trailing silence, each uniform in
      ``pad_range_s``.
    telephone_prob: probability of the telephone channel; mu-law then with
      probability ``mu_law_prob``.
    noise_prob: probability of noise (kind uniform over ``NOISE_KINDS``) at an
      SNR uniform in ``snr_range_db``.
    gain_range_db: uniform overall gain.
  """

  pad_prob: float = 0.6
  pad_range_s: tuple[float, float] = (0.05, 0.6)
  telephone_prob: float = 0.4
  mu_law_prob: float = 0.5
  noise_prob: float = 0.4
  snr_range_db: tuple[float, float] = (5.0, 30.0)
  gain_range_db: tuple[float, float] = (-12.0, 3.0)

  def __post_init__(self):
    for name in ("pad_prob", "telephone_prob", "mu_law_prob", "noise_prob"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"AugmentPolicy.{name} must be in [0, 1], got {value}")
    for name in ("pad_range_s", "snr_range_db", "gain_range_db"):
      lo, hi = getattr(self, name)
      if lo > hi:
        raise ValueError(f"AugmentPolicy.{name} must be (low, high), got "
                         f"{(lo, hi)}")


def draw(rng: np.random.Generator, policy: AugmentPolicy) -> Augmentation:
  """One utterance's augmentation; always consumes the same number of draws."""
  u = rng.random(5)
  lead, trail, snr, gain = (rng.uniform(*policy.pad_range_s),
                            rng.uniform(*policy.pad_range_s),
                            rng.uniform(*policy.snr_range_db),
                            rng.uniform(*policy.gain_range_db))
  kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
  seed = int(rng.integers(2**31))
  pad = u[0] < policy.pad_prob
  telephone = bool(u[1] < policy.telephone_prob)
  return Augmentation(
      lead_s=round(float(lead), 2) if pad else 0.0,
      trail_s=round(float(trail), 2) if pad else 0.0,
      telephone=telephone,
      mu_law=telephone and bool(u[2] < policy.mu_law_prob),
      noise=kind if u[3] < policy.noise_prob else None,
      snr_db=round(float(snr), 1),
      gain_db=round(float(gain), 1) if u[4] < 0.5 else 0.0,
      seed=seed)
