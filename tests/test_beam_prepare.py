"""The Beam preparation pipeline gives the single-process ``prepare``'s units.

The smoke corpus is prepared with ``scripts/prepare_data.py --beam``
(DirectRunner, one worker process; the imported-units test below runs two)
in the Beam virtualenv, ``.venv-beam``, created here by
scripts/install_beam.sh when missing (pip reaches PyPI). A venv that cannot
be made fails the tests, never skips them. The single-process side is the
smoke task's own prepared dir (``tasks.ensure_prepared``), shared with the
other tests; its text model and codebook seed the Beam run, whose launcher
then skips those stages, so the units of every utterance must match exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tasks
from sld_jax import input_pipeline
from sld_jax.speech import kmeans
from sld_jax.speech import prepare

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM_PYTHON = os.path.join(REPO_ROOT, ".venv-beam", "bin", "python")
SMOKE_TASK = "sld_embedded_digits_whisper_smoke"
FIT_STAGES = ("options.json", "text.model", "text.vocab", "text.done", "codebook.npz",
              "codebook.done")


@pytest.fixture(scope="module")
def beam_python() -> str:
  # Idempotent and locked: a few seconds when the venv is there, and parallel
  # workers wait for one another instead of building it twice.
  result = subprocess.run(["bash", "scripts/install_beam.sh"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
  if result.returncode != 0:
    message = (f"scripts/install_beam.sh failed ({result.returncode}):\n"
               f"{result.stderr[-3000:]}")
    pytest.fail(message)
  return BEAM_PYTHON


def _records(out_dir: str, split: str) -> dict[str, dict]:
  return {r["id"]: r for r in prepare.read_records(prepare.split_files(out_dir, split))}


def test_beam_prepares_the_smoke_corpus_with_the_units_of_prepare(
    beam_python, tmp_path, monkeypatch):
  single = tasks.ensure_prepared(SMOKE_TASK)
  options = tasks.EMBEDDED_TASKS[SMOKE_TASK].options
  # The Beam output goes where the smoke task of another data dir looks, so
  # that the task (training and eval batches) reads it below.
  data_dir = tmp_path / "data"
  beam_dir = data_dir / "prepared" / SMOKE_TASK
  beam_dir.mkdir(parents=True)
  # The launcher-side fit stages (text model, k-means) are prepare's own code;
  # they are taken from the single-process dir, so that the units compared
  # below depend on the Beam stage alone (a k-means refit under other XLA
  # flags moves the centres by ~1e-6, which could flip a near tie).
  for name in FIT_STAGES:
    shutil.copy(os.path.join(single, name), beam_dir / name)
  os.symlink(os.path.join(os.environ["SLD_DATA_DIR"], "tfds"), data_dir / "tfds")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, SLD_DATA_DIR=str(data_dir),
             TF_CPP_MIN_LOG_LEVEL="2")
  command = [
      beam_python, "scripts/prepare_data.py", "embedded", "--config", "digits_smoke",
      "--beam", "--runner=DirectRunner", "--direct_num_workers=1",
      "--extractor", options.extractor, "--num_clusters", str(options.num_clusters),
      "--text_model_type", options.text_model_type,
      "--text_vocab_size", str(options.text_vocab_size), "--out_dir", str(beam_dir)]
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-6000:]
  log = result.stdout + result.stderr
  assert "beam metric sld_prepare/train/records = 150" in log, log[-3000:]
  assert "beam metric sld_prepare/dev/utterances = 30" in log

  ours, theirs = prepare.load_metadata(str(beam_dir)), prepare.load_metadata(single)
  for key in ("num_clusters", "speech_size", "text_size", "extractor", "options"):
    assert ours[key] == theirs[key], key
  np.testing.assert_array_equal(
      kmeans.Codebook.load(str(beam_dir / "codebook.npz")).centers,
      kmeans.Codebook.load(os.path.join(single, "codebook.npz")).centers)
  for split in ("train", "dev", "test"):
    assert ours["files"]["splits"][split] == f"{split}.tfrecord-?????-of-00008"
    assert len(prepare.split_files(str(beam_dir), split)) == 8
    for key in ("num_examples", "num_units", "num_shards"):
      assert ours["splits"][split][key] == theirs["splits"][split][key], (split, key)
    assert ours["splits"][split]["hours"] == pytest.approx(  # summed in another order
        theirs["splits"][split]["hours"], abs=1e-4)
    beam_records, single_records = _records(str(beam_dir), split), _records(single, split)
    assert sorted(beam_records) == sorted(single_records)
    for utt_id, record in single_records.items():
      other = beam_records[utt_id]
      np.testing.assert_array_equal(other["units"], record["units"], err_msg=utt_id)
      assert (other["text"], other["speaker"]) == (record["text"], record["speaker"])
      assert other["duration"] == pytest.approx(record["duration"])

  # Training and evaluation batches of the smoke task read the Beam output.
  monkeypatch.setenv("SLD_DATA_DIR", str(data_dir))
  assert tasks.prepared_dir(SMOKE_TASK) == str(beam_dir)
  train = input_pipeline.SeqioSource(SMOKE_TASK, "train", global_batch_size=4,
                                     sequence_length=128, seed=0)
  batch = next(train.batches(0, 1, 2))
  assert batch["decoder_target_tokens"].shape == (2, 128)
  assert batch["decoder_loss_weights"].sum() > 0
  dev = input_pipeline.SeqioSource(SMOKE_TASK, "dev", global_batch_size=8,
                                   sequence_length=256, pack=False, shuffle=False)
  rows = sum(int(np.any(b["decoder_loss_weights"], axis=1).sum())
             for b in dev.eval_batches())
  assert rows == 30
  assert json.loads((beam_dir / "train.done").read_text())["num_examples"] == 150


WORKER_PROBE = r"""
import sys
import apache_beam, google.protobuf
import numpy as np
from sld_jax.speech import beam_prepare, prepare, readers
options = prepare.PrepareOptions(extractor="logmel", num_clusters=4, merge_repeats=False)
rng = np.random.default_rng(0)
good = readers.Utterance(id="good", transcript="One two", sample_rate=16000,
                         waveform=rng.normal(size=8000).astype(np.float32) * 0.1)
