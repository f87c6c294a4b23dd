"""Discretise a speech corpus into PREPARED data: units + normalised text.

Pipeline (stages in order; each is skipped when its completion file exists)::

  source (embedded TFDS corpus | Utterances from sld_jax.speech.readers)
    -> text model     SentencePiece over normalised TRAIN transcripts
                      (word-level for digits, unigram for sentences), or a
                      user-supplied model                      text.model
    -> codebook       features of a seeded sample of TRAIN utterances
                      (never dev/test), k-means with K clusters codebook.npz
    -> per split      features -> nearest center -> units [-> merge repeats]
                      (train: plus speed-perturbed copies x0.9/x1.1 if asked)
    -> unit pieces    optional SentencePiece over the TRAIN units
                                                            unit_pieces.model
    -> <split>.tfrecord-SSSSS-of-NNNNN
                          tf.train.Examples: id, speaker, units (int64 list),
                          text (normalised), duration (seconds), in
                          ``num_shards_for`` shards (consecutive runs of
                          utterances), so each training process reads its
                          own files
    -> metadata.json      K, speech_size, text_size, extractor, options,
                          counts per split (written last)

Imported units (``Utterance.units``, e.g. fairseq dumps) skip extraction and
k-means; imported ``.npy`` features skip extraction only.

Idempotent and resumable: every output is written to a temporary name and
renamed, then a ``*.done`` file is written last. A rerun skips finished
stages and splits and redoes an interrupted one from scratch. A file lock
serialises concurrent ``prepare`` calls on one directory.

What was prepared from what is recorded in ``options.json``: the options,
the corpus description, ``on_error`` and, for utterances read from files, an
``input_sha256`` over every utterance (id, transcript, speaker, file path
and size, units), so a manifest whose transcripts changed is noticed. A
*finished* directory made from other options or input is refused
(``PrepareError`` naming what differs), never mixed or silently kept; an
*unfinished* one (a run that failed or was interrupted) made from other
options or input is cleared and prepared again, so a failed stage never
blocks or poisons the rerun after a fix.

``on_error="skip"`` leaves out utterances that cannot be used (a transcript
that normalises to nothing, unreadable or truncated audio, audio shorter than
one feature frame, NaN/Inf samples, bad units), logged and counted per reason
in ``metadata.json`` (``skipped``); a split left with nothing is one
``PrepareError`` saying so. With ``"raise"`` (default) the first one stops.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import time
from typing import Any, Iterable, Iterator, Mapping, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

from sld_jax import atomic_files
from sld_jax.speech import audio as audio_lib
from sld_jax.speech import corpus_sources
from sld_jax.speech import features as features_lib
from sld_jax.speech import kmeans
from sld_jax.speech import readers
from sld_jax.speech import text_normalize
from sld_jax.speech import units as units_lib

FORMAT_VERSION = 1
TRAIN = "train"
METADATA = "metadata.json"
OPTIONS = "options.json"
TEXT_MODEL = "text.model"
CODEBOOK = "codebook.npz"
UNIT_PIECES = "unit_pieces.model"
EXTRACTORS = ("whisper", "logmel", "npy", "units")


Source = corpus_sources.Source
EmbeddedSource = corpus_sources.EmbeddedSource
UtteranceSource = corpus_sources.UtteranceSource


class PrepareError(ValueError):
  """Bad input or an inconsistent prepared directory."""


class BadUtteranceError(PrepareError):
  """One utterance cannot be used; ``reason`` names the kind of problem."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


ON_ERROR = ("raise", "skip")
# Outputs of the stages, removed when an unfinished directory is redone.
_STAGE_OUTPUTS = ("*.done", "*.incomplete", "text.*", "text_tmp.*", "codebook.npz",
                  "unit_pieces.*", "unit_pieces_tmp.*", "*.tfrecord", "raw_units", OPTIONS)


