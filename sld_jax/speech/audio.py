"""Audio input: read, mix down to mono, resample to 16 kHz, speed-perturb.

Waveforms are float32 numpy arrays in [-1, 1]: ``[samples]`` for mono,
``[samples, channels]`` straight from a multi-channel file.

  load_audio("a.flac")                      -> float32 [n] at 16 kHz
  load_audio("a.raw", raw_sample_rate=8000) -> 16-bit LE PCM, resampled to 16 kHz
  speed_perturb(x, 0.9)                     -> len(x) / 0.9 samples, pitch lower

Any file that cannot be read raises ``AudioError`` naming the file, and so
does a truncated one: a WAV whose ``data`` chunk header promises more bytes
than the file holds (libsndfile would quietly read the part that is there),
or a FLAC that decodes to fewer samples than its STREAMINFO header says.
"""

from __future__ import annotations

import fractions
import os
import struct

import numpy as np
from scipy import signal
import soundfile as sf

TARGET_SAMPLE_RATE = 16000
RAW_EXTENSIONS = (".raw", ".pcm")


class AudioError(ValueError):
  """An audio file is missing, unreadable, corrupt or empty."""


_STREAMING_SIZES = (0, 0xFFFFFFFF)  # data size unknown when the WAV was written


def check_wav_size(path: str) -> None:
  """Raises ``AudioError`` if a RIFF/WAVE file is shorter than its header says.

  Walks the chunks: ``RIFF <size> WAVE`` then ``<id> <size> <payload>``...
  until ``data``; its declared size must fit in the bytes that follow. Files
  written to a pipe (size 0 or 0xFFFFFFFF) cannot be checked and pass.
  """
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    header = f.read(12)
    if len(header) < 12 or header[:4] not in (b"RIFF", b"RIFX") or header[8:12] != b"WAVE":
      return
    order = "<" if header[:4] == b"RIFF" else ">"
    offset = 12
    while offset + 8 <= file_size:
      f.seek(offset)
      chunk_id, size = struct.unpack(order + "4sI", f.read(8))
      if chunk_id == b"data":
        available = file_size - offset - 8
        if size not in _STREAMING_SIZES and size > available:
          raise AudioError(
              f"audio file {path} is truncated: its WAV header promises {size} bytes of "
              f"audio data but the file holds {available} ({available / size:.0%})")
        return
      offset += 8 + size + (size & 1)
    raise AudioError(f"audio file {path} is truncated: no complete 'data' chunk after its "
                     "WAV header")


def _check_complete(path: str, decoded_frames: int) -> None:
  """A FLAC (or other format with a length header) that decodes short is truncated."""
  if path.lower().endswith(".wav"):
    return
  try:
    declared = sf.info(path).frames
  except (sf.LibsndfileError, RuntimeError, TypeError):
    return
  if 0 < decoded_frames < declared:
    raise AudioError(f"audio file {path} is truncated: its header declares {declared} "
                     f"samples but only {decoded_frames} could be decoded")


