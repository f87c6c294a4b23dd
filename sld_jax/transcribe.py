r"""Transcribes audio files with a trained run: ``python -m sld_jax.transcribe``.

  python -m sld_jax.transcribe --model_dir=runs/demo a.wav b.flac      # files
  python -m sld_jax.transcribe --model_dir=runs/demo recordings/       # every audio file below
  python -m sld_jax.transcribe --model_dir=runs/demo --manifest=list.tsv \
      --output_dir=runs/demo/transcripts [--method=beam --beam_size=8]

The run directory is all that is needed: its ``assets/`` (written when
training started, ``sld_jax.run_assets``) rebuild the audio front end the
model was trained with, and its latest checkpoint (or ``--step``) gives the
parameters. Any sample rate (resampled), any channel count (averaged to
mono), any format soundfile reads (16/24/32-bit int, float; wav, flac, ogg).

A manifest is a TSV of ``audio_path[<TAB>transcript[<TAB>speaker]]`` lines
(paths relative to the manifest; an ``audio<TAB>transcript`` header is
allowed). With transcripts, WER/CER and S/D/I are computed as by
``sld_jax.eval`` (normalised, lower-cased text).

Output: one ``id<TAB>hypothesis`` line per file on stdout (in input order),
and with ``--output_dir`` the files ``sld_jax.eval`` writes per split::

  predictions.jsonl   {"id", "audio", "hypothesis", ["reference", "word_errors",
                       "substitutions", ...], "ended", "speech_tokens", "seconds"}
  metrics.json        num_utterances, decoding settings, speed, and with
                      references wer/cer (%), substitutions/deletions/insertions

Files are sorted by length into prompt buckets (powers of two) of
``--batch_size`` rows, so decoding compiles once per bucket. Audio whose
speech tokens do not fit the model (``DecoderConfig.max_length`` positions
hold ``0 units <speech_end>`` and the transcript) is an error naming the
file; ``--long_audio=skip`` skips such files instead, listing them. Nothing
is ever cut. Unreadable files are an error listing every one of them
(``--skip_unreadable`` skips them instead). Single process.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from sld_jax import console
from sld_jax import model_inputs

if TYPE_CHECKING:
  from sld_jax import scoring

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".opus")
_HEADER_FIRST = ("audio", "audio_path", "path", "file")


class TranscribeError(ValueError):
  """Bad input: unreadable files, a bad manifest line, audio too long."""


@dataclasses.dataclass
class Item:
  """One file to transcribe."""

  id: str
  audio: str
  reference: Optional[str] = None
  speaker: Optional[str] = None


# ----------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------


def read_manifest(path: str) -> list[Item]:
  """``audio_path[<TAB>transcript[<TAB>speaker]]`` lines (ids: the path as written)."""
  if not os.path.isfile(path):
    raise TranscribeError(f"manifest not found: {path}")
  base = os.path.dirname(os.path.abspath(path))
  items = []
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    fields = [field.strip() for field in line.split("\t")]
    if not items and lineno == 1 and fields[0].lower() in _HEADER_FIRST:
      continue
    if len(fields) > 3 or not fields[0]:
      raise TranscribeError(f"{path}:{lineno}: expected audio_path[<TAB>transcript[<TAB>"
                            f"speaker]], got {len(fields)} columns: {line[:80]!r}")
    items.append(Item(id=fields[0], audio=os.path.normpath(os.path.join(base, fields[0])),
                      reference=fields[1] if len(fields) > 1 and fields[1] else None,
                      speaker=fields[2] if len(fields) > 2 and fields[2] else None))
  if not items:
    raise TranscribeError(f"{path}: no audio files listed")
  return items


def collect_inputs(paths: Sequence[str], manifest: Optional[str] = None) -> list[Item]:
  """Files, directories (every audio file below, sorted) and a manifest."""
  items = read_manifest(manifest) if manifest else []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                     for name in names if name.lower().endswith(AUDIO_EXTENSIONS))
      if not found:
        raise TranscribeError(f"directory {path} holds no audio files ({AUDIO_EXTENSIONS})")
      items += [Item(id=os.path.relpath(f, path), audio=f) for f in found]
    else:
      items.append(Item(id=path, audio=path))
  if not items:
    raise TranscribeError("nothing to transcribe: give audio files, a directory or "
                          "--manifest=list.tsv")
  return items


def check_readable(items: Sequence[Item], skip: bool = False) -> list[Item]:
  """Checks every file's header; raises listing all unreadable files (or skips them)."""
  from sld_jax.speech import audio as audio_lib  # pylint: disable=g-import-not-at-top
  good, bad = [], []
  for item in items:
    try:
      audio_lib.audio_info(item.audio)
      good.append(item)
    except audio_lib.AudioError as e:
      bad.append(str(e))
  if bad and not skip:
    raise TranscribeError(f"{len(bad)} of {len(items)} audio file(s) cannot be read "
                          "(--skip_unreadable skips them):\n  " + "\n  ".join(bad))
  for problem in bad:
    logging.warning("skipped: %s", problem)
  if not good:
    raise TranscribeError("no readable audio files")
  return good


