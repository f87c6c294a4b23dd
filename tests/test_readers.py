"""Tests for sld_jax.speech.readers on real speech (LibriVox via pocketsphinx)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from sld_jax.speech import readers
from sld_jax.speech.readers import CorpusError

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


def _librivox():
  """[(pocketsphinx name, transcript)] for the 5 LibriVox utterances."""
  out = []
  with open(os.path.join(LIBRIVOX, "transcription")) as f:
    for line in f:
      text, name = line.rsplit("(", 1)
      text = text.replace("<s>", "").replace("</s>", "").strip()
      out.append((name.strip().rstrip(")"), text))
  return out


# Speaker 1089, chapter 134686 gets the first three; 121/121726 the rest.
LAYOUT = [("1089", "134686"), ("1089", "134686"), ("1089", "134686"),
          ("121", "121726"), ("121", "121726")]


def _build_tree(root, subset="test-clean", layout=None):
  """Writes LibriSpeech/<subset>/<spk>/<chapter>/ with flac + trans.txt."""
  expected = {}
  transcripts = {}
  for i, ((name, text), (spk, chapter)) in enumerate(
      zip(_librivox(), layout or LAYOUT)):
    chapter_dir = os.path.join(root, "LibriSpeech", subset, spk, chapter)
    os.makedirs(chapter_dir, exist_ok=True)
    utt_id = f"{spk}-{chapter}-{i:04d}"
    wave, rate = sf.read(os.path.join(LIBRIVOX, name + ".wav"), dtype="int16")
    sf.write(os.path.join(chapter_dir, utt_id + ".flac"), wave, rate)
    transcripts.setdefault((spk, chapter, chapter_dir), []).append(
        f"{utt_id} {text.upper()}")
    expected[utt_id] = (text.upper(), spk, wave)
  for (spk, chapter, chapter_dir), lines in transcripts.items():
    with open(os.path.join(chapter_dir, f"{spk}-{chapter}.trans.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return expected


def _trans(root, spk="1089", chapter="134686", subset="test-clean"):
  return os.path.join(root, "LibriSpeech", subset, spk, chapter,
                      f"{spk}-{chapter}.trans.txt")


def test_read_librispeech_tree(tmp_path):
  expected = _build_tree(str(tmp_path))
  result = readers.read_librispeech(str(tmp_path), "test-clean")
  assert result.num_skipped == 0
  assert [u.id for u in result] == sorted(expected)
  for utt in result:
    text, spk, wave = expected[utt.id]
    assert utt.transcript == text and utt.speaker == spk
    assert utt.audio_path.endswith(utt.id + ".flac")
    loaded = utt.load_waveform()
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, wave / 32768.0, atol=1e-6)
  assert result[1].transcript == "HE WAS NOT AN ILL DISPOSED YOUNG MAN"
  # The LibriSpeech directory itself works as root too, and several subsets.
  dev = _build_tree(str(tmp_path), subset="dev-clean",
                    layout=[("2277", "149896")] * 5)
  both = readers.read_librispeech(os.path.join(str(tmp_path), "LibriSpeech"),
                                  ["test-clean", "dev-clean"], check_audio=False)
  assert [u.id for u in both] == sorted(expected) + sorted(dev)
  assert both[-1].speaker == "2277"


def test_librispeech_duplicate_ids_across_subsets(tmp_path):
  _build_tree(str(tmp_path))
  _build_tree(str(tmp_path), subset="dev-clean")
  with pytest.raises(CorpusError, match="duplicate utterance id '1089-134686-0000'"):
    readers.read_librispeech(str(tmp_path), ["test-clean", "dev-clean"])
  result = readers.read_librispeech(str(tmp_path), ["test-clean", "dev-clean"],
                                    on_error="skip")
  assert len(result) == 5 and result.num_skipped == 5


def test_librispeech_missing_subset(tmp_path):
  _build_tree(str(tmp_path))
  with pytest.raises(CorpusError, match="train-other-500.*not found.*"
                     "LibriSpeech/train-other-500 is a directory"):
    readers.read_librispeech(str(tmp_path), ["test-clean", "train-other-500"])
  with pytest.raises(CorpusError, match="not found"):
    readers.read_librispeech(str(tmp_path), "train-other-500", on_error="skip")


def test_librispeech_transcript_without_audio(tmp_path):
  _build_tree(str(tmp_path))
  trans = _trans(str(tmp_path))
  with open(trans, "a") as f:
    f.write("1089-134686-0099 A LINE WITHOUT AUDIO\n")
  with pytest.raises(CorpusError, match=f"{trans}:4: no audio file .*"
                     "1089-134686-0099.flac"):
    readers.read_librispeech(str(tmp_path), "test-clean")
  result = readers.read_librispeech(str(tmp_path), "test-clean", on_error="skip")
  assert len(result) == 5 and result.num_skipped == 1
  assert result.skipped[0].startswith(f"{trans}:4:")


def test_librispeech_audio_without_transcript(tmp_path):
  _build_tree(str(tmp_path))
  chapter_dir = os.path.dirname(_trans(str(tmp_path)))
  extra = os.path.join(chapter_dir, "1089-134686-0007.flac")
  shutil.copy(os.path.join(chapter_dir, "1089-134686-0000.flac"), extra)
  with pytest.raises(CorpusError, match=f"{extra}: no transcript line"):
    readers.read_librispeech(str(tmp_path), "test-clean")
  os.remove(_trans(str(tmp_path), "121", "121726"))
  result = readers.read_librispeech(str(tmp_path), "test-clean", on_error="skip")
  assert len(result) == 3 and result.num_skipped == 3
  assert any("missing" in m and "121-121726.trans.txt" in m for m in result.skipped)


def test_librispeech_empty_transcript_and_corrupt_audio(tmp_path):
  _build_tree(str(tmp_path))
  trans = _trans(str(tmp_path))
  lines = open(trans).read().splitlines()
  lines[1] = lines[1].split()[0]  # id only: empty transcript
  open(trans, "w").write("\n".join(lines) + "\n")
  with pytest.raises(CorpusError, match=f"{trans}:2: empty transcript for "
                     "1089-134686-0001"):
    readers.read_librispeech(str(tmp_path), "test-clean")
  corrupt = os.path.join(os.path.dirname(trans), "1089-134686-0002.flac")
  with open(corrupt, "wb") as f:
    f.write(b"fLaC" + bytes(64))
  result = readers.read_librispeech(str(tmp_path), "test-clean", on_error="skip")
  assert sorted(u.id for u in result) == [
      "1089-134686-0000", "121-121726-0003", "121-121726-0004"]
  assert result.num_skipped == 2
  assert any(m.startswith(f"{trans}:3:") and "1089-134686-0002.flac" in m
             for m in result.skipped)


def test_read_manifest_with_header_speakers_and_22k_audio(tmp_path):
  names = _librivox()
  os.makedirs(tmp_path / "audio" / "spk1")
  for name, _ in names[:2]:
    shutil.copy(os.path.join(LIBRIVOX, name + ".wav"),
                tmp_path / "audio" / "spk1" / (name + ".wav"))
  subprocess.run(["espeak-ng", "-w", str(tmp_path / "audio" / "tts.wav"),
                  "a synthetic sentence"], check=True)
  tsv = tmp_path / "train.tsv"
  tsv.write_text(
      "audio\ttranscript\tspeaker\n"
      f"audio/spk1/{names[0][0]}.wav\t{names[0][1]}\tspk1\n"
      "\n"
      f"{tmp_path}/audio/spk1/{names[1][0]}.wav\t{names[1][1]}\tspk1\n"
      "audio/tts.wav\ta synthetic sentence\n")
  result = readers.read_manifest(str(tsv))
  assert len(result) == 3 and result.num_skipped == 0
  assert result[0].id == f"audio/spk1/{names[0][0]}"
  assert result[0].speaker == "spk1" and result[2].speaker is None
  assert result[1].transcript == names[1][1]
  assert result[0].source == f"{tsv}:2"
  tts = result[2].load_waveform()  # 22.05 kHz on disk: resampled, not an error
  assert abs(len(tts) - sf.info(result[2].audio_path).frames * 16000 / 22050) <= 1


def test_read_manifest_errors(tmp_path):
  wav = os.path.join(LIBRIVOX, _librivox()[0][0] + ".wav")
  (tmp_path / "broken.wav").write_bytes(b"RIFF" + bytes(40))
  tsv = tmp_path / "m.tsv"
  tsv.write_text(f"{wav}\thello\n"                 # 1 ok
                 f"{wav}\n"                         # 2 one column
                 f"{wav}\t   \n"                    # 3 empty transcript
                 "missing.wav\thi\n"                # 4 no such file
                 "broken.wav\thi\n"                 # 5 corrupt
                 f"{wav}\ta\tb\tc\n")               # 6 four columns
  expected = [f"{tsv}:2: expected 2 or 3 tab-separated columns",
              f"{tsv}:3: empty transcript",
              f"{tsv}:4: audio file not found: .*missing.wav",
              f"{tsv}:5: cannot read audio file .*broken.wav",
              f"{tsv}:6: expected 2 or 3"]
  result = readers.read_manifest(str(tsv), on_error="skip")
  assert len(result) == 1 and result.num_skipped == 5
  for pattern, message in zip(expected, result.skipped):
    assert re.match(pattern, message), (pattern, message)
  with pytest.raises(CorpusError, match=expected[0]):
    readers.read_manifest(str(tsv))
  with pytest.raises(CorpusError, match="manifest not found"):
    readers.read_manifest(str(tmp_path / "none.tsv"))
  with pytest.raises(ValueError, match="on_error must be"):
    readers.read_manifest(str(tsv), on_error="ignore")


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def test_read_fairseq_units_plain_and_tab_forms(tmp_path):
  units = _write(tmp_path / "train.km", ["0 0 5 7", "9 1"])
  texts = _write(tmp_path / "train.txt", ["hello world", "bye"])
  result = readers.read_fairseq_units(units, texts, num_units=10)
  assert [u.id for u in result] == ["train-1", "train-2"]
  np.testing.assert_array_equal(result[0].units, [0, 0, 5, 7])
  assert result[0].units.dtype == np.int32 and result[1].transcript == "bye"

  units = _write(tmp_path / "ids.km", ["a\t3 3", "b\t4"])
  texts = _write(tmp_path / "ids.txt", ["a\tfirst", "second"])
  result = readers.read_fairseq_units(units, texts, num_units=10)
  assert [(u.id, u.transcript) for u in result] == [("a", "first"), ("b", "second")]


def test_read_fairseq_units_errors(tmp_path):
  units = _write(tmp_path / "u.km", ["1 2", "3 12", "4 x", "5", "6", "c\t7", ""])
  texts = _write(tmp_path / "t.txt", ["ok", "ok", "ok", "  ", "ok", "d\tok", "ok"])
  result = readers.read_fairseq_units(units, texts, 10, on_error="skip")
  assert [u.id for u in result] == ["u-1", "u-5"]
  assert result.skipped == (
      f"{units}:2: unit 12 is outside [0, 10) (num_units=10)",
      f"{units}:3: unit 'x' is not an integer",
      f"{texts}:4: empty transcript",
      f"{units}:6: utterance id 'c' != 'd' at {texts}:6",
      f"{units}:7: no units")
  with pytest.raises(CorpusError, match=f"{units}:2: unit 12 is outside"):
    readers.read_fairseq_units(units, texts, 10)
  short = _write(tmp_path / "short.txt", ["ok"] * 5)
  for on_error in ("raise", "skip"):
    with pytest.raises(CorpusError, match=f"{units} has 7 lines but {short} has 5"):
      readers.read_fairseq_units(units, short, 10, on_error=on_error)
  with pytest.raises(CorpusError, match="file not found: .*nope.km"):
    readers.read_fairseq_units(str(tmp_path / "nope.km"), texts, 10)


def test_read_npy_features_directory_and_manifest(tmp_path):
  feats = tmp_path / "feats"
  os.makedirs(feats / "spk1")
  rng = np.random.default_rng(0)
  np.save(feats / "spk1" / "a.npy", rng.normal(size=(20, 8)).astype(np.float32))
  np.save(feats / "b.npy", rng.normal(size=(7, 8)).astype(np.float32))
  _write(feats / "transcripts.tsv", ["spk1/a\tfirst one\tspk1", "b\tsecond"])
  result = readers.read_npy_features(str(feats))
  assert [(u.id, u.transcript, u.speaker) for u in result] == [
      ("spk1/a", "first one", "spk1"), ("b", "second", None)]
  assert np.load(result[0].features_path).shape == (20, 8)

  manifest = _write(tmp_path / "feats.tsv", ["features\ttext",
                                             "feats/b.npy\tsecond"])
  result = readers.read_npy_features(manifest, dim=8)
  assert [u.id for u in result] == ["feats/b"]


def test_read_npy_features_errors(tmp_path):
  feats = tmp_path / "feats"
  os.makedirs(feats)
  np.save(feats / "a.npy", np.zeros((5, 8), np.float32))
  np.save(feats / "wrong.npy", np.zeros((5, 4), np.float32))
  np.save(feats / "flat.npy", np.zeros((5,), np.float32))
  np.save(feats / "orphan.npy", np.zeros((5, 8), np.float32))
  (feats / "junk.npy").write_bytes(b"nope")
  trans = _write(feats / "transcripts.tsv", [
      "a\tok", "wrong\tok", "flat\tok", "junk\tok", "gone\tok", "a2\t"])
  result = readers.read_npy_features(str(feats), on_error="skip")
  assert [u.id for u in result] == ["a"]
  assert result.skipped == (
      f"{trans}:2: features {feats}/wrong.npy have dim 4 != 8",
      f"{trans}:3: features {feats}/flat.npy must be [frames > 0, dim], got "
      "shape (5,)",
      result.skipped[2],
      f"{trans}:5: no features file {feats}/gone.npy",
      f"{trans}:6: empty transcript for a2",
      f"{feats}/orphan.npy: no transcript line in {trans}")
  assert result.skipped[2].startswith(f"{trans}:4: cannot read features file")
  with pytest.raises(CorpusError, match=f"{trans}:2: features .*wrong.npy"):
    readers.read_npy_features(str(feats))
  os.remove(trans)
  with pytest.raises(CorpusError, match="no transcripts.tsv"):
    readers.read_npy_features(str(feats))
  with pytest.raises(CorpusError, match="not found"):
    readers.read_npy_features(str(tmp_path / "missing"))