def _reason(error: Exception) -> str:
  """The kind of a per-utterance failure, for the skip counts."""
  text = str(error)
  if "NaN or Inf" in text:
    return "non-finite audio samples"
  if "needed for one frame" in text:
    return "audio shorter than one feature frame"
  if "truncated" in text:
    return "truncated audio"
  if isinstance(error, OSError) or "audio" in text:
    return "unreadable audio"
  return "feature extraction failed"


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """How a corpus is discretised.

  Attributes:
    extractor: "whisper" or "logmel" (features computed here), "npy"
      (imported features: k-means here) or "units" (imported units).
    extractor_kwargs: passed to ``features.get_extractor``.
    num_clusters: K (for imported units: their number of distinct units).
    kmeans_seed: seeds the utterance/frame sample and k-means itself.
    kmeans_utterances: train utterances sampled for fitting k-means.
    kmeans_frames: at most this many of their frames are used.
    kmeans_steps, kmeans_batch_size: mini-batch k-means schedule, capped at
      ``kmeans_max_epochs`` passes over the sampled frames.
    merge_repeats: collapse runs of equal units (the paper does not).
    unit_pieces: 0 for none, else the number of unigram unit pieces.
    speed_perturb: extra speed factors for the train split, e.g. (0.9, 1.1);
      needs audio. The copies get ids and speakers prefixed "sp0.9-".
    text_model_type: SentencePiece model type ("word", "unigram", ...).
    text_vocab_size: pieces asked for (SentencePiece may return fewer).
    text_model_file: a SentencePiece model to use instead of training one
      (pad 0, eos 1, unk 2, no bos).
    units_rate_hz: for imported units, the rate used to estimate durations.
  """

  extractor: str = "whisper"
  extractor_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  num_clusters: int = 128
  kmeans_seed: int = 0
  kmeans_utterances: int = 1000
  kmeans_frames: int = 200_000
  kmeans_steps: int = 300
  kmeans_batch_size: int = 10_000
  kmeans_max_epochs: float = 20.0
  merge_repeats: bool = True
  unit_pieces: int = 0
  speed_perturb: tuple[float, ...] = ()
  text_model_type: str = "word"
  text_vocab_size: int = 1000
  text_model_file: Optional[str] = None
  units_rate_hz: float = 50.0

  def __post_init__(self):
    if self.extractor not in EXTRACTORS:
      raise PrepareError(f"PrepareOptions.extractor must be one of "
                         f"{EXTRACTORS}, got {self.extractor!r}")
    if self.num_clusters < 2:
      raise PrepareError(f"num_clusters must be >= 2, got {self.num_clusters}")
    if self.unit_pieces and self.unit_pieces <= self.num_clusters:
      raise PrepareError(f"unit_pieces ({self.unit_pieces}) must exceed "
                         f"num_clusters ({self.num_clusters})")
    if self.text_model_type not in text_normalize.MODEL_TYPES:
      raise PrepareError(f"text_model_type must be one of "
                         f"{text_normalize.MODEL_TYPES}, got "
                         f"{self.text_model_type!r}")
    object.__setattr__(self, "speed_perturb",
                       tuple(float(f) for f in self.speed_perturb))
    if any(f == 1.0 or not 0.5 <= f <= 2.0 for f in self.speed_perturb):
      raise PrepareError(f"speed_perturb factors must be in [0.5, 2] and not "
                         f"1.0 (the original is always kept), got "
                         f"{self.speed_perturb}")
    object.__setattr__(self, "extractor_kwargs", dict(self.extractor_kwargs))

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["speed_perturb"] = list(self.speed_perturb)
    return out


# ----------------------------------------------------------------------------
# Helpers: completion markers, atomic files, TFRecords.


def _done_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, name + ".done")


def _is_done(out_dir: str, name: str) -> bool:
  return os.path.exists(_done_path(out_dir, name))


def mark_done(out_dir: str, name: str, info: Mapping[str, Any]) -> None:
  _write_json(_done_path(out_dir, name), info)


def _write_json(path: str, value: Any) -> None:
  with atomic_files.replacing(path) as tmp, open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


@contextlib.contextmanager
def locked(out_dir: str):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, ".lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def split_file(out_dir: str, split: str, raw: bool = False) -> str:
  """The single-file layout of format 1 before sharding (still readable)."""
  name = f"{split}.tfrecord"
  return os.path.join(out_dir, "raw_units", name) if raw else os.path.join(
      out_dir, name)


EXAMPLES_PER_SHARD = 1000
MIN_SHARDS = 8
MAX_SHARDS = 1024


