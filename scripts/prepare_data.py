#!/usr/bin/env python3
"""Prepares a corpus into units + text for training (see docs/corpora.md).

Each ``--split NAME=SPEC`` adds one split; one split must be named "train"
(the codebook and the text model are fit on it). SPEC depends on the corpus:

  librispeech  subsets under --root, comma-separated:
                 --split train=train-clean-100,train-clean-360
                 --split dev_clean=dev-clean --split test_clean=test-clean
  manifest     a TSV "audio_path<TAB>transcript[<TAB>speaker]":
                 --split train=train.tsv --split test=test.tsv
  units        fairseq-style units file and line-aligned transcripts:
                 --split train=train.km:train.wrd
  npy          a directory of <id>.npy + transcripts.tsv, or a TSV manifest
                 --split train=feats/train
  embedded     no --split: --config digits_default (the synthetic corpus)

Examples:

  # The paper's setup: HuBERT/WavLM units made elsewhere (K=2000), no
  # repeat merging, 6000 unit pieces, into the LibriSpeech task's dir.
  python scripts/prepare_data.py units --num_clusters 2000 \
      --no-merge_repeats --unit_pieces 6000 --text_model_type unigram \
      --text_vocab_size 5000 --out_dir ~/.cache/sld_jax/prepared/librispeech \
      --split train=train.km:train.wrd --split dev_clean=dev_clean.km:dev_clean.wrd

  # LibriSpeech audio -> Whisper-tiny units, speed-perturbed train split.
  python scripts/prepare_data.py librispeech --root /data/LibriSpeech \
      --extractor whisper --num_clusters 500 --speed_perturb 0.9,1.1 \
      --out_dir /data/prepared/ls100 --split train=train-clean-100 \
      --split dev_clean=dev-clean

  # The same on Apache Beam (its own virtualenv, scripts/install_beam.sh):
  # DirectRunner with 2 worker processes here, or any runner's flags.
  python scripts/prepare_data.py librispeech --beam --direct_num_workers 2 ...
  python scripts/prepare_data.py librispeech --beam --runner DataflowRunner \
      --project P --region R --temp_location gs://B/tmp \
      --requirements_file requirements-beam.txt ...

A finished directory is left as it is; an interrupted one is completed.
With --beam, flags this script does not know are Beam pipeline options
(docs/data.md); the script reruns itself with .venv-beam/bin/python when the
current interpreter has no Beam.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # pylint: disable=g-import-not-at-top

from sld_jax import console  # pylint: disable=g-import-not-at-top
from sld_jax.speech import prepare  # pylint: disable=g-import-not-at-top
from sld_jax.speech import readers  # pylint: disable=g-import-not-at-top

CORPORA = ("librispeech", "manifest", "units", "npy", "embedded")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM_PYTHON = os.path.join(REPO_ROOT, ".venv-beam", "bin", "python")


def _has_beam() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("apache_beam") is not None


def _rerun_in_beam_venv(argv: list[str]) -> int:
  """Runs this script again with the Beam virtualenv's interpreter."""
  if not os.path.exists(BEAM_PYTHON):
    print("error: --beam needs Apache Beam, which lives in its own virtualenv "
          f"({BEAM_PYTHON} is missing): run scripts/install_beam.sh first",
          file=sys.stderr)
    return 1
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  # Beam's worker processes import sld_jax from this checkout.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT,
                                                    env.get("PYTHONPATH")]))
  return subprocess.call([BEAM_PYTHON, os.path.abspath(__file__), *argv],
                         env=env)


def _parse_splits(specs: list[str]) -> dict[str, str]:
  splits = {}
  for spec in specs:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
      raise SystemExit(f"--split must look like NAME=SPEC, got {spec!r}")
    if name in splits:
      raise SystemExit(f"--split {name} given twice")
    splits[name] = value
  return splits


def _read_split(args, spec: str) -> readers.ReadResult:
  if args.corpus == "librispeech":
    if not args.root:
      raise SystemExit("librispeech needs --root")
    return readers.read_librispeech(args.root, spec.split(","),
                                    on_error=args.on_error)
  if args.corpus == "manifest":
    return readers.read_manifest(spec, on_error=args.on_error)
  if args.corpus == "units":
    units_path, sep, text_path = spec.partition(":")
    if not sep:
      raise SystemExit(f"units splits look like UNITS_FILE:TRANSCRIPTS_FILE, "
                       f"got {spec!r}")
    return readers.read_fairseq_units(units_path, text_path,
                                      args.num_clusters, on_error=args.on_error)
  return readers.read_npy_features(spec, on_error=args.on_error)