# ----------------------------------------------------------------------------
# Prompts and batches.
# ----------------------------------------------------------------------------


def _prompt(speech_ids: np.ndarray, layout) -> np.ndarray:
  """``0 u1 .. uN <speech_end>``: the training prefix (``model_inputs.prompt_tokens``)."""
  return model_inputs.prompt_tokens(np.append(np.asarray(speech_ids, np.int32),
                                              layout.speech_end_id)).astype(np.int32)


@dataclasses.dataclass
class Batch:
  """Prompt rows ``[rows, width]`` and which items they hold (-1: padding row)."""

  prompts: np.ndarray
  lengths: np.ndarray
  items: list[int]


def length_batches(prompts: Sequence[np.ndarray], rows: int, limit: int) -> list[Batch]:
  """Prompts sorted by length, in power-of-two buckets of ``rows`` rows.

  E.g. lengths [40, 5, 20, 7], rows=2, limit=64 -> widths 16, 32, 64 with
  items [1, 3], [2, -1], [0, -1]; padding rows (item -1) are all zeros with
  length 1, and their results are dropped.
  """
  from sld_jax import eval_batches  # pylint: disable=g-import-not-at-top
  order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
  buckets: dict[int, list[int]] = {}
  for index in order:
    buckets.setdefault(eval_batches.prompt_bucket(len(prompts[index]), limit), []).append(index)
  batches = []
  for width, members in sorted(buckets.items()):
    for start in range(0, len(members), rows):
      chunk = members[start:start + rows]
      tokens = np.zeros((rows, width), np.int32)
      lengths = np.ones(rows, np.int32)
      for row, index in enumerate(chunk):
        tokens[row, :len(prompts[index])] = prompts[index]
        lengths[row] = len(prompts[index])
      batches.append(Batch(tokens, lengths, chunk + [-1] * (rows - len(chunk))))
  return batches


# ----------------------------------------------------------------------------
# The model of a run directory.
# ----------------------------------------------------------------------------


def load_model(model_dir: str, assets, step: Optional[int] = None):
  """``SpeechTextLM`` with the run's decoder config, and its parameters."""
  import functools  # pylint: disable=g-import-not-at-top
  from sld_jax import partitioning  # pylint: disable=g-import-not-at-top
  from sld_jax import run_assets  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from sld_jax import trained_run  # pylint: disable=g-import-not-at-top
  from sld_jax.lm import SpeechTextLM  # pylint: disable=g-import-not-at-top
  from sld_jax.model.config import DecoderConfig  # pylint: disable=g-import-not-at-top
  if not assets.model:
    raise run_assets.MissingAssetsError(
        f"{assets.path(run_assets.MANIFEST)} records no model config")
  config = dict(assets.model)
  lm = SpeechTextLM(assets.layout, decoder=functools.partial(
      lambda vocab_size, **kw: DecoderConfig(**{**kw, "vocab_size": vocab_size}),
      **{k: v for k, v in config.items() if k != "vocab_size"}))
  mesh = partitioning.make_mesh()
  rules = partitioning.DEFAULT_LOGICAL_AXIS_RULES
  abstract, shardings = partitioning.abstract_state(
      lm.init_params, jax.random.key(0), mesh=mesh, rules=rules)
  location = trained_run.locate_checkpoints(model_dir)
  step = trained_run.select_steps(location, "latest" if step is None else step)[-1]
  task = assets.manifest.get("source", {}).get("task")
  params = trained_run.restore_params(location, step, abstract, lm.layout,
                                      f"{lm.config} from {assets.path(run_assets.MANIFEST)}",
                                      [task] if task else [])
  return lm, mesh, rules, shardings, params, step


