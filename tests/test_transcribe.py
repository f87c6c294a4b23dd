"""``python -m sld_jax.transcribe`` end to end on a 2-step smoke run: the run's
recorded assets reproduce the prepared units, files at other rates / stereo /
int and float samples, a manifest with references, bad and too-long files,
batching that changes no hypothesis, and assets of another discretisation
refused (training resume, eval, tampered files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jiwer
import numpy as np
import pytest
import soundfile as sf

import tiny_train

from sld_jax import input_pipeline
from sld_jax import run_assets
from sld_jax import scoring
from sld_jax import trained_run
from sld_jax import transcribe as transcribe_lib
from sld_jax.speech import audio as audio_lib
from sld_jax.speech import corpus_sources
from sld_jax.speech import front_end
from sld_jax.speech import prepare
from sld_jax.vocab import VocabLayout

# Its module fixtures are built once: all of it on one xdist worker (scripts/test.sh).
pytestmark = pytest.mark.xdist_group("transcribe")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_TASK = "sld_embedded_digits_whisper_smoke"
STEPS = 2
DECODING = scoring.DecodingConfig(max_decode_length=8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A 2-step run of the smoke experiment (Whisper units of the digits smoke corpus)."""
  model_dir = str(tmp_path_factory.mktemp("run"))
  tiny_train.run_smoke(
      "sld_jax.train", f'--gin.MODEL_DIR="{model_dir}"', f"--gin.TRAIN_STEPS={STEPS}",
      "--gin.WARMUP_STEPS=0", "--gin.EVAL_EVERY=0", "--gin.trainer.train.evaluators=[]",
      "--gin.trainer.train.tensorboard=False", "--gin.decoder_config.num_layers=1",
      "--gin.decoder_config.embed_dim=64", "--gin.decoder_config.mlp_dim=128")
  return model_dir


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
  """Test-split utterances written as files in several formats, and their prepared units."""
  directory = str(tmp_path_factory.mktemp("audio"))
  utterances = []
  for utterance in corpus_sources.EmbeddedSource("digits_smoke").utterances("test"):
    utterances.append(utterance)
    if len(utterances) == 3:
      break
  import tasks  # pylint: disable=g-import-not-at-top
  records = {r["id"]: r for r in prepare.read_records(
      prepare.split_files(tasks.prepared_dir(SMOKE_TASK), "test"))}
  first, second, third = (u.waveform for u in utterances)
  paths = {
      "mono16": os.path.join(directory, "mono16.wav"),
      "stereo16": os.path.join(directory, "stereo16.wav"),
      "int8k": os.path.join(directory, "int8k.wav"),
      "float44k_stereo": os.path.join(directory, "float44k_stereo.wav"),
      "flac22k": os.path.join(directory, "flac22k.flac"),
      "bad": os.path.join(directory, "bad.wav"),
      "long": os.path.join(directory, "long.wav"),
  }
  sf.write(paths["mono16"], first, 16000, subtype="PCM_16")
  sf.write(paths["stereo16"], np.stack([first, first], axis=1), 16000, subtype="PCM_16")
  sf.write(paths["int8k"], audio_lib.resample(second, 16000, 8000), 8000, subtype="PCM_16")
  wide = audio_lib.resample(third, 16000, 44100)
  sf.write(paths["float44k_stereo"], np.stack([wide, 0.5 * wide], axis=1), 44100,
           subtype="FLOAT")
  sf.write(paths["flac22k"], audio_lib.resample(first, 16000, 22050), 22050, subtype="PCM_24")
  with open(paths["bad"], "wb") as f:
    f.write(b"RIFF....not a wave file")
  sf.write(paths["long"], np.tile(np.concatenate([first, second, third]), 6), 16000)
  manifest = os.path.join(directory, "list.tsv")
  with open(manifest, "w") as f:
    f.write("audio\ttranscript\tspeaker\n"
            f"mono16.wav\t{utterances[0].transcript}\tspk-a\n"
            f"int8k.wav\t{utterances[1].transcript.upper()}\n"
            "float44k_stereo.wav\n")
  return {"paths": paths, "manifest": manifest, "utterances": utterances,
          "records": [records[u.id] for u in utterances]}


