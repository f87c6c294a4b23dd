"""What a run directory holds to go from audio to text: ``MODEL_DIR/assets/``.

At the start of training (``record``) the run directory gets a copy of the
discretisation and vocabulary assets of its training data, so a finished run
is a model that needs nothing else (no data cache, no task registry)::

  MODEL_DIR/assets/
    assets.json        the manifest (below)
    text.model         the SentencePiece text model (or gpt2/ with the BPE files)
    codebook.npz       k-means centers of the speech features
    unit_pieces.model  the SentencePiece model over units (if any)

``assets.json`` for the demo task (Whisper features, K=128, repeats merged)::

  {"format_version": 1,
   "layout": {"text_size": 14, "speech_size": 128},
   "text": {"kind": "sentencepiece", "file": "text.model"},
   "speech": {"extractor": "whisper", "extractor_kwargs": {}, "feature_dim": 384,
              "frame_rate_hz": 50.0, "sample_rate": 16000, "codebook": "codebook.npz",
              "num_clusters": 128, "merge_repeats": true, "unit_pieces": null},
   "sha256": {"text.model": "3f0c...", "codebook.npz": "a81e..."},
   "source": {"kind": "seqio", "task": "sld_embedded_digits_whisper",
              "prepared_dir": "/.../prepared/sld_embedded_digits_whisper"},
   "model": {"vocab_size": 256, "num_layers": 2, ...}}

``fingerprint`` (layout, text, speech settings and the content hashes) is
what must agree: a run resumed on data discretised differently (a rebuilt
codebook, another text model), or evaluated on such data, is refused with
``AssetsMismatchError`` naming what differs. A run on synthetic ids records
only its layout and model (no audio front end).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping, Optional

from absl import logging

from sld_jax import atomic_files
from sld_jax import file_hashes
from sld_jax.vocab import VocabLayout

FORMAT_VERSION = 1
ASSETS_SUBDIR = "assets"
MANIFEST = "assets.json"
GPT2_SUBDIR = "gpt2"
GPT2_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "config.json")
SAMPLE_RATE = 16000   # every extractor reads 16 kHz mono (sld_jax.speech.features)


class AssetsMismatchError(ValueError):
  """A run's recorded assets differ from those of the data it meets."""


class MissingAssetsError(FileNotFoundError):
  """A run directory without ``assets/assets.json`` (or with a file missing)."""


def assets_dir(model_dir: str) -> str:
  return os.path.join(model_dir, ASSETS_SUBDIR)


@dataclasses.dataclass(frozen=True)
class RunAssets:
  """A parsed ``assets.json`` whose files live in ``directory``."""

  directory: str
  manifest: Mapping[str, Any]

  @property
  def layout(self) -> VocabLayout:
    return VocabLayout(**self.manifest["layout"])

  @property
  def text(self) -> Optional[Mapping[str, Any]]:
    return self.manifest.get("text")

  @property
  def speech(self) -> Optional[Mapping[str, Any]]:
    return self.manifest.get("speech")

  @property
  def model(self) -> Optional[Mapping[str, Any]]:
    return self.manifest.get("model")

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def fingerprint(self) -> dict[str, Any]:
    """What must match for ids to mean the same thing (no paths, no model)."""
    return {key: self.manifest.get(key) for key in ("layout", "text", "speech", "sha256")}

  def check_files(self) -> None:
    """Raises if a recorded file is missing or its content changed."""
    for name, digest in sorted(self.manifest.get("sha256", {}).items()):
      path = self.path(name)
      if not os.path.isfile(path):
        raise MissingAssetsError(f"{path} is missing; {self.path(MANIFEST)} records it")
      if file_hashes.sha256(path) != digest:
        raise AssetsMismatchError(f"{path} has changed since it was recorded (sha256 "
                                  f"{file_hashes.sha256(path)[:12]}..., recorded {digest[:12]}...)")


