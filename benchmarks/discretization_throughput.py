r"""Discretization throughput: seconds of audio processed per CPU second.

Synthesises English sentences with espeak-ng (several voices), then times on
the CPU each stage of turning audio into units:

  load+resample   read the 22.05 kHz wav, resample to 16 kHz
  logmel          LogMelExtractor (80 x 100 Hz)
  whisper         WhisperEncoderExtractor (tiny.en, int8, 384 x 50 Hz)
  kmeans assign   Codebook.assign with K clusters on the whisper / logmel frames

"audio s / CPU s" divides audio duration by process CPU time (all threads), so
it is what one core-second buys; "audio s / wall s" is the speed seen on this
machine with its thread settings.

  python benchmarks/discretization_throughput.py --num_utterances 40
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # pylint: disable=g-import-not-at-top

from sld_jax.speech import audio  # pylint: disable=g-import-not-at-top
from sld_jax.speech import features
from sld_jax.speech import kmeans

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "he was not an ill disposed young man",
    "she sells sea shells by the sea shore every summer morning",
    "a journey of a thousand miles begins with a single step",
    "the committee will meet again on thursday to discuss the budget",
    "please remember to bring your umbrella because it might rain later",
    "they walked along the river until the sun went down behind the hills",
    "numbers like seven and forty two are easy to say but hard to spell",
)
VOICES = ("en-us", "en-gb+f2", "en-gb-scotland+m3", "en-029+f4", "en-us-nyc+m5")


def _synthesise(directory: str, count: int) -> list[str]:
  paths = []
  for i in range(count):
    path = os.path.join(directory, f"utt{i:04d}.wav")
    text = SENTENCES[i % len(SENTENCES)]
    voice = VOICES[i % len(VOICES)]
    subprocess.run(["espeak-ng", "-v", voice, "-w", path, text], check=True)
    paths.append(path)
  return paths


def _timed(fn, items):
  cpu, wall = time.process_time(), time.perf_counter()
  out = [fn(x) for x in items]
  return out, time.process_time() - cpu, time.perf_counter() - wall


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_utterances", type=int, default=40)
  parser.add_argument("--num_clusters", type=int, default=2000)
  parser.add_argument("--whisper_intra_threads", type=int, default=0,
                      help="CTranslate2 intra-op threads (0: its default)")
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    paths = _synthesise(tmp, args.num_utterances)
    _timed(audio.load_audio, paths[:2])  # warm-up
    waves, load_cpu, load_wall = _timed(audio.load_audio, paths)
  seconds = sum(len(w) for w in waves) / audio.TARGET_SAMPLE_RATE
  rows = [("load+resample 22.05k->16k", load_cpu, load_wall, "")]

  logmel = features.LogMelExtractor()
  logmel(waves[0])
  mel_feats, cpu, wall = _timed(logmel, waves)
  rows.append(("logmel (80 x 100 Hz)", cpu, wall, ""))

  whisper = features.WhisperEncoderExtractor(
      intra_threads=args.whisper_intra_threads)
  whisper(waves[0])
  whisper_feats, cpu, wall = _timed(whisper, waves)
  rows.append(("whisper tiny.en int8 (384 x 50 Hz)", cpu, wall, ""))

  for name, feats in (("whisper", whisper_feats), ("logmel", mel_feats)):
    frames = np.concatenate(feats)
    k = min(args.num_clusters, len(frames))
    codebook = kmeans.fit_kmeans(frames, k, batch_size=min(4096, len(frames)),
                                 num_steps=5, log_every=0)
    codebook.assign(feats[0])  # compile the common chunk shapes
    for f in feats:
      codebook.assign(f)
    _, cpu, wall = _timed(codebook.assign, feats)
    rows.append((f"kmeans assign K={k} on {name} frames", cpu, wall,
                 f"{len(frames)} frames x {frames.shape[1]}"))

  print(f"{len(waves)} espeak-ng utterances, {seconds:.1f} s of audio; "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
  print()
  print("| stage | audio s / CPU s | audio s / wall s | notes |")
  print("|---|---|---|---|")
  for name, cpu, wall, note in rows:
    print(f"| {name} | {seconds / cpu:,.0f} | {seconds / wall:,.0f} | {note} |")
  print()
  print("command: python " + " ".join(
      ["benchmarks/discretization_throughput.py"] + sys.argv[1:]))


if __name__ == "__main__":
  main()
