"""Offline text-to-speech voices behind one interface (espeak-ng and flite).

A ``Voice`` names an engine, a base voice and the speaking rate / pitch
factors; its ``id`` is a stable string used as the speaker id of the
synthesised corpus::

  Voice("espeak", "en-gb-scotland", "f2", speed=1.1, pitch=0.9).id
    == "espeak:en-gb-scotland+f2:s1.10:p0.90"
  Voice("flite", "slt").id == "flite:slt:s1.00:p1.00"

``synthesize(text, voice)`` runs the engine in a subprocess into a temporary
wav file and returns a mono float32 waveform in [-1, 1] at 16 kHz (espeak-ng
writes 22.05 kHz and flite's ``kal`` 8 kHz; both are resampled). Both engines
are deterministic: the same text and voice give the same samples.

How the factors reach the engines:

  espeak-ng  ``-s round(175 * speed)`` words per minute (175 is its default),
             ``-p round(50 * pitch)`` on its 0-99 pitch scale (50 default);
             variants (m1-m7, f1-f5, klatt, ...) are appended as ``+variant``.
  flite      ``--setf duration_stretch=1/speed``; pitch as ``--setf
             f0_shift=pitch`` for the clustergen voices (awb, rms, slt) and
             ``--setf int_f0_target_mean=`` the voice's mean F0 times pitch for
             the diphone voices (kal, kal16).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import wave

import numpy as np

from sld_jax.speech import audio

SAMPLE_RATE = 16000
ENGINES = ("espeak", "flite")

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd", "en-gb-x-rp", "en-029", "en-us-nyc")
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2",
                   "f3", "f4", "f5", "klatt", "klatt2", "klatt3", "klatt4")
ESPEAK_DEFAULT_WPM = 175
ESPEAK_DEFAULT_PITCH = 50

FLITE_VOICES = ("awb", "rms", "slt", "kal", "kal16")
_FLITE_DIPHONE_F0_MEAN = {"kal": 95.0, "kal16": 95.0}

_APT_PACKAGE = {"espeak": "espeak-ng", "flite": "flite"}
_BINARY = {"espeak": "espeak-ng", "flite": "flite"}


@dataclasses.dataclass(frozen=True)
class Voice:
  """One synthetic speaker.

  Attributes:
    engine: "espeak" or "flite".
    name: espeak-ng accent (``ESPEAK_ACCENTS``) or flite voice
      (``FLITE_VOICES``).
    variant: espeak-ng voice variant ("m3", "f2", "klatt", ...); "" for the
      accent's own voice and always "" for flite.
    speed: speaking-rate factor (1.0 = the engine's default rate).
    pitch: pitch factor (1.0 = the voice's default pitch).
  """

  engine: str
  name: str
  variant: str = ""
  speed: float = 1.0
  pitch: float = 1.0

  def __post_init__(self):
    if self.engine not in ENGINES:
      raise ValueError(f"Voice.engine must be one of {ENGINES}, got "
                       f"{self.engine!r}")
    if self.engine == "espeak":
      if self.name not in ESPEAK_ACCENTS:
        raise ValueError(f"unknown espeak-ng accent {self.name!r}; known: "
                         f"{ESPEAK_ACCENTS}")
      if self.variant not in ESPEAK_VARIANTS:
        raise ValueError(f"unknown espeak-ng variant {self.variant!r}; known: "
                         f"{ESPEAK_VARIANTS}")
    else:
      if self.name not in FLITE_VOICES:
        raise ValueError(f"unknown flite voice {self.name!r}; known: "
                         f"{FLITE_VOICES}")
      if self.variant:
        raise ValueError(f"flite voices have no variants, got "
                         f"variant={self.variant!r}")
    if not 0.5 <= self.speed <= 2.0:
      raise ValueError(f"Voice.speed must be in [0.5, 2], got {self.speed}")
    if not 0.5 <= self.pitch <= 2.0:
      raise ValueError(f"Voice.pitch must be in [0.5, 2], got {self.pitch}")

  @property
  def base_id(self) -> str:
    """Engine, voice and variant without the rate/pitch factors."""
    variant = f"+{self.variant}" if self.variant else ""
    return f"{self.engine}:{self.name}{variant}"

  @property
  def id(self) -> str:
    """Stable speaker id, e.g. ``espeak:en-us+m3:s1.05:p0.95``."""
    return f"{self.base_id}:s{self.speed:.2f}:p{self.pitch:.2f}"

  @classmethod
  def from_id(cls, voice_id: str) -> Voice:
    """Inverse of ``id``."""
    try:
      engine, name_variant, speed, pitch = voice_id.split(":")
      name, _, variant = name_variant.partition("+")
      if not (speed.startswith("s") and pitch.startswith("p")):
        raise ValueError("rate/pitch fields must start with 's' and 'p'")
      return cls(engine, name, variant, float(speed[1:]), float(pitch[1:]))
    except ValueError as e:
      raise ValueError(f"bad voice id {voice_id!r} (expected "
                       f"'engine:name[+variant]:sSPEED:pPITCH'): {e}") from e

  def command(self, text: str, wav_path: str) -> list[str]:
    """The engine's command line that writes ``text`` to ``wav_path``."""
    if self.engine == "espeak":
      name = self.name + (f"+{self.variant}" if self.variant else "")
      pitch = min(99, max(0, round(ESPEAK_DEFAULT_PITCH * self.pitch)))
      return ["espeak-ng", "-v", name, "-s",
              str(round(ESPEAK_DEFAULT_WPM * self.speed)), "-p", str(pitch),
              "-w", wav_path, "--", text]
    features = ["--setf", f"duration_stretch={1.0 / self.speed:.4f}"]
    if self.name in _FLITE_DIPHONE_F0_MEAN:
      mean = _FLITE_DIPHONE_F0_MEAN[self.name] * self.pitch
      features += ["--setf", f"int_f0_target_mean={mean:.2f}"]
    else:
      features += ["--setf", f"f0_shift={self.pitch:.4f}"]
    return ["flite", "-voice", self.name, *features, "-t", text,
            "-o", wav_path]


def check_engine(engine: str) -> None:
  """Raises a clear error if the engine's binary is not installed."""
  if engine not in ENGINES:
    raise ValueError(f"unknown TTS engine {engine!r}; known: {ENGINES}")
  if shutil.which(_BINARY[engine]) is None:
    raise FileNotFoundError(
        f"TTS engine {engine!r} needs the '{_BINARY[engine]}' program "
        f"(Debian/Ubuntu: apt-get install {_APT_PACKAGE[engine]})")


def read_wav_int16(path: str) -> tuple[np.ndarray, int]:
  """Mono 16-bit PCM wav -> (int16 samples, sample rate)."""
  with wave.open(path, "rb") as f:
    if f.getsampwidth() != 2 or f.getnchannels() != 1:
      raise ValueError(
          f"{path}: expected mono 16-bit PCM, got {f.getnchannels()} "
          f"channel(s) of {8 * f.getsampwidth()} bits")
    rate = f.getframerate()
    samples = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
  return samples.astype(np.int16), rate


def synthesize(text: str, voice: Voice, *,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Speaks ``text`` with ``voice``: float32 mono waveform at ``sample_rate``.

  Raises:
    ValueError: empty text, or the engine produced no audio.
    RuntimeError: the engine failed (its stderr is included).
  """
  if not text.strip():
    raise ValueError(f"cannot synthesise empty text with voice {voice.id}")
  check_engine(voice.engine)
  with tempfile.TemporaryDirectory(prefix="sld_tts_") as tmp:
    wav_path = os.path.join(tmp, "out.wav")
    result = subprocess.run(voice.command(text, wav_path), capture_output=True,
                            check=False)
    if result.returncode != 0 or not os.path.exists(wav_path):
      raise RuntimeError(
          f"{voice.engine} failed for voice {voice.id} on text {text!r} "
          f"(exit {result.returncode}): "
          f"{result.stderr.decode('utf-8', 'replace').strip()}")
    samples, rate = read_wav_int16(wav_path)
  if samples.size == 0:
    raise ValueError(f"{voice.id} produced no audio for text {text!r}")
  waveform = samples.astype(np.float32) / 32768.0
  if rate != sample_rate:
    waveform = audio.resample(waveform, rate, sample_rate)
  return waveform.astype(np.float32, copy=False)