def describe_differences(recorded: RunAssets, other: RunAssets) -> list[str]:
  """One line per differing fingerprint entry, e.g. ``sha256.codebook.npz: a81e... != 77b0...``."""
  def flat(value, prefix=""):
    if isinstance(value, Mapping):
      out = {}
      for key, item in value.items():
        out.update(flat(item, f"{prefix}{key}."))
      return out
    return {prefix[:-1]: value}
  mine, theirs = flat(recorded.fingerprint()), flat(other.fingerprint())
  short = lambda v: f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else json.dumps(v)
  return [f"{key}: {short(mine.get(key))} (recorded) != {short(theirs.get(key))}"
          for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]


def check_same(recorded: RunAssets, other: RunAssets, what: str) -> None:
  """Raises ``AssetsMismatchError`` if ``other`` discretises differently."""
  differences = describe_differences(recorded, other)
  if differences:
    shown = "\n  ".join(differences[:12])
    raise AssetsMismatchError(
        f"{what} uses discretisation assets that differ from those recorded in "
        f"{recorded.path(MANIFEST)}:\n  {shown}\nIts unit and text ids would not mean what the "
        "checkpoint learned. Use the data the run was trained on (the prepared dir in the "
        "manifest's source), or train a new run in a fresh MODEL_DIR.")


def load(model_dir: str) -> RunAssets:
  """The assets recorded in ``model_dir`` (a MODEL_DIR written by sld_jax.train).

  Raises:
    MissingAssetsError: no ``assets/assets.json`` there.
  """
  directory = assets_dir(os.path.abspath(os.path.expanduser(model_dir)))
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise MissingAssetsError(
        f"{path} not found: {model_dir} is not a run directory with recorded assets "
        "(sld_jax.train writes MODEL_DIR/assets/ when training starts; runs trained before "
        "that have none: retrain, or evaluate them with sld_jax.eval on their task)")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise MissingAssetsError(f"{path}: format_version {manifest.get('format_version')} != "
                             f"{FORMAT_VERSION}")
  return RunAssets(directory, manifest)


def load_if_present(model_dir: str) -> Optional[RunAssets]:
  try:
    return load(model_dir)
  except MissingAssetsError:
    return None


# ----------------------------------------------------------------------------
# Gathering the assets of a data source.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
  """A manifest (without hashes) and the files to copy: {name in assets/: source path}."""

  manifest: dict[str, Any]
  files: dict[str, str] = dataclasses.field(default_factory=dict)

  def hashed(self) -> dict[str, Any]:
    return {**self.manifest, "sha256": {name: file_hashes.sha256(path)
                                        for name, path in sorted(self.files.items())}}

  def as_assets(self) -> RunAssets:
    """A ``RunAssets`` view (files still at their sources), for comparisons."""
    return RunAssets("<source>", self.hashed())


def _text_assets(vocabulary: Any) -> tuple[Optional[dict[str, Any]], dict[str, str]]:
  from sld_jax import gpt2_vocab  # pylint: disable=g-import-not-at-top
  from sld_jax import seqio_vocab  # pylint: disable=g-import-not-at-top
  if isinstance(vocabulary, seqio_vocab.SpeechTextVocabulary):
    return ({"kind": "sentencepiece", "file": "text.model"},
            {"text.model": vocabulary.sentencepiece_model_file})
  if isinstance(vocabulary, gpt2_vocab.Gpt2SpeechTextVocabulary):
    source = vocabulary.tokenizer_dir
    files = {f"{GPT2_SUBDIR}/{name}": os.path.join(source, name) for name in GPT2_FILES
             if os.path.isfile(os.path.join(source, name))}
    return {"kind": "gpt2", "dir": GPT2_SUBDIR}, files
  logging.warning("run assets: unknown text vocabulary %s; hypotheses of this run cannot be "
                  "detokenised without it", type(vocabulary).__name__)
  return None, {}