def num_shards_for(num_examples: int) -> int:
  """Shards of a split: about 1000 examples each, at least 8 (so up to 8
  training processes read whole files), at most 1024, never an empty one
  (a split of 5 examples gets 5 shards, one of 0 gets 1)."""
  wanted = max(MIN_SHARDS, -(-num_examples // EXAMPLES_PER_SHARD))
  return max(1, min(wanted, MAX_SHARDS, num_examples))


def shard_pattern(split: str, num_shards: int) -> str:
  """The glob of a split's shards, relative to the prepared dir.

  >>> shard_pattern("train", 8)
  'train.tfrecord-?????-of-00008'
  """
  return f"{split}.tfrecord-?????-of-{num_shards:05d}"


def shard_paths(out_dir: str, split: str, num_shards: int,
                raw: bool = False) -> list[str]:
  directory = os.path.join(out_dir, "raw_units") if raw else out_dir
  return [os.path.join(directory, f"{split}.tfrecord-{i:05d}-of-"
                       f"{num_shards:05d}") for i in range(num_shards)]


def split_files(out_dir: str, split: str, raw: bool = False) -> list[str]:
  """The TFRecord files of a prepared split: its shards, or the old single file."""
  directory = os.path.join(out_dir, "raw_units") if raw else out_dir
  shards = sorted(tf.io.gfile.glob(os.path.join(
      directory, f"{split}.tfrecord-?????-of-?????")))
  if shards:
    return shards
  if os.path.exists(split_file(out_dir, split, raw)):
    return [split_file(out_dir, split, raw)]
  raise PrepareError(f"{directory} holds no TFRecords of split {split!r} "
                     f"({split}.tfrecord-SSSSS-of-NNNNN or {split}.tfrecord)")


def serialize_example(record: Mapping[str, Any]) -> bytes:
  def _bytes(s):
    return tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[s.encode("utf-8")]))
  return tf.train.Example(features=tf.train.Features(feature={
      "id": _bytes(record["id"]),
      "speaker": _bytes(record["speaker"]),
      "text": _bytes(record["text"]),
      "units": tf.train.Feature(int64_list=tf.train.Int64List(
          value=np.asarray(record["units"], np.int64))),
      "duration": tf.train.Feature(float_list=tf.train.FloatList(
          value=[float(record["duration"])])),
  })).SerializeToString()


