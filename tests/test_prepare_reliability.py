"""``prepare`` notices what changed, skips what it is told to, and recovers.

Rows of docs/reliability.md: a truncated wav is bad audio; a manifest whose
transcripts changed is refused; a failed run leaves nothing that blocks the
rerun after a fix; ``on_error="skip"`` skips with counts per reason and says
so in one message when nothing is left. A tiny manifest corpus of tones
(log-mel, K=4) keeps each prepare to a second or two.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from sld_jax.speech import audio
from sld_jax.speech import prepare
from sld_jax.speech import readers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = prepare.PrepareOptions(extractor="logmel", num_clusters=4, kmeans_steps=5,
                                 kmeans_batch_size=500, text_model_type="word",
                                 text_vocab_size=20)
WORDS = ("one", "two", "three", "four", "five")


def _wave(seed: int, seconds: float = 0.4) -> np.ndarray:
  rng = np.random.default_rng(seed)
  t = np.arange(int(16000 * seconds)) / 16000
  return (0.3 * np.sin(2 * np.pi * (200 + 40 * seed) * t)
          + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def _manifest(directory, rows, name="train.tsv") -> str:
  """rows: (file name, transcript, wave or None to keep an existing file)."""
  os.makedirs(directory, exist_ok=True)
  lines = []
  for file_name, transcript, wave in rows:
    if wave is not None:
      sf.write(os.path.join(directory, file_name), wave, 16000)
    lines.append(f"{file_name}\t{transcript}")
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def _corpus(directory, count=8):
  return [(f"u{i}.wav", f"{WORDS[i % 5]} {WORDS[(i + 1) % 5]}", _wave(i)) for i in range(count)]


def _source(path, on_error="raise"):
  return prepare.UtteranceSource({"train": readers.read_manifest(path, on_error=on_error)
                                  .utterances}, name="manifest")


def test_a_truncated_wav_is_reported_like_other_bad_audio(tmp_path):
  path = str(tmp_path / "a.wav")
  sf.write(path, _wave(0, seconds=3.0), 16000)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 3])
  with pytest.raises(audio.AudioError, match=r"a\.wav is truncated: its WAV header promises "
                     r"96000 bytes.*holds 3\d{4}"):
    audio.audio_info(path)
  with pytest.raises(audio.AudioError, match="truncated"):
    audio.read_audio(path)
  manifest = _manifest(tmp_path, [("a.wav", "one two", None), ("b.wav", "two", _wave(1))])
  with pytest.raises(readers.CorpusError, match=r"train\.tsv:1: audio file .*a\.wav is truncated"):
    readers.read_manifest(manifest)
  result = readers.read_manifest(manifest, on_error="skip")
  assert [u.id for u in result] == ["b"] and result.skipped_by_reason() == {"truncated audio": 1}


def test_a_changed_manifest_is_refused_naming_the_change(tmp_path):
  rows = _corpus(tmp_path / "audio")
  manifest = _manifest(tmp_path / "audio", rows)
  out = str(tmp_path / "prepared")
  first = prepare.prepare(_source(manifest), out, OPTIONS)
  assert first["splits"]["train"]["num_examples"] == 8
  assert prepare.prepare(_source(manifest), out, OPTIONS) == first   # unchanged: reused

  changed = [(name, "five five" if i == 0 else text, None) for i, (name, text, _) in
             enumerate(rows)]
  _manifest(tmp_path / "audio", changed)   # same line count, one transcript changed
  with pytest.raises(prepare.PrepareError, match=r"input utterances changed \(input_sha256"):
    prepare.prepare(_source(manifest), out, OPTIONS)


def test_a_failed_run_leaves_nothing_that_blocks_or_poisons_the_rerun(tmp_path):
  rows = _corpus(tmp_path / "audio")
  rows[5] = ("u5.wav", rows[5][1], np.full(6400, np.nan, np.float32))
  manifest = _manifest(tmp_path / "audio", rows)
  out = tmp_path / "prepared"
  source = prepare.UtteranceSource({"train": [
      dataclasses.replace(u, audio_path=None, waveform=audio.load_audio(u.audio_path)
                          if "u5" not in u.audio_path else rows[5][2], sample_rate=16000)
      for u in readers.read_manifest(manifest, check_audio=False)]})
  with pytest.raises(prepare.PrepareError, match=r"u5.*NaN or Inf"):
    prepare.prepare(source, str(out), OPTIONS)
  assert (out / "options.json").exists() and not (out / "metadata.json").exists()

  # The fixed input (u5 re-recorded, u2's transcript corrected) is prepared
  # from scratch, not refused and not mixed with the failed run's text model.
  rows[5] = ("u5.wav", rows[5][1], _wave(5))
  rows[2] = ("u2.wav", "five four three", rows[2][2])
  _manifest(tmp_path / "audio", rows)
  metadata = prepare.prepare(_source(manifest), str(out), OPTIONS)
  assert metadata["splits"]["train"]["num_examples"] == 8
  texts = [r["text"] for r in prepare.read_records(prepare.split_files(str(out), "train"))]
  assert "five four three" in texts
  stored = json.loads((out / "options.json").read_text())
  assert stored["input_sha256"] == prepare.input_digest(_source(manifest))


def test_on_error_skip_skips_with_counts_per_reason(tmp_path):
  rows = _corpus(tmp_path / "audio")
  utterances = list(_source(_manifest(tmp_path / "audio", rows)).utterances("train"))
  as_memory = lambda u, wave: dataclasses.replace(u, audio_path=None, waveform=wave,
                                                  sample_rate=16000)
  utterances[1] = dataclasses.replace(utterances[1], transcript="?! ...")   # punctuation only
  utterances[2] = as_memory(utterances[2], np.zeros(10, np.float32))        # < one frame
  utterances[3] = as_memory(utterances[3], np.full(6400, np.nan, np.float32))
  source = prepare.UtteranceSource({"train": utterances}, name="mixed")

  with pytest.raises(prepare.PrepareError, match="empty after normalisation"):
    prepare.prepare(source, str(tmp_path / "strict"), OPTIONS)
  metadata = prepare.prepare(source, str(tmp_path / "skip"), OPTIONS, on_error="skip")
  assert metadata["splits"]["train"]["num_examples"] == 5
  assert metadata["skipped"] == {"train": {
      "empty transcript after normalisation": 1, "audio shorter than one feature frame": 1,
      "non-finite audio samples": 1}}
  ids = {r["id"] for r in prepare.read_records(prepare.split_files(str(tmp_path / "skip"),
                                                                    "train"))}
  assert ids == {u.id for i, u in enumerate(utterances) if i not in (1, 2, 3)}


def test_nothing_left_after_skipping_is_one_clear_message(tmp_path):
  rows = [(f"u{i}.wav", "?!", _wave(i)) for i in range(3)]
  source = _source(_manifest(tmp_path / "audio", rows))
  with pytest.raises(prepare.PrepareError, match=r"nothing left of split 'train'.* after "
                     r"skipping 3 bad utterances \(3 empty transcript after normalisation\)"):
    prepare.prepare(source, str(tmp_path / "out"), OPTIONS, on_error="skip")

  # The script: every manifest line bad (missing audio) is one error line.
  manifest = _manifest(tmp_path / "missing", [("gone.wav", "one", None), ("x.wav", "two", None)])
  result = subprocess.run(
      [sys.executable, "scripts/prepare_data.py", "manifest", "--on_error", "skip",
       "--extractor", "logmel", "--num_clusters", "4", "--out_dir", str(tmp_path / "o"),
       "--split", f"train={manifest}"], cwd=REPO_ROOT, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "nothing left of split train" in errors[0], result.stderr[-3000:]
  assert "2 missing file" in errors[0] and "Traceback" not in result.stderr