def prepared_speech_assets(prepared_dir: str) -> tuple[dict[str, Any], dict[str, str]]:
  """The speech part of a manifest from a prepared dir (``sld_jax.speech.prepare``)."""
  from sld_jax.speech import prepare  # pylint: disable=g-import-not-at-top
  metadata = prepare.load_metadata(prepared_dir)
  options, files = metadata["options"], metadata["files"]
  extractor = metadata.get("extractor") or {}
  speech = {"extractor": options["extractor"],
            "extractor_kwargs": options.get("extractor_kwargs", {}),
            "feature_dim": extractor.get("dim"), "frame_rate_hz": extractor.get("frame_rate_hz"),
            "sample_rate": SAMPLE_RATE, "codebook": None,
            "num_clusters": metadata["num_clusters"], "merge_repeats": options["merge_repeats"],
            "unit_pieces": None}
  copied = {}
  for key, name in (("codebook", files.get("codebook")), ("unit_pieces", files.get("unit_pieces"))):
    if name:
      speech[key] = name
      copied[name] = os.path.join(prepared_dir, name)
  return speech, copied


def task_assets(task_name: str) -> _Pending:
  """The assets of a registered task's prepared data (prepares it if needed)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks  # pylint: disable=g-import-not-at-top  (registers the tasks)
  layout = tasks.get_layout(task_name)
  vocabulary = seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
  text, files = _text_assets(vocabulary)
  manifest = {"format_version": FORMAT_VERSION,
              "layout": dataclasses.asdict(layout), "text": text, "speech": None,
              "source": {"kind": "seqio", "task": task_name}}
  try:
    prepared_dir = tasks.prepared_dir(task_name)
  except ValueError:   # a task registered elsewhere (tests, user code): no prepared dir
    logging.warning("run assets: task %s has no prepared dir; no audio front end recorded",
                    task_name)
    return _Pending(manifest, files)
  speech, speech_files = prepared_speech_assets(prepared_dir)
  manifest["speech"] = speech
  manifest["source"]["prepared_dir"] = prepared_dir
  return _Pending(manifest, {**files, **speech_files})


def source_assets(source: Any) -> _Pending:
  """The assets of a training data source (``input_pipeline.BatchSource``)."""
  from sld_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  if isinstance(source, input_pipeline.SeqioSource):
    return task_assets(source.task_name)
  layout = source.layout
  return _Pending({"format_version": FORMAT_VERSION, "layout": dataclasses.asdict(layout),
                   "text": None, "speech": None,
                   "source": {"kind": type(source).__name__}})


# ----------------------------------------------------------------------------
# Recording them at training start.
# ----------------------------------------------------------------------------


def record(model_dir: str, train_data: Any, model_config: Any = None,
           is_primary: bool = True) -> RunAssets:
  """Writes ``MODEL_DIR/assets/`` for ``train_data``, or checks the recorded ones.

  A fresh run gets the assets (the primary process writes; the manifest last,
  atomically). A run that already has them (a resumed run) is checked: the
  training data must discretise exactly as recorded.

  Raises:
    AssetsMismatchError: ``train_data``'s assets differ from the recorded ones.
  """
  pending = source_assets(train_data)
  if model_config is not None:
    pending.manifest["model"] = dataclasses.asdict(model_config)
  recorded = load_if_present(model_dir)
  if recorded is not None:
    check_same(recorded, pending.as_assets(), f"the training data {pending.manifest['source']}")
    return recorded
  directory = assets_dir(os.path.abspath(os.path.expanduser(model_dir)))
  if is_primary:
    manifest = pending.hashed()
    os.makedirs(directory, exist_ok=True)
    for name, path in pending.files.items():
      target = os.path.join(directory, name)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with atomic_files.replacing(target) as tmp:
        shutil.copyfile(path, tmp)
    with atomic_files.replacing(os.path.join(directory, MANIFEST)) as tmp, open(tmp, "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
      f.write("\n")
    logging.info("Recorded the run assets in %s: %s", directory, sorted(manifest["sha256"]))
  return RunAssets(directory, pending.hashed())


def check_task(recorded: RunAssets, task_name: str) -> None:
  """Refuses an eval task whose prepared assets differ from the run's."""
  check_same(recorded, task_assets(task_name).as_assets(), f"task {task_name!r}")