def _write_records(out_dir: str, split: str, raw: bool,
                   records: Iterable[Mapping[str, Any]],
                   num_records: int) -> dict[str, Any]:
  """Writes ``num_records`` records as ``num_shards_for(num_records)`` shards.

  Record ``i`` goes to shard ``i * num_shards // num_records`` (consecutive
  runs, so one file is open at a time; with fewer records than announced, the
  last shards are shorter or empty). All shards are written under temporary
  names and renamed at the end; returns counts for the completion file.
  """
  num_shards = num_shards_for(num_records)
  paths = shard_paths(out_dir, split, num_shards, raw)
  os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
  for stale in tf.io.gfile.glob(os.path.join(
      os.path.dirname(paths[0]), f"{split}.tfrecord-?????-of-?????")):
    os.remove(stale)  # an interrupted earlier attempt
  count, num_units, seconds = 0, 0, 0.0
  shard, writer = -1, None
  try:
    for record in records:
      wanted = min(count * num_shards // max(num_records, 1), num_shards - 1)
      while shard < wanted:
        if writer is not None:
          writer.close()
        shard += 1
        writer = tf.io.TFRecordWriter(paths[shard] + ".incomplete")
      writer.write(serialize_example(record))
      count += 1
      num_units += len(record["units"])
      seconds += float(record["duration"])
  finally:
    if writer is not None:
      writer.close()
  for path in paths[shard + 1:]:
    with tf.io.TFRecordWriter(path + ".incomplete"):
      pass
  for path in paths:
    os.replace(path + ".incomplete", path)
  return {"num_examples": count, "num_units": num_units,
          "hours": round(seconds / 3600.0, 4), "num_shards": num_shards}


FEATURE_SPEC = {
    "id": tf.io.FixedLenFeature([], tf.string),
    "speaker": tf.io.FixedLenFeature([], tf.string),
    "text": tf.io.FixedLenFeature([], tf.string),
    "units": tf.io.RaggedFeature(tf.int64),
    "duration": tf.io.FixedLenFeature([], tf.float32),
}


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """One prepared tf.train.Example -> {id, speaker, text, units, duration}."""
  return tf.io.parse_single_example(serialized, FEATURE_SPEC)


def read_records(paths) -> Iterator[dict[str, Any]]:
  """Prepared records of TFRecord file(s), in file order, as python values."""
  for serialized in tf.data.TFRecordDataset(paths):
    ex = parse_example(serialized)
    yield {"id": ex["id"].numpy().decode(),
           "speaker": ex["speaker"].numpy().decode(),
           "text": ex["text"].numpy().decode(),
           "units": ex["units"].numpy().astype(np.int32),
           "duration": float(ex["duration"].numpy())}


# ----------------------------------------------------------------------------
# The preparer.


class Preparer:
  """Runs the stages of ``prepare`` for one source and directory.

  ``extractor`` and ``codebook`` are normally built (or loaded from
  ``out_dir``) on first use; a worker that already holds them (the Beam
  pipeline's ``DoFn``) passes them in and calls ``unit_records`` alone.
  """

  def __init__(self, source: Source, out_dir: str, options: PrepareOptions,
               on_error: str = "raise", *, extractor: Any = None,
               codebook: Optional[kmeans.Codebook] = None):
    if on_error not in ON_ERROR:
      raise PrepareError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    self.source = source
    self.out_dir = out_dir
    self.options = options
    self.on_error = on_error
    self.bad: dict[tuple[str, str], str] = {}   # (split, id) -> reason, when skipping
    self._extractor = extractor
    self._codebook = codebook
    needed = {"audio": ("whisper", "logmel"), "features": ("npy",),
              "units": ("units",)}[source.kind]
    if options.extractor not in needed:
      raise PrepareError(
          f"source {source.description()} carries {source.kind}; use "
          f"extractor one of {needed}, not {options.extractor!r}")
    if options.speed_perturb and source.kind != "audio":
      raise PrepareError("speed_perturb needs audio; the source carries "
                         f"{source.kind}")
    if TRAIN not in source.splits():
      raise PrepareError(f"the source has no '{TRAIN}' split (splits: "
                         f"{source.splits()}); the codebook and text model "
                         "are fit on it")

  # -- stage: options ----------------------------------------------------------
  def recorded_options(self) -> dict[str, Any]:
    """What ``options.json`` records: options, corpus, on_error, input hash."""
    current = {"format_version": FORMAT_VERSION,
               "corpus": self.source.description(),
               "options": self.options.to_json()}
    if self.on_error != "raise":
      current["on_error"] = self.on_error
    digest = input_digest(self.source)
    if digest is not None:
      current["input_sha256"] = digest
    return json.loads(json.dumps(current))

  def check_options(self):
    path = os.path.join(self.out_dir, OPTIONS)
    current = self.recorded_options()
    if os.path.exists(path):
      stored = _read_json(path)
      if stored != current:
        differing = sorted(k for k in set(stored) | set(current)
                           if stored.get(k) != current.get(k))
        if not is_prepared(self.out_dir):
          logging.warning(
              "%s holds an unfinished preparation made from other %s; clearing it and "
              "preparing again", self.out_dir, " and ".join(differing))
          clear_stage_outputs(self.out_dir)
          _write_json(path, current)
          return
        what = ("the input utterances changed (input_sha256: transcripts, speakers, file "
                "paths or sizes)" if differing == ["input_sha256"] else
                f"they differ in {', '.join(differing)}")
        raise PrepareError(
            f"{self.out_dir} was prepared with other options or another corpus: {what}."
            f"\n  stored:  {json.dumps(stored, sort_keys=True)}\n  "
            f"current: {json.dumps(current, sort_keys=True)}\nuse another "
            "directory or delete this one")
    else:
      _write_json(path, current)

  # -- skipping ------------------------------------------------------------------
  def _bad_utterance(self, split: str, utt: readers.Utterance,
                     error: BadUtteranceError) -> None:
    """Raises ``error``, or records it when skipping."""
    if self.on_error == "raise":
      raise error
    if (split, utt.id) not in self.bad:
      logging.warning("skipping (%s): %s", error.reason, error)
      self.bad[(split, utt.id)] = error.reason

  def skipped_counts(self, split: str) -> dict[str, int]:
    return dict(collections.Counter(r for (s, _), r in self.bad.items() if s == split))

  def _nothing_left(self, split: str, what: str) -> PrepareError:
    counts = self.skipped_counts(split)
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
    return PrepareError(
        f"nothing left of split {split!r} of {self.source.description().get('name', 'the corpus')}"
        f" for {what} after skipping {sum(counts.values())} bad utterances ({reasons or 'none'})"
        "; fix the input (the warnings above name each item)")

  # -- stage: text model -------------------------------------------------------
  def text_model(self) -> str:
    path = os.path.join(self.out_dir, TEXT_MODEL)
    if _is_done(self.out_dir, "text"):
      return path
    if self.options.text_model_file:
      from sld_jax import seqio_vocab  # pylint: disable=g-import-not-at-top
      seqio_vocab.check_text_model(self.options.text_model_file)
      with atomic_files.replacing(path) as tmp:
        shutil.copyfile(self.options.text_model_file, tmp)
    else:
      transcripts = [text for text in (self._usable_text(TRAIN, u)
                                       for u in self.source.utterances(TRAIN)) if text]
      if not transcripts:
        raise self._nothing_left(TRAIN, "the text model")
      prefix = os.path.join(self.out_dir, "text_tmp")
      model = text_normalize.train_text_model(
          transcripts, self.options.text_vocab_size, prefix,
          self.options.text_model_type)
      os.replace(model, path)
      os.replace(prefix + ".vocab", os.path.join(self.out_dir, "text.vocab"))
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    size = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    mark_done(self.out_dir, "text", {"text_size": size})
    return path

  @staticmethod
  def _normalised_text(utt: readers.Utterance) -> str:
    text = text_normalize.normalize_transcript(utt.transcript)
    if not text:
      raise BadUtteranceError(f"{utt.source or utt.id}: transcript of utterance "
                              f"{utt.id} is empty after normalisation: "
                              f"{utt.transcript!r}", "empty transcript after normalisation")
    return text

  def _usable_text(self, split: str, utt: readers.Utterance) -> Optional[str]:
    """The normalised transcript, or None for an utterance being skipped."""
    if (split, utt.id) in self.bad:
      return None
    try:
      return self._normalised_text(utt)
    except BadUtteranceError as e:
      self._bad_utterance(split, utt, e)
      return None

  # -- stage: codebook ---------------------------------------------------------
  @property
  def extractor(self):
    if self._extractor is None:
      self._extractor = features_lib.get_extractor(
          self.options.extractor, **self.options.extractor_kwargs)
    return self._extractor

  def _features(self, utt: readers.Utterance, speed: float = 1.0):
    """(features [T, D], duration in seconds) of one utterance."""
    try:
      if self.source.kind == "features":
        feats = self.extractor(utt.features_path)
        return feats, feats.shape[0] / self.extractor.frame_rate_hz
      waveform = utt.load_waveform()
      if not np.all(np.isfinite(waveform)):
        raise ValueError("waveform contains NaN or Inf samples")
      if speed != 1.0:
        waveform = audio_lib.speed_perturb(waveform, speed)
      return (self.extractor(waveform),
              waveform.shape[0] / audio_lib.TARGET_SAMPLE_RATE)
    except (ValueError, OSError) as e:
      raise BadUtteranceError(f"{utt.source or utt.id}: utterance {utt.id}: {e}",
                              _reason(e)) from e

  def codebook(self) -> Optional[kmeans.Codebook]:
    if self.source.kind == "units":
      return None
    path = os.path.join(self.out_dir, CODEBOOK)
    if self._codebook is None and _is_done(self.out_dir, "codebook"):
      self._codebook = kmeans.Codebook.load(path)
    if self._codebook is not None:
      return self._codebook
    opts = self.options
    rng = np.random.default_rng(opts.kmeans_seed)
    total = self.source.num_utterances(TRAIN)
    chosen = set(rng.choice(total, min(total, opts.kmeans_utterances),
                            replace=False).tolist())
    pooled = []
    for index, utt in enumerate(tqdm.tqdm(
        self.source.utterances(TRAIN), total=total, mininterval=2.0,
        desc="k-means sample features", unit="utt")):
      if index in chosen and self._usable_text(TRAIN, utt) is not None:
        try:
          pooled.append(self._features(utt)[0])
        except BadUtteranceError as e:
          self._bad_utterance(TRAIN, utt, e)
    if not pooled:
      raise self._nothing_left(TRAIN, "the codebook")
    frames = np.concatenate(pooled)
    if frames.shape[0] > opts.kmeans_frames:
      keep = np.sort(rng.choice(frames.shape[0], opts.kmeans_frames,
                                replace=False))
      frames = frames[keep]
    if frames.shape[0] < opts.num_clusters:
      raise PrepareError(
          f"only {frames.shape[0]} training frames for K={opts.num_clusters} "
          "clusters; use a smaller num_clusters or more training data")
    logging.info("fitting k-means: K=%d on %d frames of %d train utterances",
                 opts.num_clusters, frames.shape[0], len(chosen))
    batch_size = min(opts.kmeans_batch_size, frames.shape[0])
    num_steps = min(opts.kmeans_steps, max(1, int(np.ceil(
        opts.kmeans_max_epochs * frames.shape[0] / batch_size))))
    codebook = kmeans.fit_kmeans(
        frames, opts.num_clusters, seed=opts.kmeans_seed,
        batch_size=batch_size, num_steps=num_steps,
        extractor_name=self.extractor.name)
    codebook.save(path)
    mark_done(self.out_dir, "codebook", {
        "num_clusters": codebook.num_clusters, "dim": codebook.dim,
        "num_frames": int(frames.shape[0]),
        "num_utterances": len(chosen)})
    self._codebook = codebook
    return codebook

  # -- stage: units per split --------------------------------------------------
  def unit_records(self, split: str) -> Iterator[dict[str, Any]]:
    """Units (after merging) and normalised text of every utterance."""
    speeds = (1.0,) + (self.options.speed_perturb if split == TRAIN else ())
    codebook = self.codebook()
    total = self.source.num_utterances(split) * len(speeds)
    bar = tqdm.tqdm(total=total, desc=f"units {split}", unit="utt",
                    mininterval=2.0)
    for utt in self.source.utterances(split):
      text = self._usable_text(split, utt)
      if text is None:
        bar.update(len(speeds))
        continue
      for speed in speeds:
        try:
          if self.source.kind == "units":
            units = self._checked_units(utt)
            duration = units.shape[0] / self.options.units_rate_hz
          else:
            feats, duration = self._features(utt, speed)
            units = codebook.assign(feats)
        except BadUtteranceError as e:
          self._bad_utterance(split, utt, e)
          bar.update(1)
          break
        if self.options.merge_repeats:
          units = units_lib.merge_repeats(units)
        prefix = "" if speed == 1.0 else f"sp{speed:g}-"
        speaker = utt.speaker or utt.id
        yield {"id": prefix + utt.id, "speaker": prefix + speaker,
               "text": text, "units": units, "duration": duration}
        bar.update(1)
    bar.close()

  def _checked_units(self, utt: readers.Utterance) -> np.ndarray:
    units = np.asarray(utt.units)
    k = self.options.num_clusters
    where = utt.source or f"utterance {utt.id}"
    if units.ndim != 1 or units.size == 0:
      raise BadUtteranceError(f"{where}: utterance {utt.id} needs a non-empty 1-D "
                              f"unit sequence, got shape {units.shape}", "bad units")
    bad = (units < 0) | (units >= k)
    if bad.any():
      raise BadUtteranceError(f"{where}: unit {int(units[bad][0])} is outside "
                              f"[0, {k}) (num_clusters={k}) in utterance {utt.id}",
                              "bad units")
    return units.astype(np.int32)

  def write_split(self, split: str, raw: bool) -> dict[str, Any]:
    name = f"raw_units/{split}" if raw else split
    if _is_done(self.out_dir, name):
      return _read_json(_done_path(self.out_dir, name))
    os.makedirs(os.path.dirname(_done_path(self.out_dir, name)), exist_ok=True)
    start = time.time()
    speeds = 1 + (len(self.options.speed_perturb) if split == TRAIN else 0)
    info = _write_records(self.out_dir, split, raw, self.unit_records(split),
                          self.source.num_utterances(split) * speeds)
    if info["num_examples"] == 0:
      for path in split_files(self.out_dir, split, raw):
        os.remove(path)
      raise self._nothing_left(split, "its records")
    if self.skipped_counts(split):
      info["skipped"] = self.skipped_counts(split)
      logging.warning("split %s: skipped %s", split, info["skipped"])
    info["seconds_to_prepare"] = round(time.time() - start, 1)
    mark_done(self.out_dir, name, info)
    logging.info("prepared %s/%s: %s", self.out_dir, name, info)
    return info

  # -- stage: unit pieces ------------------------------------------------------
  def unit_pieces(self) -> units_lib.UnitPieceModel:
    path = os.path.join(self.out_dir, UNIT_PIECES)
    if not _is_done(self.out_dir, "unit_pieces"):
      prefix = os.path.join(self.out_dir, "unit_pieces_tmp")
      model = units_lib.train_unit_pieces(
          (r["units"] for r in read_records(split_files(self.out_dir, TRAIN,
                                                        raw=True))),
          self.options.unit_pieces, prefix,
          num_units=self.options.num_clusters)
      os.replace(model, path)
      os.replace(prefix + ".vocab",
                 os.path.join(self.out_dir, "unit_pieces.vocab"))
      pieces = units_lib.UnitPieceModel(path, self.options.num_clusters)
      mark_done(self.out_dir, "unit_pieces", {"num_pieces": pieces.num_pieces})
    return units_lib.UnitPieceModel(path, self.options.num_clusters)

  def write_piece_split(self, split: str,
                        pieces: units_lib.UnitPieceModel) -> dict[str, Any]:
    if _is_done(self.out_dir, split):
      return _read_json(_done_path(self.out_dir, split))
    raw = _read_json(_done_path(self.out_dir, f"raw_units/{split}"))
    records = ({**r, "units": pieces.encode(r["units"])}
               for r in read_records(split_files(self.out_dir, split, raw=True)))
    info = _write_records(self.out_dir, split, False, records,
                          raw["num_examples"])
    mark_done(self.out_dir, split, info)
    return info

  # -- all ---------------------------------------------------------------------
  def run(self) -> dict[str, Any]:
    start = time.time()
    text_model = self.text_model()
    codebook = self.codebook()
    splits = list(self.source.splits())
    counts = {}
    if self.options.unit_pieces:
      raw_counts = {split: self.write_split(split, raw=True) for split in splits}
      pieces = self.unit_pieces()
      speech_size = pieces.num_pieces
      for split in splits:
        counts[split] = self.write_piece_split(split, pieces)
    else:
      speech_size = self.options.num_clusters
      for split in splits:
        counts[split] = self.write_split(split, raw=False)
      raw_counts = counts
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    text_size = spm.SentencePieceProcessor(
        model_file=text_model).get_piece_size()
    metadata = {
        "format_version": FORMAT_VERSION,
        "corpus": self.source.description(),
        "num_clusters": self.options.num_clusters,
        "speech_size": int(speech_size),
        "text_size": int(text_size),
        "extractor": (json.loads(features_lib.describe(self.extractor))
                      if codebook is not None else {"name": "units"}),
        "options": self.options.to_json(),
        "files": {"text_model": TEXT_MODEL,
                  "codebook": CODEBOOK if codebook is not None else None,
                  "unit_pieces": (UNIT_PIECES if self.options.unit_pieces
                                  else None),
                  "splits": {s: (shard_pattern(s, counts[s]["num_shards"])
                                 if "num_shards" in counts[s] else  # unsharded
                                 os.path.basename(split_file(self.out_dir, s)))
                             for s in splits}},
        "splits": counts,
        # From the splits' completion files: counts of an earlier, interrupted
        # run that finished a split are kept.
        "skipped": {split: raw_counts[split]["skipped"] for split in splits
                    if raw_counts[split].get("skipped")},
    }
    metadata["seconds_to_prepare"] = round(time.time() - start, 1)
    _write_json(os.path.join(self.out_dir, METADATA), metadata)
    return metadata


def input_digest(source: Source) -> Optional[str]:
  """sha256 over every utterance of a source read from files, else None.

  Covers what a manifest (or unit/feature list) says: split, id, transcript,
  speaker, file path and size, and imported units. The embedded corpus is
  identified by its config and version instead (``Source.description``).
  """
  if not isinstance(source, UtteranceSource):
    return None
  digest = hashlib.sha256()
  for split in source.splits():
    for utt in source.utterances(split):
      size = None
      for path in (utt.audio_path, utt.features_path):
        if path is not None and os.path.exists(path):
          size = os.path.getsize(path)
      digest.update(json.dumps([split, utt.id, utt.transcript, utt.speaker, utt.audio_path,
                                utt.features_path, size]).encode())
      for array in (utt.units, utt.waveform):
        if array is not None:
          digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def clear_stage_outputs(out_dir: str) -> None:
  """Removes what the stages wrote (not the lock), e.g. of a failed run."""
  for pattern in _STAGE_OUTPUTS:
    for path in glob.glob(os.path.join(out_dir, pattern)):
      if os.path.isdir(path):
        shutil.rmtree(path)
      else:
        os.remove(path)


def prepare(source: Source, out_dir: str,
            options: PrepareOptions = PrepareOptions(),
            on_error: str = "raise") -> dict[str, Any]:
  """Prepares ``source`` into ``out_dir`` (or finishes an interrupted run).

  Args:
    source: the corpus.
    out_dir: the prepared directory.
    options: how to discretise.
    on_error: "raise" (stop at the first unusable utterance) or "skip"
      (leave it out, counted per reason in the metadata's ``skipped``).

  Returns:
    The metadata (as in ``metadata.json``).
  """
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  preparer = Preparer(source, out_dir, options, on_error)
  with locked(out_dir):
    preparer.check_options()
    if is_prepared(out_dir):
      return _shard_unsharded_splits(out_dir)
    return preparer.run()


def _shard_unsharded_splits(out_dir: str) -> dict[str, Any]:
  """Migrates a dir of the single-file layout: writes the shards of each
  ``<split>.tfrecord`` (same records, same order) and points metadata.json at
  them. The old files are kept for readers of that layout; delete them once
  none is left."""
  metadata = load_metadata(out_dir)
  unsharded = [split for split, name in metadata["files"]["splits"].items()
               if name == os.path.basename(split_file(out_dir, split))]
  if not unsharded:
    return metadata
  for split in sorted(unsharded):
    name = metadata["files"]["splits"][split]
    count = metadata["splits"][split]["num_examples"]
    info = _write_records(out_dir, split, False,
                          read_records(split_file(out_dir, split)), count)
    if info["num_examples"] != count:
      raise PrepareError(f"{split_file(out_dir, split)}: {info['num_examples']}"
                         f" records, metadata.json says {count}")
    metadata["files"]["splits"][split] = shard_pattern(split,
                                                       info["num_shards"])
    metadata["splits"][split]["num_shards"] = info["num_shards"]
    logging.info("%s: sharded %s into %d files", out_dir, name,
                 info["num_shards"])
  _write_json(os.path.join(out_dir, METADATA), metadata)
  return metadata


def is_prepared(out_dir: str) -> bool:
  return os.path.exists(os.path.join(out_dir, METADATA))


def load_metadata(out_dir: str) -> dict[str, Any]:
  path = os.path.join(out_dir, METADATA)
  if not os.path.exists(path):
    raise PrepareError(
        f"{out_dir} is not prepared data (no {METADATA}); prepare it with "
        "scripts/prepare_data.py or sld_jax.speech.prepare.prepare")
  metadata = _read_json(path)
  if metadata.get("format_version") != FORMAT_VERSION:
    raise PrepareError(f"{path}: format_version "
                       f"{metadata.get('format_version')} != {FORMAT_VERSION}")
  return metadata


def split_pattern(out_dir: str, split: str) -> str:
  """The file pattern of a prepared split (its shards, or an old single file)."""
  metadata = load_metadata(out_dir)
  if split not in metadata["splits"]:
    raise PrepareError(f"{out_dir} has no split {split!r}; prepared splits: "
                       f"{sorted(metadata['splits'])}")
  return os.path.join(out_dir, metadata["files"]["splits"][split])


def read_split(out_dir: str, split: str) -> tf.data.Dataset:
  """Prepared examples of a split, shards in order: {id, speaker, text, units, duration}."""
  files = sorted(tf.io.gfile.glob(split_pattern(out_dir, split)))
  return tf.data.TFRecordDataset(files).map(
      parse_example, num_parallel_calls=tf.data.AUTOTUNE)