def build_source(args) -> prepare.Source:
  if args.corpus == "embedded":
    return prepare.EmbeddedSource(args.config)
  splits = _parse_splits(args.split)
  if not splits:
    raise SystemExit(f"{args.corpus} needs at least --split train=...")
  read = {name: _read_split(args, spec) for name, spec in splits.items()}
  for name, result in read.items():
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(result.skipped_by_reason().items()))
    print(f"split {name}: {len(result)} utterances"
          + (f", {result.num_skipped} skipped ({reasons})" if result.num_skipped else ""))
    if not len(result):
      raise prepare.PrepareError(
          f"nothing left of split {name} ({splits[name]}) after skipping "
          f"{result.num_skipped} bad items ({reasons or 'none'}); fix the input (the "
          "warnings above name each item)")
  return prepare.UtteranceSource({k: v.utterances for k, v in read.items()},
                                 name=f"{args.corpus}:{json.dumps(splits)}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("corpus", choices=CORPORA)
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--split", action="append", default=[],
                      help="NAME=SPEC (see above); repeat per split")
  parser.add_argument("--root", help="librispeech: directory of the subsets")
  parser.add_argument("--config", default="digits_default",
                      help="embedded: corpus config name")
  parser.add_argument("--on_error", choices=("raise", "skip"), default="raise",
                      help="bad corpus items: stop, or skip them (logged)")
  parser.add_argument("--extractor", default=None,
                      choices=("whisper", "logmel", "npy", "units"),
                      help="default: units/npy for those corpora, else whisper")
  parser.add_argument("--extractor_kwargs", default="{}",
                      help='JSON, e.g. \'{"stack_frames": 2}\'')
  parser.add_argument("--num_clusters", type=int, default=128,
                      help="K (imported units: their number of units)")
  parser.add_argument("--kmeans_seed", type=int, default=0)
  parser.add_argument("--kmeans_utterances", type=int, default=1000)
  parser.add_argument("--kmeans_frames", type=int, default=200_000)
  parser.add_argument("--merge_repeats", action=argparse.BooleanOptionalAction,
                      default=True)
  parser.add_argument("--unit_pieces", type=int, default=0)
  parser.add_argument("--speed_perturb", default="",
                      help="extra train speed factors, e.g. 0.9,1.1")
  parser.add_argument("--text_model_type", default="unigram",
                      choices=("unigram", "word", "bpe", "char"))
  parser.add_argument("--text_vocab_size", type=int, default=1000)
  parser.add_argument("--text_model_file", default=None,
                      help="use this SentencePiece model (pad 0, eos 1, unk 2)")
  parser.add_argument("--beam", action="store_true",
                      help="compute the units on Apache Beam (DirectRunner with "
                      "all CPUs unless --runner/--direct_num_workers are given; "
                      "unknown flags are Beam options)")
  parser.add_argument("--verbose", action="store_true",
                      help="show every library's log lines, INFO included (default: "
                      "progress bars, warnings and errors)")
  args, pipeline_args = parser.parse_known_args(argv)
  if pipeline_args and not args.beam:
    parser.error(f"unrecognized arguments: {' '.join(pipeline_args)}")
  if args.beam and not _has_beam():
    return _rerun_in_beam_venv(sys.argv[1:] if argv is None else list(argv))
  console.setup(verbose=args.verbose, datasets=args.corpus == "embedded")
  if args.verbose:
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)

  extractor = args.extractor or {"units": "units", "npy": "npy"}.get(
      args.corpus, "whisper")
  options = prepare.PrepareOptions(
      extractor=extractor,
      extractor_kwargs=json.loads(args.extractor_kwargs),
      num_clusters=args.num_clusters, kmeans_seed=args.kmeans_seed,
      kmeans_utterances=args.kmeans_utterances,
      kmeans_frames=args.kmeans_frames, merge_repeats=args.merge_repeats,
      unit_pieces=args.unit_pieces,
      speed_perturb=tuple(float(f) for f in args.speed_perturb.split(",")
                          if f.strip()),
      text_model_type=args.text_model_type,
      text_vocab_size=args.text_vocab_size,
      text_model_file=args.text_model_file)
  try:
    if args.beam:
      from sld_jax.speech import beam_prepare  # pylint: disable=g-import-not-at-top
      metadata = beam_prepare.prepare(build_source(args), args.out_dir, options,
                                      pipeline_args, on_error=args.on_error)
    else:
      metadata = prepare.prepare(build_source(args), args.out_dir, options,
                                 on_error=args.on_error)
  except (prepare.PrepareError, readers.CorpusError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({k: metadata[k] for k in (
      "num_clusters", "speech_size", "text_size", "splits", "skipped") if k in metadata},
                   indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