def read_audio(path: str | os.PathLike, *, raw_sample_rate: int | None = None,
               raw_channels: int = 1) -> tuple[np.ndarray, int]:
  """Reads an audio file as float32 samples and its sample rate.

  Formats soundfile knows (wav, flac, ogg, ...) are read with it. Headerless
  16-bit little-endian PCM (``.raw``/``.pcm``, or any file when
  ``raw_sample_rate`` is given) needs the sample rate spelled out.

  Returns:
    (waveform [samples] or [samples, channels], sample_rate).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AudioError(f"audio file not found: {path}")
  is_raw = raw_sample_rate is not None or path.lower().endswith(RAW_EXTENSIONS)
  if is_raw:
    if raw_sample_rate is None:
      raise AudioError(f"{path}: headerless PCM needs raw_sample_rate=...")
    if os.path.getsize(path) % (2 * raw_channels):
      raise AudioError(
          f"{path}: size {os.path.getsize(path)} bytes is not a whole number "
          f"of 16-bit PCM frames of {raw_channels} channel(s)")
    data = np.fromfile(path, dtype="<i2")
    waveform = (data.astype(np.float32) / 32768.0).reshape(-1, raw_channels)
    if raw_channels == 1:
      waveform = waveform[:, 0]
    sample_rate = int(raw_sample_rate)
  else:
    check_wav_size(path)
    try:
      waveform, sample_rate = sf.read(path, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
      raise AudioError(f"cannot read audio file {path}: {e}") from e
    _check_complete(path, waveform.shape[0])
  if waveform.shape[0] == 0:
    raise AudioError(f"audio file {path} has no samples")
  if not np.all(np.isfinite(waveform)):
    raise AudioError(f"audio file {path} contains NaN or Inf samples")
  return waveform, int(sample_rate)


def audio_info(path: str | os.PathLike) -> tuple[int, float]:
  """(sample rate, duration in seconds) from the header; AudioError if bad."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AudioError(f"audio file not found: {path}")
  check_wav_size(path)
  try:
    info = sf.info(path)
  except (sf.LibsndfileError, RuntimeError, TypeError) as e:
    raise AudioError(f"cannot read audio file {path}: {e}") from e
  if info.frames <= 0:
    raise AudioError(f"audio file {path} has no samples")
  return int(info.samplerate), float(info.duration)


def to_mono(waveform: np.ndarray) -> np.ndarray:
  """[samples] or [samples, channels] -> [samples] (mean of the channels)."""
  waveform = np.asarray(waveform, np.float32)
  if waveform.ndim == 1:
    return waveform
  if waveform.ndim != 2:
    raise ValueError(f"to_mono: expected [samples] or [samples, channels], got "
                     f"shape {waveform.shape}")
  return waveform.mean(axis=1, dtype=np.float32)


def _ratio(numerator: float, denominator: float) -> tuple[int, int]:
  frac = fractions.Fraction(numerator) / fractions.Fraction(denominator)
  frac = frac.limit_denominator(1000)
  return frac.numerator, frac.denominator


def resample(waveform: np.ndarray, orig_rate: int,
             target_rate: int) -> np.ndarray:
  """Polyphase resampling (scipy ``resample_poly``, Kaiser-windowed FIR).

  Output length is ``ceil(len * target_rate / orig_rate)``, e.g. 8000 samples
  at 8 kHz -> 16000 samples at 16 kHz; 22050 at 22.05 kHz -> 16000.
  """
  if orig_rate <= 0 or target_rate <= 0:
    raise ValueError(f"resample: rates must be positive, got {orig_rate} -> "
                     f"{target_rate}")
  waveform = np.asarray(waveform, np.float32)
  if orig_rate == target_rate:
    return waveform
  up, down = _ratio(target_rate, orig_rate)
  return signal.resample_poly(waveform, up, down, axis=0).astype(np.float32)


def load_audio(path: str | os.PathLike, *,
               target_sample_rate: int = TARGET_SAMPLE_RATE,
               raw_sample_rate: int | None = None) -> np.ndarray:
  """Reads a file, mixes to mono, resamples to ``target_sample_rate``."""
  waveform, sample_rate = read_audio(path, raw_sample_rate=raw_sample_rate)
  return resample(to_mono(waveform), sample_rate, target_sample_rate)


def speed_perturb(waveform: np.ndarray, factor: float) -> np.ndarray:
  """Plays the audio ``factor`` times faster, pitch included (sox ``speed``).

  The samples are reinterpreted as recorded at ``rate * factor`` and
  resampled back to ``rate``, so the result has ``len / factor`` samples:
  factor 0.9 -> 1.11x longer and lower; 1.1 -> 0.91x as long and higher.
  Deterministic (pure polyphase filtering, no dithering).
  """
  if not 0.1 <= factor <= 10.0:
    raise ValueError(
        f"speed_perturb: factor must be in [0.1, 10], got {factor}")
  waveform = np.asarray(waveform, np.float32)
  if factor == 1.0:
    return waveform
  up, down = _ratio(1.0, factor)
  return signal.resample_poly(waveform, up, down, axis=0).astype(np.float32)
