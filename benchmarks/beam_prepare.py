r"""Throughput of the Beam preparation pipeline (DirectRunner, 1 and 2 workers).

Prepares the embedded digits smoke corpus (210 utterances, Whisper-tiny
features, K=128) once with the single-process ``prepare`` (the reference),
then, for each worker count, runs ``scripts/prepare_data.py --beam`` on a
copy of the reference dir holding only the text model and the codebook, so
that only the per-utterance stage runs on Beam. Reports utterances/s, the
real-time factor (wall seconds per second of audio) and a projection for
LibriSpeech 960 h on N workers, and checks that every utterance got the
reference's units.

  python benchmarks/beam_prepare.py --workers 1,2

Needs the Beam venv (scripts/install_beam.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from sld_jax.speech import prepare  # pylint: disable=g-import-not-at-top

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRISPEECH_HOURS = 960.0
LIBRISPEECH_UTTERANCES = 281_241
OPTIONS = prepare.PrepareOptions(extractor="whisper", num_clusters=128,
                                 text_model_type="word", text_vocab_size=1000)
FLAGS = ["--extractor", "whisper", "--num_clusters", "128", "--text_model_type", "word",
         "--text_vocab_size", "1000"]
FIT_STAGES = ("options.json", "text.model", "text.vocab", "text.done", "codebook.npz",
              "codebook.done")


def _units(out_dir: str) -> dict[str, np.ndarray]:
  return {r["id"]: r["units"] for split in ("train", "dev", "test")
          for r in prepare.read_records(prepare.split_files(out_dir, split))}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--config", default="digits_smoke")
  parser.add_argument("--work_dir", default=None)
  args = parser.parse_args()
  work = args.work_dir or tempfile.mkdtemp(prefix="beam_prepare_bench_")
  reference = os.path.join(work, "single")
  print(f"load average at start: {os.getloadavg()}")
  start = time.time()
  metadata = prepare.prepare(prepare.EmbeddedSource(args.config), reference, OPTIONS)
  single_units_seconds = sum(
      json.load(open(os.path.join(reference, f"{s}.done")))["seconds_to_prepare"]
      for s in metadata["splits"])
  utterances = sum(v["num_examples"] for v in metadata["splits"].values())
  audio_seconds = 3600.0 * sum(v["hours"] for v in metadata["splits"].values())
  print(f"reference prepare: {time.time() - start:.1f} s ({utterances} utterances, "
        f"{audio_seconds:.0f} s of audio; units stage {single_units_seconds:.1f} s)")
  reference_units = _units(reference)

  rows = [("single process (prepare)", single_units_seconds)]
  for workers in [int(w) for w in args.workers.split(",")]:
    out = os.path.join(work, f"beam{workers}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name in FIT_STAGES:
      shutil.copy(os.path.join(reference, name), out)
    load = os.getloadavg()[0]
    start = time.time()
    subprocess.run([sys.executable, "scripts/prepare_data.py", "embedded", "--config",
                    args.config, "--beam", f"--direct_num_workers={workers}", *FLAGS,
                    "--out_dir", out], cwd=REPO_ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.time() - start
    pipeline = json.load(open(os.path.join(out, "train.done")))["seconds_to_prepare"]
    units = _units(out)
    assert sorted(units) == sorted(reference_units)
    assert all(np.array_equal(units[k], reference_units[k]) for k in units)
    print(f"beam {workers} worker(s): pipeline {pipeline:.1f} s, command {total:.1f} s "
          f"(load before: {load:.1f}); units identical to the reference")
    rows.append((f"Beam DirectRunner, {workers} worker(s)", pipeline))

  print("\n| path | units stage wall s | utterances/s | real-time factor (wall / audio) |")
  print("|---|---|---|---|")
  for name, seconds in rows:
    print(f"| {name} | {seconds:.1f} | {utterances / seconds:.2f} | "
          f"{seconds / audio_seconds:.3f} |")
  # At this size the pipeline time is mostly start-up (worker processes,
  # TensorFlow import, one extractor load per worker, the sink's finalising);
  # per utterance a worker does the single-process work. Projection: fixed
  # start-up + LibriSpeech audio x single-process RTF / workers.
  rtf = single_units_seconds / audio_seconds
  startup = rows[1][1] - single_units_seconds
  print(f"\nper-worker RTF {rtf:.4f} (single-process units stage); Beam start-up "
        f"{startup:.0f} s (1-worker pipeline minus that)")
  print("| workers | LibriSpeech 960 h, projected wall time |")
  print("|---|---|")
  for workers in (1, 8, 32, 100, 300):
    hours = (LIBRISPEECH_HOURS * rtf / workers) + startup / 3600
    print(f"| {workers} | {hours:.2f} h |")
  print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