def transcribe(model_dir: str, items: Sequence[Item], *,
               decoding_config=None, batch_size: int = 8, step: Optional[int] = None,
               long_audio: str = "error", progress: bool = True) -> scoring.SplitScore:
  """Transcribes ``items``; returns a ``scoring.SplitScore`` (records in input order).

  Raises:
    TranscribeError: audio too long for the model (``long_audio="error"``).
    run_assets.MissingAssetsError / AssetsMismatchError: a run directory
      without (intact) assets.
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  from sld_jax import scoring  # pylint: disable=g-import-not-at-top
  from sld_jax import partitioning  # pylint: disable=g-import-not-at-top
  from sld_jax import run_assets  # pylint: disable=g-import-not-at-top
  from sld_jax.speech import front_end as front_end_lib  # pylint: disable=g-import-not-at-top
  if long_audio not in ("error", "skip"):
    raise ValueError(f"long_audio must be 'error' or 'skip', got {long_audio!r}")
  assets = run_assets.load(model_dir)
  front_end = front_end_lib.FrontEnd(assets)
  detokenize = front_end_lib.TextDecoder(assets)
  decoding_config = decoding_config or scoring.DecodingConfig()
  max_length = int(assets.model["max_length"])

  prompts, seconds, kept, too_long = [], [], [], []
  for item in tqdm.tqdm(items, desc="speech tokens", unit="file", disable=not progress):
    waveform = front_end.load(item.audio)
    prompt = _prompt(front_end.speech_ids(waveform), front_end.layout)
    duration = waveform.shape[0] / front_end.sample_rate
    if len(prompt) >= max_length:   # no room left for a single text token
      too_long.append(f"{item.audio}: {duration:.1f} s -> {len(prompt) - 2} speech tokens; "
                      f"the model holds {max_length} positions for `0 units <speech_end>` "
                      f"and the transcript (at most {max_length - 3} speech tokens)")
      continue
    kept.append(item)
    prompts.append(prompt)
    seconds.append(duration)
  if too_long and long_audio == "error":
    raise TranscribeError(
        f"{len(too_long)} file(s) too long for this model (cut them into shorter pieces, or "
        "--long_audio=skip to skip them):\n  " + "\n  ".join(too_long))
  for problem in too_long:
    logging.warning("skipped (too long): %s", problem)
  if not kept:
    raise TranscribeError("every file was skipped: nothing to transcribe")

  lm, mesh, rules, shardings, params, step = load_model(model_dir, assets, step)
  scorer = scoring.Scorer(lm, mesh, rules, shardings, decoding_config)
  rows = -(-batch_size // partitioning.batch_shards(mesh)) * partitioning.batch_shards(mesh)
  batches = length_batches(prompts, rows, max_length)
  records: list[Optional[dict[str, Any]]] = [None] * len(kept)
  bar = tqdm.tqdm(total=len(kept), desc="transcribing", unit="file", disable=not progress)
  start, compile_start = time.perf_counter(), scorer.compile_seconds
  for batch in batches:
    result = scorer.decode(params, batch.prompts, batch.lengths)
    for row, index in enumerate(batch.items):
      if index < 0:
        continue
      ids = scoring.decoding_text_ids(result.tokens[row], result.lengths[row], lm.layout)
      item = kept[index]
      records[index] = {
          "id": item.id, "audio": item.audio, "hypothesis": detokenize(ids),
          **({"speaker": item.speaker} if item.speaker else {}),
          "ended": bool(result.ended[row]), "hypothesis_tokens": len(ids),
          "decode_score": float(result.scores[row]),
          "speech_tokens": int(batch.lengths[row]) - 2, "seconds": round(seconds[index], 3)}
    bar.update(sum(i >= 0 for i in batch.items))
  bar.close()
  total_seconds = time.perf_counter() - start
  compile_seconds = scorer.compile_seconds - compile_start
  metrics = {"num_utterances": len(kept), "num_skipped_too_long": len(too_long),
             "num_unended": sum(not r["ended"] for r in records), "step": step,
             "model_dir": os.path.abspath(model_dir), "compiled_buckets": scorer.num_compiled,
             "audio_seconds": round(float(sum(seconds)), 3),
             "decode_seconds": total_seconds - compile_seconds,
             "compile_seconds": compile_seconds, **decoding_config.describe()}
  if metrics["num_unended"]:
    logging.warning("%d transcript(s) reached the text budget (max_decode_length=%d, or the "
                    "positions left after a long prompt) without <text_end>",
                    metrics["num_unended"], decoding_config.max_decode_length)
  metrics.update(score_references(kept, records))
  return scoring.SplitScore(records, metrics)


def score_references(items: Sequence[Item], records: list[dict[str, Any]]) -> dict[str, Any]:
  """Adds per-file errors to ``records`` with a reference; corpus WER/CER (%) and S/D/I."""
  from sld_jax import wer as wer_lib  # pylint: disable=g-import-not-at-top
  from sld_jax.speech import text_normalize  # pylint: disable=g-import-not-at-top
  words, chars, scored = wer_lib.ErrorCounts(), wer_lib.ErrorCounts(), 0
  for item, record in zip(items, records):
    if item.reference is None:
      continue
    reference = text_normalize.normalize_transcript(item.reference).lower()
    hypothesis = record["hypothesis"].lower()
    word = wer_lib.word_errors(reference, hypothesis)
    char = wer_lib.char_errors(reference, hypothesis)
    words, chars, scored = words + word, chars + char, scored + 1
    record.update(reference=reference, hypothesis=hypothesis, word_errors=word.errors,
                  word_count=word.reference_length, substitutions=word.substitutions,
                  deletions=word.deletions, insertions=word.insertions,
                  char_errors=char.errors, char_count=char.reference_length)
  if not scored:
    return {}
  return {"num_with_reference": scored, "wer": 100.0 * words.rate, "cer": 100.0 * chars.rate,
          "substitutions": words.substitutions, "deletions": words.deletions,
          "insertions": words.insertions, "word_errors": words.errors,
          "reference_words": words.reference_length, "char_errors": chars.errors,
          "reference_chars": chars.reference_length}


# ----------------------------------------------------------------------------
# The main.
# ----------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  if "model_dir" in FLAGS:
    return
  flags.DEFINE_string("model_dir", None, "A run directory written by sld_jax.train.")
  flags.DEFINE_string("manifest", None, "TSV: audio_path[<TAB>transcript[<TAB>speaker]].")
  flags.DEFINE_string("output_dir", None, "Write predictions.jsonl and metrics.json here.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("method", "greedy", ["greedy", "beam"], "Decoding method.")
  flags.DEFINE_integer("beam_size", 4, "Beams per file (beam search).")
  flags.DEFINE_float("length_penalty", 0.0, "GNMT length penalty alpha (beam search).")
  flags.DEFINE_integer("max_decode_length", 150, "Most text tokens per file.")
  flags.DEFINE_integer("batch_size", 8, "Files decoded together (rounded up to the devices).")
  flags.DEFINE_enum("long_audio", "error", ["error", "skip"],
                    "Audio too long for the model: stop with an error naming the files, or "
                    "skip (and list) them. Audio is never cut.")
  flags.DEFINE_bool("skip_unreadable", False, "Skip unreadable files (listed) instead of "
                    "stopping.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv) -> None:
  console.setup_from_flags()
  from sld_jax import scoring  # pylint: disable=g-import-not-at-top
  from sld_jax import run_assets  # pylint: disable=g-import-not-at-top
  from sld_jax.speech import audio as audio_lib  # pylint: disable=g-import-not-at-top
  if not FLAGS.model_dir:
    raise app.UsageError("--model_dir=MODEL_DIR is required (a run written by sld_jax.train)")
  try:
    items = check_readable(collect_inputs(argv[1:], FLAGS.manifest), FLAGS.skip_unreadable)
    score = transcribe(
        FLAGS.model_dir, items, step=FLAGS.step, batch_size=FLAGS.batch_size,
        long_audio=FLAGS.long_audio, progress=FLAGS.progress,
        decoding_config=scoring.DecodingConfig(
            method=FLAGS.method, beam_size=FLAGS.beam_size,
            length_penalty=FLAGS.length_penalty, max_decode_length=FLAGS.max_decode_length))
  except (TranscribeError, audio_lib.AudioError, run_assets.MissingAssetsError,
          run_assets.AssetsMismatchError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for record in score.predictions:
    print(f"{record['id']}\t{record['hypothesis']}", flush=True)
  metrics = score.metrics
  if "wer" in metrics:
    print(f"WER {metrics['wer']:.2f}% (S/D/I {metrics['substitutions']}/{metrics['deletions']}/"
          f"{metrics['insertions']} over {metrics['reference_words']} words), CER "
          f"{metrics['cer']:.2f}% on {metrics['num_with_reference']} file(s)", flush=True)
  if FLAGS.output_dir:
    scoring.write_split(FLAGS.output_dir, score)
    logging.info("wrote %s and %s", os.path.join(FLAGS.output_dir, scoring.PREDICTIONS_FILE),
                 os.path.join(FLAGS.output_dir, scoring.METRICS_FILE))


def run() -> None:
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
