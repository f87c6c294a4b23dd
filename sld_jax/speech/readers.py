"""Corpus readers: LibriSpeech trees, TSV manifests, unit files, .npy features.

Each reader returns a ``ReadResult``: a sequence of ``Utterance`` records plus
the messages of the items it skipped. With ``on_error="raise"`` (default) the
first bad item raises ``CorpusError`` naming the file (and line); with
``on_error="skip"`` bad items are left out, logged, and listed in
``ReadResult.skipped``, never dropped silently. Problems that leave nothing
sensible to skip (a missing directory, unit and transcript files of different
lengths) raise either way.

Formats (see docs/data.md):

  read_librispeech   LibriSpeech/<subset>/<spk>/<chapter>/<spk>-<chapter>-<n>.flac
                     + <spk>-<chapter>.trans.txt lines "<spk>-<chapter>-<n> TEXT"
  read_manifest      TSV lines "audio_path<TAB>transcript[<TAB>speaker]",
                     optional header "audio<TAB>transcript[<TAB>speaker]",
                     relative paths relative to the TSV
  read_fairseq_units units file: one utterance per line, "3 3 17 ..." or
                     "utt_id<TAB>3 3 17 ..."; transcripts file line-aligned,
                     "TEXT" or "utt_id<TAB>TEXT" (ids, if both have them, must
                     match)
  read_npy_features  a directory of <id>.npy (any depth) + transcripts.tsv lines
                     "id<TAB>transcript[<TAB>speaker]", or a TSV manifest
                     "features.npy<TAB>transcript[<TAB>speaker]"
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import pathlib
from typing import Callable, Sequence

from absl import logging
import numpy as np

from sld_jax.speech import audio as audio_lib


class CorpusError(ValueError):
  """A corpus file, line or directory is missing or malformed."""


@dataclasses.dataclass(frozen=True, eq=False)
class Utterance:
  """One utterance of a corpus.

  Attributes:
    id: unique within its corpus (e.g. "84-121123-0001").
    transcript: raw transcript text (normalise with text_normalize).
    audio_path: audio file, if the audio lives on disk.
    waveform: float32 samples, if the audio lives in memory.
    sample_rate: rate of ``waveform`` (or of the file, when known).
    speaker: speaker id, if known.
    units: int32 [T] discrete units, for corpora that come as units.
    features_path: a [frames, dim] ``.npy`` file of features made elsewhere.
    source: "file:line" (or file) the record was read from.
  """

  id: str
  transcript: str
  audio_path: str | None = None
  waveform: np.ndarray | None = None
  sample_rate: int | None = None
  speaker: str | None = None
  units: np.ndarray | None = None
  features_path: str | None = None
  source: str = ""

  def load_waveform(self, target_sample_rate: int = audio_lib.TARGET_SAMPLE_RATE
                    ) -> np.ndarray:
    """Mono float32 waveform at ``target_sample_rate`` (file or in memory)."""
    if self.waveform is not None:
      if self.sample_rate is None:
        raise ValueError(f"utterance {self.id}: waveform without sample_rate")
      return audio_lib.resample(audio_lib.to_mono(self.waveform),
                                self.sample_rate, target_sample_rate)
    if self.audio_path is None:
      raise ValueError(f"utterance {self.id} ({self.source}) has no audio")
    return audio_lib.load_audio(self.audio_path,
                                target_sample_rate=target_sample_rate)


@dataclasses.dataclass(frozen=True)
class ReadResult(collections.abc.Sequence):
  """Utterances read, plus one message per skipped item."""

  utterances: tuple[Utterance, ...]
  skipped: tuple[str, ...] = ()

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def skipped_by_reason(self) -> dict[str, int]:
    """Skipped items counted by kind, e.g. ``{"unreadable audio": 2}``."""
    counts: dict[str, int] = {}
    for message in self.skipped:
      reason = skip_reason(message)
      counts[reason] = counts.get(reason, 0) + 1
    return counts

  def __len__(self) -> int:
    return len(self.utterances)

  def __getitem__(self, index):
    return self.utterances[index]

  def __iter__(self):
    return iter(self.utterances)


_REASONS = (  # (words in the message, reason), first match wins
    ("duplicate utterance id", "duplicate id"),
    ("truncated", "truncated audio"),
    ("not found", "missing file"),
    ("no audio file", "missing file"),
    ("no features file", "missing file"),
    ("cannot read", "unreadable file"),
    ("has no samples", "empty audio"),
    ("NaN or Inf", "non-finite audio samples"),
    ("empty transcript", "empty transcript"),
    ("no transcript", "missing transcript"),
    ("tab-separated columns", "malformed line"),
    ("empty path", "malformed line"),
    ("unit", "bad units"),
    ("features", "bad features"),
)


def skip_reason(message: str) -> str:
  """The kind of problem a reader's skip message describes."""
  for words, reason in _REASONS:
    if words in message:
      return reason
  return "other"


