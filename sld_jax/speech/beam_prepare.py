"""``prepare`` on Apache Beam: the units of every split, computed by workers.

Same options, same outputs as ``sld_jax.speech.prepare`` (text.model,
codebook.npz, <split>.tfrecord-SSSSS-of-NNNNN, unit_pieces.model,
metadata.json, the ``*.done`` files); only the per-utterance stage runs on
Beam::

  launcher (one process, prepare's own stages)
    text model     SentencePiece over the normalised TRAIN transcripts
    codebook       k-means on the features of a seeded sample of TRAIN
                   utterances (kmeans_utterances, at most kmeans_frames frames)
  Beam, one pipeline for all splits still to do
    Create(utterances of the split)            audio paths, .npy paths or units
      -> ParDo(UtteranceUnits)                 extractor loaded once per worker
                                               (DoFn.setup); features ->
                                               nearest centre -> merge repeats;
                                               speed-perturbed train copies
      -> Map(serialise tf.train.Example)
      -> WriteToTFRecord(<split>.tfrecord, num_shards=prepare.num_shards_for(n),
                         "-SSSSS-of-NNNNN")
  launcher again (prepare's run(): finished splits are skipped)
    unit pieces    SentencePiece over the TRAIN units, then each split encoded
    metadata.json

The launcher-side stages fit on a sample: with the defaults (1000 utterances,
200k frames of 384-dim Whisper-tiny features = 0.3 GB of float32) they run on
any machine; a few million frames (some GB) still fit on one. The units of
an utterance are a function of the utterance and the codebook alone, so the
shards hold exactly the units of the single-process ``prepare``; only the
assignment of utterances to shards differs (Beam's sink decides it).

Bad utterances follow prepare's policy: ``on_error="raise"`` stops the
pipeline with prepare's error (naming the file and utterance);
``on_error="skip"`` leaves them out and counts them. Counts are Beam metrics
(namespace ``sld_prepare``: ``<split>/utterances``, ``<split>/records``,
``<split>/skipped``) and are printed to the log when the pipeline ends.

Workers import only this module, ``prepare`` and what it imports (numpy,
TensorFlow for the record format, the extractor's libraries): never seqio
or the ``tasks`` package. Beam lives in its own virtualenv (see
requirements-beam.txt and scripts/install_beam.sh).
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from typing import Any, Iterator, Optional, Sequence

from absl import logging

from sld_jax.speech import corpus_sources
from sld_jax.speech import kmeans
from sld_jax.speech import prepare as prepare_lib

try:
  import apache_beam as beam
  from apache_beam.options import pipeline_options as beam_options
except ImportError as e:  # pragma: no cover - the main environment has no Beam
  raise ImportError(
      "sld_jax.speech.beam_prepare needs Apache Beam, which lives in its own "
      "virtualenv: run scripts/install_beam.sh, then use .venv-beam/bin/python "
      "(scripts/prepare_data.py --beam does both)") from e

METRICS_NAMESPACE = "sld_prepare"


class BeamPrepareError(prepare_lib.PrepareError):
  """The pipeline failed or produced other counts than announced."""


class UtteranceUnits(beam.DoFn):
  """(split, Utterance) -> the prepared records of it (1 + speed copies).

  The extractor is loaded once per worker in ``setup``; the per-utterance
  work is prepare's own (``Preparer.unit_records`` over a one-utterance
  source), so both paths compute the same units.
  """

  def __init__(self, options: prepare_lib.PrepareOptions, kind: str,
               codebook: Optional[kmeans.Codebook], on_error: str):
    self._options = options
    self._kind = kind
    self._codebook = codebook
    self._on_error = on_error
    self._extractor = None

  def setup(self):
    if self._kind != "units":
      from sld_jax.speech import features  # pylint: disable=g-import-not-at-top
      self._extractor = features.get_extractor(
          self._options.extractor, **self._options.extractor_kwargs)

  def process(self, element) -> Iterator[dict[str, Any]]:
    split, utt = element
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, f"{split}/utterances").inc()
    one = corpus_sources.UtteranceSource(
        {prepare_lib.TRAIN: [], split: [utt]}, name="one utterance")
    preparer = prepare_lib.Preparer(one, "/nonexistent", self._options,
                                    extractor=self._extractor, codebook=self._codebook)
    try:
      records = list(preparer.unit_records(split))
    except prepare_lib.PrepareError as e:
      if self._on_error == "raise":
        raise
      beam.metrics.Metrics.counter(METRICS_NAMESPACE, f"{split}/skipped").inc()
      logging.warning("skipped: %s", e)
      return
    for record in records:
      beam.metrics.Metrics.counter(METRICS_NAMESPACE, f"{split}/records").inc()
      yield record


def pipeline_options(pipeline_args: Sequence[str]) -> beam_options.PipelineOptions:
  """Beam options: ``pipeline_args`` as given, DirectRunner by default.

  Without ``--runner`` the DirectRunner runs in multi-processing mode with
  ``--direct_num_workers`` (default: the machine's CPU count) processes.
  """
  args = list(pipeline_args)
  has = lambda flag: any(a == flag or a.startswith(flag + "=") for a in args)
  if not has("--runner"):
    args.append("--runner=DirectRunner")
  runner = next(a.split("=", 1)[1] if "=" in a else args[args.index(a) + 1]
                for a in args if a.startswith("--runner"))
  if runner == "DirectRunner":
    if not has("--direct_running_mode"):
      args.append("--direct_running_mode=multi_processing")
    if not has("--direct_num_workers"):
      args.append(f"--direct_num_workers={os.cpu_count() or 1}")
  return beam_options.PipelineOptions(args)


def _log_metrics(result) -> dict[str, int]:
  counters = {}
  for counter in result.metrics().query(
      beam.metrics.MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]:
    name = counter.key.metric.name
    counters[name] = counters.get(name, 0) + counter.committed
  for name in sorted(counters):
    logging.info("beam metric %s/%s = %d", METRICS_NAMESPACE, name, counters[name])
    print(f"beam metric {METRICS_NAMESPACE}/{name} = {counters[name]}", flush=True)
  return counters


def _write_units(source: prepare_lib.Source, out_dir: str,
                 options: prepare_lib.PrepareOptions,
                 codebook: Optional[kmeans.Codebook], splits: Sequence[str],
                 raw: bool, on_error: str, pipeline_args: Sequence[str]) -> None:
  """One Beam pipeline writing the (raw) shards of ``splits``; marks them done."""
  start = time.time()
  expected = {}
  # prepare's per-split progress bar would print once per element in the
  # workers; tqdm reads this when imported, so local worker processes inherit it.
  os.environ.setdefault("TQDM_DISABLE", "1")
  with beam.Pipeline(options=pipeline_options(pipeline_args)) as pipeline:
    for split in splits:
      speeds = 1 + (len(options.speed_perturb) if split == prepare_lib.TRAIN else 0)
      expected[split] = source.num_utterances(split) * speeds
      num_shards = prepare_lib.num_shards_for(expected[split])
      directory = os.path.join(out_dir, "raw_units") if raw else out_dir
      os.makedirs(directory, exist_ok=True)
      for stale in glob.glob(os.path.join(directory, f"beam-temp-{split}.tfrecord-*")):
        shutil.rmtree(stale)  # the sink's temporary files of an interrupted run
      _ = (pipeline
           | f"read {split}" >> beam.Create(
               [(split, utt) for utt in source.utterances(split)], reshuffle=True)
           | f"units {split}" >> beam.ParDo(UtteranceUnits(
               options, source.kind, codebook, on_error))
           | f"serialise {split}" >> beam.Map(
               prepare_lib.serialize_example)
           | f"write {split}" >> beam.io.WriteToTFRecord(
               os.path.join(directory, f"{split}.tfrecord"), num_shards=num_shards,
               shard_name_template="-SSSSS-of-NNNNN"))
  counters = _log_metrics(pipeline.result)
  seconds = round(time.time() - start, 1)
  for split in splits:
    name = f"raw_units/{split}" if raw else split
    files = prepare_lib.split_files(out_dir, split, raw)
    num_examples, num_units, duration = 0, 0, 0.0
    for record in prepare_lib.read_records(files):
      num_examples += 1
      num_units += len(record["units"])
      duration += record["duration"]
    skipped = counters.get(f"{split}/skipped", 0)
    speeds = expected[split] // max(1, source.num_utterances(split))
    if num_examples != expected[split] - skipped * speeds:
      raise BeamPrepareError(
          f"{out_dir}: split {split}: the pipeline wrote {num_examples} records, "
          f"expected {expected[split]} - {skipped * speeds} skipped")
    info = {"num_examples": num_examples, "num_units": num_units,
            "hours": round(duration / 3600.0, 4), "num_shards": len(files),
            "seconds_to_prepare": seconds}
    if skipped:
      info["num_skipped"] = skipped
    prepare_lib.mark_done(out_dir, name, info)
    logging.info("prepared %s/%s on Beam: %s", out_dir, name, info)


def prepare(source: prepare_lib.Source, out_dir: str,
            options: Optional[prepare_lib.PrepareOptions] = None,
            pipeline_args: Sequence[str] = (), on_error: str = "raise"
            ) -> dict[str, Any]:
  """``prepare_lib.prepare`` with the per-utterance stage on Beam.

  Args:
    source: the corpus (its utterances are listed by the launcher; audio and
      feature files are read by the workers, so they must see the paths).
    out_dir: a POSIX directory of the launcher (on a cluster: shared storage
      mounted at the same path, since the sinks write there too).
    options: as for ``prepare``.
    pipeline_args: Beam flags (``--runner``, ``--direct_num_workers``,
      ``--project``, ``--flink_master``, ...), passed through.
    on_error: "raise" (stop at the first bad utterance) or "skip" (count).

  Returns:
    The metadata (as in ``metadata.json``).
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  options = options if options is not None else prepare_lib.PrepareOptions()
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  preparer = prepare_lib.Preparer(source, out_dir, options)
  with prepare_lib.locked(out_dir):
    preparer.check_options()
    if prepare_lib.is_prepared(out_dir):
      return prepare_lib.load_metadata(out_dir)
    preparer.text_model()
    codebook = preparer.codebook()
    raw = bool(options.unit_pieces)
    todo = [split for split in source.splits() if not os.path.exists(
        os.path.join(out_dir, ("raw_units/" if raw else "") + split + ".done"))]
    if todo:
      _write_units(source, out_dir, options, codebook, todo, raw, on_error,
                   pipeline_args)
    return preparer.run()  # unit pieces and metadata; finished splits are kept