def test_run_directory_reproduces_the_prepared_units(run_dir, audio):
  assets = run_assets.load(run_dir)
  assert assets.layout == VocabLayout(text_size=14, speech_size=128)
  assert sorted(assets.manifest["sha256"]) == ["codebook.npz", "text.model"]
  assert assets.speech["extractor"] == "whisper" and assets.speech["merge_repeats"]
  assets.check_files()
  frontend = front_end.FrontEnd(assets)
  expected = assets.layout.units_to_ids(audio["records"][0]["units"])
  for name in ("mono16", "stereo16"):   # 16-bit samples as stored in the corpus
    ids = frontend.speech_ids(frontend.load(audio["paths"][name]))
    np.testing.assert_array_equal(ids, expected)
  text = front_end.TextDecoder(assets)
  words = audio["records"][0]["text"].split()
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  processor = spm.SentencePieceProcessor(model_file=assets.path("text.model"))
  assert text(processor.EncodeAsIds(" ".join(words)) + [1, 0]) == " ".join(words)


def test_cli_transcribes_a_manifest_and_files_with_references(run_dir, audio, tmp_path):
  out = str(tmp_path / "out")
  process = subprocess.run(
      [sys.executable, "-m", "sld_jax.transcribe", f"--model_dir={run_dir}",
       f"--manifest={audio['manifest']}", audio["paths"]["flac22k"], f"--output_dir={out}",
       "--max_decode_length=8", "--noprogress"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-4000:]
  with open(os.path.join(out, "predictions.jsonl")) as f:
    predictions = [json.loads(line) for line in f]
  with open(os.path.join(out, "metrics.json")) as f:
    metrics = json.load(f)
  ids = ["mono16.wav", "int8k.wav", "float44k_stereo.wav", audio["paths"]["flac22k"]]
  assert [p["id"] for p in predictions] == ids
  lines = process.stdout.strip().splitlines()
  assert [line.split("\t")[0] for line in lines[:4]] == ids
  assert lines[4].startswith("WER ")
  # References: normalised and lower-cased as sld_jax.eval scores them.
  scored = [p for p in predictions if "reference" in p]
  assert [p["reference"] for p in scored] == [audio["records"][0]["text"],
                                              audio["records"][1]["text"]]
  refs, hyps = [p["reference"] for p in scored], [p["hypothesis"] for p in scored]
  assert metrics["num_with_reference"] == 2 and metrics["num_utterances"] == 4
  assert metrics["wer"] == pytest.approx(100 * jiwer.wer(refs, hyps))
  assert metrics["cer"] == pytest.approx(100 * jiwer.cer(refs, hyps))
  assert (metrics["substitutions"] + metrics["deletions"] + metrics["insertions"]
          == metrics["word_errors"])
  assert predictions[0]["speaker"] == "spk-a"
  assert metrics["step"] == STEPS and metrics["method"] == "greedy"
  # Resampled and downmixed audio gives about as many speech tokens as the original.
  for prediction, record in zip(predictions[:3], audio["records"]):
    assert 0.7 < prediction["speech_tokens"] / len(record["units"]) < 1.3, prediction
  assert 0.7 < predictions[3]["speech_tokens"] / len(audio["records"][0]["units"]) < 1.3


def test_unreadable_and_too_long_files_are_named(run_dir, audio):
  paths = audio["paths"]
  items = transcribe_lib.collect_inputs([paths["mono16"], paths["bad"], "/nope/missing.wav"])
  with pytest.raises(transcribe_lib.TranscribeError,
                     match=r"2 of 3 audio file\(s\) cannot be read[\s\S]*bad.wav[\s\S]*"
                           r"/nope/missing.wav"):
    transcribe_lib.check_readable(items)
  assert [i.audio for i in transcribe_lib.check_readable(items, skip=True)] == [paths["mono16"]]
  process = subprocess.run(
      [sys.executable, "-m", "sld_jax.transcribe", f"--model_dir={run_dir}", paths["mono16"],
       paths["bad"]], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert process.returncode == 1 and not process.stdout
  assert f"error: 1 of 2 audio file(s) cannot be read (--skip_unreadable skips them):\n  " \
         f"cannot read audio file {paths['bad']}" in process.stderr, process.stderr[-2000:]
  with pytest.raises(transcribe_lib.TranscribeError, match="holds no audio files"):
    transcribe_lib.collect_inputs([os.path.join(run_dir, "assets")])

  long_items = transcribe_lib.collect_inputs([paths["long"], paths["mono16"]])
  with pytest.raises(transcribe_lib.TranscribeError,
                     match=r"1 file\(s\) too long for this model[\s\S]*long.wav: \d+\.\d s -> "
                           r"\d+ speech tokens; the model holds 256 positions"):
    transcribe_lib.transcribe(run_dir, long_items, decoding_config=DECODING, progress=False)
  score = transcribe_lib.transcribe(run_dir, long_items, decoding_config=DECODING,
                                    long_audio="skip", progress=False)
  assert [p["audio"] for p in score.predictions] == [paths["mono16"]]
  assert score.metrics["num_skipped_too_long"] == 1


def test_batches_and_buckets_change_no_hypothesis(run_dir, audio):
  """Each file decoded alone (predict_batch on its own prompt) = decoded in length buckets."""
  paths = audio["paths"]
  items = transcribe_lib.collect_inputs([paths["mono16"], paths["int8k"],
                                         paths["float44k_stereo"]])
  assets = run_assets.load(run_dir)
  lm, _, _, _, params, _ = transcribe_lib.load_model(run_dir, assets)
  params = jax.device_put(params, jax.devices()[0])
  frontend = front_end.FrontEnd(assets)
  prompts = [transcribe_lib._prompt(frontend.speech_ids(frontend.load(item.audio)), lm.layout)
             for item in items]
  for prompt in prompts:
    assert prompt[0] == 0 and prompt[-1] == lm.layout.speech_end_id
  width = max(len(p) for p in prompts)
  buckets = {int(2 ** np.ceil(np.log2(max(len(p), 16)))) for p in prompts}
  for method in ("greedy", "beam"):
    config = scoring.DecodingConfig(method=method, beam_size=3, max_decode_length=8)
    score = transcribe_lib.transcribe(run_dir, items, decoding_config=config, batch_size=2,
                                      progress=False)
    assert [p["audio"] for p in score.predictions] == [i.audio for i in items]
    assert score.metrics["method"] == method and "wer" not in score.metrics
    assert score.metrics["compiled_buckets"] == len(buckets)
    alone = jax.jit(lambda p, t, n, method=method: lm.predict_batch(
        p, t, n, max_decode_length=8, method=method, beam_size=3))
    for prediction, prompt in zip(score.predictions, prompts):
      assert prediction["speech_tokens"] == len(prompt) - 2
      result = alone(params, np.pad(prompt, (0, width - len(prompt)))[None],
                     np.array([len(prompt)], np.int32))
      tokens = scoring.decoding_text_ids(np.asarray(result.tokens[0]),
                                            int(result.lengths[0]), lm.layout)
      assert prediction["hypothesis_tokens"] == len(tokens)
      assert prediction["decode_score"] == pytest.approx(float(result.scores[0]), abs=1e-4)


def test_other_discretisation_assets_are_refused(run_dir, tmp_path):
  """A run whose recorded codebook differs from the data's: resume, eval, transcribe refuse."""
  other = str(tmp_path / "other_run")
  shutil.copytree(os.path.join(run_dir, "assets"), os.path.join(other, "assets"))
  manifest_path = os.path.join(other, "assets", run_assets.MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest["sha256"]["codebook.npz"] = "0" * 64   # as if trained on another k-means fit
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  source = input_pipeline.SeqioSource(SMOKE_TASK)
  with pytest.raises(run_assets.AssetsMismatchError,
                     match=r"the training data .*differ from those recorded[\s\S]*"
                           r"sha256.codebook.npz: 000000000000... \(recorded\) != "):
    run_assets.record(other, source)
  location = trained_run.CheckpointLocation(os.path.join(other, "checkpoints"))
  with pytest.raises(run_assets.AssetsMismatchError,
                     match=f"task '{SMOKE_TASK}' uses discretisation assets that differ"):
    trained_run.run_layout(location, [SMOKE_TASK])
  with pytest.raises(run_assets.AssetsMismatchError,
                     match="codebook.npz has changed since it was recorded"):
    front_end.FrontEnd(run_assets.load(other))
  # The run's own assets agree with its task.
  assert trained_run.run_layout(trained_run.CheckpointLocation(
      os.path.join(run_dir, "checkpoints")), [SMOKE_TASK]) == VocabLayout(14, 128)