class _Collector:
  """Gathers utterances; raises or records (and logs) bad items."""

  def __init__(self, reader: str, on_error: str):
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    self.reader = reader
    self.on_error = on_error
    self.utterances: list[Utterance] = []
    self.skipped: list[str] = []
    self._ids: dict[str, str] = {}

  def bad(self, message: str) -> None:
    if self.on_error == "raise":
      raise CorpusError(message)
    logging.warning("%s: skipping: %s", self.reader, message)
    self.skipped.append(message)

  def add(self, utt: Utterance) -> None:
    if utt.id in self._ids:
      self.bad(f"{utt.source}: duplicate utterance id {utt.id!r} (first at "
               f"{self._ids[utt.id]})")
      return
    self._ids[utt.id] = utt.source
    self.utterances.append(utt)

  def result(self) -> ReadResult:
    if self.skipped:
      logging.warning("%s: read %d utterances, skipped %d bad items",
                      self.reader, len(self.utterances), len(self.skipped))
    else:
      logging.info("%s: read %d utterances", self.reader, len(self.utterances))
    return ReadResult(tuple(self.utterances), tuple(self.skipped))


def _read_lines(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  except FileNotFoundError as e:
    raise CorpusError(f"file not found: {path}") from e
  except UnicodeDecodeError as e:
    raise CorpusError(f"{path}: not UTF-8 text ({e})") from e


def _check_audio_file(path: str, where: str) -> str | None:
  """Error message for an unreadable audio file, or None when it is fine."""
  try:
    audio_lib.audio_info(path)
  except audio_lib.AudioError as e:
    return f"{where}: {e}"
  return None


# ----------------------------------------------------------------------------
# LibriSpeech.


def _librispeech_subset_dir(root: str, subset: str) -> str:
  candidates = [os.path.join(root, subset),
                os.path.join(root, "LibriSpeech", subset)]
  for candidate in candidates:
    if os.path.isdir(candidate):
      return candidate
  raise CorpusError(f"LibriSpeech subset {subset!r} not found: neither "
                    f"{candidates[0]} nor {candidates[1]} is a directory")


def read_librispeech(root: str, subsets: str | Sequence[str], *,
                     on_error: str = "raise", check_audio: bool = True,
                     audio_ext: str = ".flac") -> ReadResult:
  """Reads extracted LibriSpeech subsets (e.g. "train-clean-100", "dev-clean").

  Args:
    root: the directory holding ``LibriSpeech/`` or the subsets themselves.
    subsets: one subset name or several.
    on_error: "raise" or "skip" (see module docstring).
    check_audio: read each audio header (catches corrupt/empty files early).
    audio_ext: audio file extension.

  Returns:
    Utterances with id "<spk>-<chapter>-<n>", speaker "<spk>", the raw
    (upper-case) transcript and the audio path, in sorted order.
  """
  if isinstance(subsets, str):
    subsets = [subsets]
  collector = _Collector("read_librispeech", on_error)
  for subset in subsets:
    subset_dir = _librispeech_subset_dir(root, subset)
    for speaker in sorted(os.listdir(subset_dir)):
      speaker_dir = os.path.join(subset_dir, speaker)
      if not os.path.isdir(speaker_dir):
        continue
      for chapter in sorted(os.listdir(speaker_dir)):
        chapter_dir = os.path.join(speaker_dir, chapter)
        if os.path.isdir(chapter_dir):
          _read_librispeech_chapter(chapter_dir, speaker, chapter, audio_ext,
                                    check_audio, collector)
  return collector.result()


def _read_librispeech_chapter(chapter_dir: str, speaker: str, chapter: str,
                              audio_ext: str, check_audio: bool,
                              collector: _Collector) -> None:
  prefix = f"{speaker}-{chapter}-"
  audio_files = {name[:-len(audio_ext)]: os.path.join(chapter_dir, name)
                 for name in os.listdir(chapter_dir)
                 if name.endswith(audio_ext)}
  trans_path = os.path.join(chapter_dir, f"{speaker}-{chapter}.trans.txt")
  if not os.path.isfile(trans_path):
    for utt_id in sorted(audio_files):
      collector.bad(f"{audio_files[utt_id]}: no transcript (missing "
                    f"{trans_path})")
    return
  transcribed = set()
  for lineno, line in enumerate(_read_lines(trans_path), start=1):
    if not line.strip():
      continue
    where = f"{trans_path}:{lineno}"
    fields = line.strip().split(maxsplit=1)
    utt_id = fields[0]
    transcribed.add(utt_id)
    if not utt_id.startswith(prefix):
      collector.bad(f"{where}: utterance id {utt_id!r} does not start with "
                    f"{prefix!r}")
      continue
    if len(fields) < 2:
      collector.bad(f"{where}: empty transcript for {utt_id}")
      continue
    if utt_id not in audio_files:
      collector.bad(f"{where}: no audio file "
                    f"{os.path.join(chapter_dir, utt_id + audio_ext)}")
      continue
    if check_audio:
      problem = _check_audio_file(audio_files[utt_id], where)
      if problem:
        collector.bad(problem)
        continue
    collector.add(Utterance(id=utt_id, transcript=fields[1],
                            audio_path=audio_files[utt_id], speaker=speaker,
                            source=where))
  for utt_id in sorted(set(audio_files) - transcribed):
    collector.bad(f"{audio_files[utt_id]}: no transcript line for {utt_id} in "
                  f"{trans_path}")


# ----------------------------------------------------------------------------
# TSV manifests (audio or .npy features).

_HEADER_FIRST = ("audio", "audio_path", "path", "file", "features", "npy")
_HEADER_SECOND = ("transcript", "text")


def _is_header(fields: list[str]) -> bool:
  return (len(fields) >= 2 and fields[0].strip().lower() in _HEADER_FIRST
          and fields[1].strip().lower() in _HEADER_SECOND)


def _read_tsv(tsv_path: str, collector: _Collector,
              check_file: Callable[[str, str], str | None],
              make: Callable[..., Utterance]) -> None:
  """Shared parser for "path<TAB>transcript[<TAB>speaker]" manifests."""
  if not os.path.isfile(tsv_path):
    raise CorpusError(f"manifest not found: {tsv_path}")
  base = os.path.dirname(os.path.abspath(tsv_path))
  first = True
  for lineno, line in enumerate(_read_lines(tsv_path), start=1):
    if not line.strip():
      continue
    where = f"{tsv_path}:{lineno}"
    fields = line.split("\t")
    if first and _is_header(fields):
      first = False
      continue
    first = False
    if len(fields) not in (2, 3):
      collector.bad(f"{where}: expected 2 or 3 tab-separated columns "
                    f"(path, transcript[, speaker]), got {len(fields)}")
      continue
    rel_path, transcript = fields[0].strip(), fields[1].strip()
    speaker = fields[2].strip() if len(fields) == 3 else None
    if not rel_path:
      collector.bad(f"{where}: empty path")
      continue
    if not transcript:
      collector.bad(f"{where}: empty transcript")
      continue
    path = os.path.normpath(os.path.join(base, rel_path))
    problem = check_file(path, where)
    if problem:
      collector.bad(problem)
      continue
    utt_id = pathlib.PurePath(rel_path).with_suffix("").as_posix()
    collector.add(make(id=utt_id, transcript=transcript, path=path,
                       speaker=speaker or None, source=where))


def read_manifest(tsv_path: str, *, on_error: str = "raise",
                  check_audio: bool = True) -> ReadResult:
  """Reads a TSV manifest "audio_path<TAB>transcript[<TAB>speaker]".

  The first line may be a header ("audio<TAB>transcript[<TAB>speaker]", also
  "path"/"file" and "text"); blank lines are ignored. The utterance id is the
  audio path as written, without extension ("spk1/a.wav" -> "spk1/a"). Audio
  at any sample rate is fine (``Utterance.load_waveform`` resamples).
  """
  collector = _Collector("read_manifest", on_error)

  def check_file(path, where):
    if not os.path.isfile(path):
      return f"{where}: audio file not found: {path}"
    return _check_audio_file(path, where) if check_audio else None

  def make(path, **kwargs):
    return Utterance(audio_path=path, **kwargs)

  _read_tsv(tsv_path, collector, check_file, make)
  return collector.result()


# ----------------------------------------------------------------------------
# Units made elsewhere (fairseq / textless-lib style dumps).


def _split_id(line: str) -> tuple[str | None, str]:
  if "\t" in line:
    utt_id, rest = line.split("\t", 1)
    return utt_id.strip(), rest
  return None, line


def _is_int(token: str) -> bool:
  try:
    int(token)
  except ValueError:
    return False
  return True


def read_fairseq_units(units_path: str, transcripts_path: str, num_units: int,
                       *, on_error: str = "raise") -> ReadResult:
  """Reads line-aligned unit and transcript files.

  Line i of ``units_path`` ("3 3 17 ..." or "utt_id<TAB>3 3 17 ...") holds the
  units of the utterance whose transcript is line i of ``transcripts_path``
  ("TEXT" or "utt_id<TAB>TEXT"). Without ids, utterance ids are
  "<units file stem>-<line>". Units must be integers in [0, num_units).
  Unequal line counts raise ``CorpusError`` naming both files and counts.
  """
  collector = _Collector("read_fairseq_units", on_error)
  unit_lines = _read_lines(units_path)
  text_lines = _read_lines(transcripts_path)
  if len(unit_lines) != len(text_lines):
    raise CorpusError(
        f"{units_path} has {len(unit_lines)} lines but {transcripts_path} has "
        f"{len(text_lines)}; they must be line-aligned")
  stem = pathlib.Path(units_path).stem
  for lineno, (unit_line, text_line) in enumerate(
      zip(unit_lines, text_lines), start=1):
    where = f"{units_path}:{lineno}"
    text_where = f"{transcripts_path}:{lineno}"
    unit_id, unit_str = _split_id(unit_line)
    text_id, transcript = _split_id(text_line)
    transcript = transcript.strip()
    if unit_id is not None and text_id is not None and unit_id != text_id:
      collector.bad(f"{where}: utterance id {unit_id!r} != {text_id!r} at "
                    f"{text_where}")
      continue
    tokens = unit_str.split()
    if not tokens:
      collector.bad(f"{where}: no units")
      continue
    try:
      units = np.array([int(t) for t in tokens], np.int64)
    except ValueError:
      bad = next(t for t in tokens if not _is_int(t))
      collector.bad(f"{where}: unit {bad!r} is not an integer")
      continue
    out_of_range = (units < 0) | (units >= num_units)
    if out_of_range.any():
      collector.bad(f"{where}: unit {int(units[out_of_range][0])} is outside "
                    f"[0, {num_units}) (num_units={num_units})")
      continue
    if not transcript:
      collector.bad(f"{text_where}: empty transcript")
      continue
    utt_id = unit_id or text_id or f"{stem}-{lineno}"
    collector.add(Utterance(id=utt_id, transcript=transcript,
                            units=units.astype(np.int32), source=where))
  return collector.result()


# ----------------------------------------------------------------------------
# Per-utterance .npy features made elsewhere (HuBERT / WavLM layer outputs).


def _npy_checker(dim: int | None) -> Callable[[str, str], str | None]:
  """Checks that a file is a 2-D .npy [frames, dim]; dim fixed by the first."""
  expected = [dim]

  def check(path: str, where: str) -> str | None:
    if not os.path.isfile(path):
      return f"{where}: features file not found: {path}"
    try:
      array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
      return f"{where}: cannot read features file {path}: {e}"
    if array.ndim != 2 or array.shape[0] == 0:
      return (f"{where}: features {path} must be [frames > 0, dim], got shape "
              f"{array.shape}")
    if expected[0] is None:
      expected[0] = int(array.shape[1])
    elif array.shape[1] != expected[0]:
      return (f"{where}: features {path} have dim {array.shape[1]} != "
              f"{expected[0]}")
    return None

  return check


def read_npy_features(dir_or_manifest: str, *, on_error: str = "raise",
                      dim: int | None = None,
                      transcripts_name: str = "transcripts.tsv") -> ReadResult:
  """Reads per-utterance ``.npy`` features [frames, dim] with transcripts.

  ``dir_or_manifest`` is either
    * a directory of ``<id>.npy`` files (any depth; id = relative path without
      ``.npy``) with ``transcripts.tsv`` lines
      "id<TAB>transcript[<TAB>speaker]",
    * or a TSV manifest "features.npy<TAB>transcript[<TAB>speaker]" (same
      rules as ``read_manifest``).
  Every file's header is checked: 2-D, and one ``dim`` for all (``dim`` or
  the first file's).
  """
  collector = _Collector("read_npy_features", on_error)
  check = _npy_checker(dim)
  if os.path.isfile(dir_or_manifest):
    def make(path, **kwargs):
      return Utterance(features_path=path, **kwargs)
    _read_tsv(dir_or_manifest, collector, check, make)
    return collector.result()
  if not os.path.isdir(dir_or_manifest):
    raise CorpusError(f"features directory or manifest not found: "
                      f"{dir_or_manifest}")
  root = pathlib.Path(dir_or_manifest)
  trans_path = str(root / transcripts_name)
  if not os.path.isfile(trans_path):
    raise CorpusError(f"{dir_or_manifest}: no {transcripts_name} "
                      "(lines: id<TAB>transcript[<TAB>speaker])")
  npy_files = {str(p.relative_to(root).with_suffix("")).replace(os.sep, "/"):
               str(p) for p in sorted(root.rglob("*.npy"))}
  transcribed = set()
  for lineno, line in enumerate(_read_lines(trans_path), start=1):
    if not line.strip():
      continue
    where = f"{trans_path}:{lineno}"
    fields = line.split("\t")
    if len(fields) not in (2, 3):
      collector.bad(f"{where}: expected 2 or 3 tab-separated columns "
                    f"(id, transcript[, speaker]), got {len(fields)}")
      continue
    utt_id, transcript = fields[0].strip(), fields[1].strip()
    transcribed.add(utt_id)
    if not transcript:
      collector.bad(f"{where}: empty transcript for {utt_id}")
      continue
    if utt_id not in npy_files:
      collector.bad(f"{where}: no features file {root / (utt_id + '.npy')}")
      continue
    problem = check(npy_files[utt_id], where)
    if problem:
      collector.bad(problem)
      continue
    speaker = fields[2].strip() if len(fields) == 3 else None
    collector.add(Utterance(id=utt_id, transcript=transcript,
                            features_path=npy_files[utt_id],
                            speaker=speaker or None, source=where))
  for utt_id in sorted(set(npy_files) - transcribed):
    collector.bad(f"{npy_files[utt_id]}: no transcript line in {trans_path}")
  return collector.result()