bad = readers.Utterance(id="bad", transcript="three", audio_path="/nonexistent/bad.wav",
                        source="manifest.tsv:7")
for on_error in ("skip", "raise"):
  fn = beam_prepare.UtteranceUnits(options, "audio", None, on_error)
  fn.setup()
  feats = fn._extractor(good.load_waveform())
  from sld_jax.speech import kmeans
  fn._codebook = kmeans.Codebook(feats[:4].copy(), extractor_name="logmel")
  [record] = list(fn.process(("dev", good)))
  assert record["id"] == "good" and record["text"] == "one two", record
  assert len(record["units"]) == feats.shape[0]
  try:
    out = list(fn.process(("dev", bad)))
    print(on_error, "skipped", len(out))
  except prepare.PrepareError as e:
    print(on_error, "raised", e)
print("versions", apache_beam.__version__, google.protobuf.__version__,
      "seqio" in sys.modules, "tasks" in sys.modules)
"""


def test_the_beam_worker_has_its_venvs_protobuf_and_raises_or_skips_bad_utterances(
    beam_python):
  result = subprocess.run([beam_python, "-c", WORKER_PROBE], cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2"),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.splitlines()
  assert "skip skipped 0" in lines, lines
  assert any(line.startswith("raise raised manifest.tsv:7: utterance bad:") for line in lines), (
      lines)
  versions = next(line for line in lines if line.startswith("versions ")).split()[1:]
  assert versions[0] == "2.77.0" and int(versions[1].split(".")[0]) < 7, versions
  assert versions[2:] == ["False", "False"], "the pipeline must not import seqio or tasks"
  # The main environment (this one) keeps its own protobuf, and seqio.
  import google.protobuf  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  assert int(google.protobuf.__version__.split(".")[0]) >= 7


def test_beam_imported_units_and_unit_pieces_match_prepare(beam_python, tmp_path):
  """fairseq-style units (no extractor) with 40 unit pieces: the raw units go
  through Beam, the piece model and the encoded splits through prepare's
  launcher stages; every utterance gets the single-process pieces."""
  rng = np.random.default_rng(0)
  words = "one two three four five six seven eight nine zero".split()
  splits = []
  for split, count in (("train", 60), ("dev", 12)):
    with open(tmp_path / f"{split}.km", "w") as km, open(tmp_path / f"{split}.wrd", "w") as wrd:
      for _ in range(count):
        km.write(" ".join(map(str, rng.integers(0, 20, rng.integers(10, 40)))) + "\n")
        wrd.write(" ".join(rng.choice(words, 3)) + "\n")
    splits += ["--split", f"{split}={tmp_path / split}.km:{tmp_path / split}.wrd"]
  flags = ["units", "--num_clusters", "20", "--unit_pieces", "40", "--text_model_type", "word",
           "--text_vocab_size", "30", *splits]
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  for python, name, extra in ((sys.executable, "single", []),
                              (beam_python, "beam", ["--beam", "--direct_num_workers=2"])):
    result = subprocess.run([python, "scripts/prepare_data.py", *flags, *extra, "--out_dir",
                             str(tmp_path / name)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
  assert "beam metric sld_prepare/train/records = 60" in result.stdout
  beam_dir, single_dir = str(tmp_path / "beam"), str(tmp_path / "single")
  assert prepare.load_metadata(beam_dir)["speech_size"] == prepare.load_metadata(
      single_dir)["speech_size"] == 40
  for split in ("train", "dev"):
    ours, theirs = _records(beam_dir, split), _records(single_dir, split)
    assert sorted(ours) == sorted(theirs)
    for utt_id, record in theirs.items():
      np.testing.assert_array_equal(ours[utt_id]["units"], record["units"], err_msg=utt_id)
