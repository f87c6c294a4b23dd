"""The embedded corpus, its preparation into units, and the registered tasks."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from sld_jax.speech import embedded_corpus as ec
from sld_jax.speech import prepare
from sld_jax.speech import readers
from sld_jax.speech import tts
import tasks

TINY = ec.EmbeddedCorpusConfig(name="digits_tiny", domain="digits",
                               num_train=24, num_dev=6, num_test=6)
LOGMEL = prepare.PrepareOptions(
    extractor="logmel", extractor_kwargs={"stack_frames": 2},
    num_clusters=16, kmeans_steps=20, kmeans_batch_size=2000)


def _digit_key(text: str) -> str:
  return "".join(str(ec.DIGIT_WORDS.index(w)) if w in ec.DIGIT_WORDS else "0"
                 for w in text.split())


@pytest.mark.parametrize("name", ["digits_smoke", "sentences_smoke",
                                  "digits_default"])
def test_splits_are_voice_and_text_disjoint(name):
  plan = ec.corpus_plan(ec.CONFIGS[name])
  config = ec.CONFIGS[name]
  assert {s: len(u) for s, u in plan.items()} == {
      s: config.split_size(s) for s in ec.SPLITS}
  voices = {s: {u.voice.base_id for u in utts} for s, utts in plan.items()}
  key = _digit_key if config.domain == "digits" else (lambda t: t)
  texts = {s: {key(u.text) for u in utts} for s, utts in plan.items()}
  for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
    assert not voices[a] & voices[b], (a, b)
    assert not texts[a] & texts[b], (a, b)
  assert {v.split("+")[0] for v in voices["dev"]} == {"espeak:en-029",
                                                      "flite:slt"}
  assert {v.split("+")[0] for v in voices["test"]} == {
      "espeak:en-gb-scotland", "flite:kal16"}
  all_voices = set().union(*voices.values())
  assert "flite:kal" not in all_voices  # kal16's speaker: never in train
  for utts in plan.values():
    for u in utts:
      assert u.text == u.text.lower()
      lo, hi = config.min_words, config.max_words
      assert lo <= len(u.text.split()) <= hi, u


def test_digit_words_and_sentence_pool():
  plan = ec.corpus_plan(ec.CONFIGS["digits_smoke"])
  words = {w for utts in plan.values() for u in utts for w in u.text.split()}
  assert words <= set(ec.DIGIT_WORDS) | {"oh"}
  assert {"oh", "zero"} <= words
  pool = ec.wordnet_sentences(5000, 4, 20)
  assert len(pool) > 8000
  assert all(text == text.lower() and not any(c.isdigit() for c in text)
             for _, text in pool)


def test_plan_is_deterministic_for_a_seed():
  plan_a = ec.corpus_plan(TINY)
  assert plan_a == ec.corpus_plan(TINY)
  other = ec.corpus_plan(dataclasses.replace(TINY, seed=7))
  assert [u.text for u in other["train"]] != [u.text for u in plan_a["train"]]
  utt = plan_a["dev"][0]
  np.testing.assert_array_equal(ec.synthesize_utterance(utt),
                                ec.synthesize_utterance(utt))


def test_voice_ids_round_trip_and_engines_speak():
  for voice in (tts.Voice("espeak", "en-gb-scotland", "f2", 1.1, 0.9),
                tts.Voice("flite", "kal"), tts.Voice("flite", "slt", "", 0.9)):
    assert tts.Voice.from_id(voice.id) == voice
    wave = tts.synthesize("four oh two", voice)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.3 < wave.shape[0] / tts.SAMPLE_RATE < 3.0
    assert 0.05 < np.abs(wave).max() <= 1.0
  with pytest.raises(ValueError, match="unknown flite voice"):
    tts.Voice("flite", "nobody")


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def tiny_source(tiny_tfds):
  source = prepare.EmbeddedSource(TINY, tfds_data_dir=tiny_tfds)
  _ = source.builder  # synthesise once for the module
  return source


def _records(out_dir, split):
  return list(prepare.read_records(prepare.split_files(out_dir, split)))


def test_tiny_corpus_features(tiny_source):
  utts = list(tiny_source.utterances("dev"))
  plan = {u.id: u for u in ec.corpus_plan(TINY)["dev"]}
  assert sorted(u.id for u in utts) == sorted(plan)
  for utt in utts:
    assert utt.speaker == plan[utt.id].voice.id
    assert utt.transcript == plan[utt.id].text
    assert utt.sample_rate == 16000 and utt.waveform.dtype == np.float32


def test_prepare_is_deterministic_and_idempotent(tiny_source, tmp_path):
  first = prepare.prepare(tiny_source, str(tmp_path / "a"), LOGMEL)
  prepare.prepare(tiny_source, str(tmp_path / "b"), LOGMEL)
  for split in ec.SPLITS:
    a, b = _records(tmp_path / "a", split), _records(tmp_path / "b", split)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for ra, rb in zip(a, b):
      np.testing.assert_array_equal(ra["units"], rb["units"])
      assert ra["text"] == rb["text"]
  assert first["splits"]["train"]["num_examples"] == 24
  assert first["speech_size"] == 16 and first["text_size"] >= 13
  assert first["extractor"]["name"] == "logmel"
  records = _records(tmp_path / "a", "train")
  assert all(r["units"].max() < 16 for r in records)
  assert all(np.all(r["units"][1:] != r["units"][:-1]) for r in records)

  out = tmp_path / "a"
  stamps = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
  again = prepare.prepare(tiny_source, str(out), LOGMEL)
  assert again == first
  assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == stamps

  with pytest.raises(prepare.PrepareError, match="other options"):
    prepare.prepare(tiny_source, str(out),
                    dataclasses.replace(LOGMEL, num_clusters=8))


class _FailingSource(prepare.Source):
  """Wraps a source; its test split fails after two utterances once."""

  def __init__(self, inner):
    self.inner = inner
    self.kind = inner.kind
    self.fail = True

  def splits(self):
    return self.inner.splits()

  def num_utterances(self, split):
    return self.inner.num_utterances(split)

  def description(self):
    return self.inner.description()

  def utterances(self, split):
    for i, utt in enumerate(self.inner.utterances(split)):
      if split == "test" and self.fail and i == 2:
        raise KeyboardInterrupt("simulated interruption")
      yield utt


def test_interrupted_split_is_redone_and_finished_ones_kept(tiny_source,
                                                           tmp_path):
  out = tmp_path / "p"
  source = _FailingSource(tiny_source)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(source, str(out), LOGMEL)
  assert (out / "train.done").exists() and (out / "dev.done").exists()
  assert not (out / "test.done").exists()
  assert not list(out.glob("test.tfrecord-?????-of-?????"))
  assert not (out / "metadata.json").exists()
  kept = {f: os.path.getmtime(out / f) for f in
          [p.name for p in out.glob("*.tfrecord-?????-of-?????")]
          + ["codebook.npz", "text.model"]}
  source.fail = False
  metadata = prepare.prepare(source, str(out), LOGMEL)
  assert metadata["splits"]["test"]["num_examples"] == 6
  assert {f: os.path.getmtime(out / f) for f in kept} == kept
  assert len(_records(out, "test")) == 6


def test_speed_perturbation_adds_train_copies(tiny_source, tmp_path):
  options = dataclasses.replace(LOGMEL, speed_perturb=(0.9, 1.1))
  metadata = prepare.prepare(tiny_source, str(tmp_path / "sp"), options)
  assert metadata["splits"]["train"]["num_examples"] == 3 * 24
  assert metadata["splits"]["dev"]["num_examples"] == 6
  records = {r["id"]: r for r in _records(tmp_path / "sp", "train")}
  base = next(i for i in records if not i.startswith("sp"))
  slow, fast = records["sp0.9-" + base], records["sp1.1-" + base]
  assert slow["duration"] > records[base]["duration"] > fast["duration"]
  assert slow["speaker"] == "sp0.9-" + records[base]["speaker"]


def test_whisper_units_on_the_tiny_corpus(tiny_source, tmp_path):
  options = prepare.PrepareOptions(extractor="whisper", num_clusters=16,
                                   kmeans_steps=20, kmeans_batch_size=2000)
  metadata = prepare.prepare(tiny_source, str(tmp_path / "w"), options)
  assert metadata["extractor"] == {"name": "whisper", "dim": 384,
                                   "frame_rate_hz": 50.0}
  again = prepare.prepare(tiny_source, str(tmp_path / "w2"), options)
  assert ({s: again["splits"][s]["num_units"] for s in ec.SPLITS}
          == {s: metadata["splits"][s]["num_units"] for s in ec.SPLITS})
  for split in ec.SPLITS:
    records = _records(tmp_path / "w", split)
    assert [r["id"] for r in records] == [
        r["id"] for r in _records(tmp_path / "w2", split)]
    for r, r2 in zip(records, _records(tmp_path / "w2", split)):
      np.testing.assert_array_equal(r["units"], r2["units"])  # deterministic
  records = _records(tmp_path / "w", "dev")
  for r in records:
    units = r["units"]
    assert units.min() >= 0 and units.max() < 16, r["id"]
    assert np.all(units[1:] != units[:-1]), r["id"]  # repeats merged
    # 50 Hz states with repeats merged: 5-18 units per second on this corpus
    # (16 clusters); unmerged states would give 50, no speech a handful.
    assert 3 * r["duration"] < len(units) < 30 * r["duration"], (
        r["id"], len(units), r["duration"])
  used = np.unique(np.concatenate([r["units"] for r in records]))
  assert len(used) >= 12, used  # the dev split uses most of the 16 clusters


def _write_units(tmp_path, rows):
  units = tmp_path / "train.km"
  text = tmp_path / "train.txt"
  units.write_text("".join(f"u{i}\t{' '.join(map(str, r))}\n"
                           for i, r in enumerate(rows)))
  last_word = ["zero", "one", "two"]
  text.write_text("".join(f"u{i}\tONE TWO {last_word[i % 3].upper()}\n"
                          for i in range(len(rows))))
  return str(units), str(text)


def test_imported_units_with_unit_pieces(tmp_path):
  rng = np.random.default_rng(0)
  rows = [rng.integers(0, 8, size=int(rng.integers(5, 30))).tolist()
          for _ in range(40)]
  units_file, text_file = _write_units(tmp_path, rows)
  utts = readers.read_fairseq_units(units_file, text_file, num_units=8)
  source = prepare.UtteranceSource({"train": utts[:30], "dev": utts[30:]},
                                   name="fairseq")
  options = prepare.PrepareOptions(extractor="units", num_clusters=8,
                                   merge_repeats=False, unit_pieces=20)
  metadata = prepare.prepare(source, str(tmp_path / "out"), options)
  assert metadata["files"]["codebook"] is None
  assert 8 < metadata["speech_size"] <= 20
  from sld_jax.speech import units as units_lib
  pieces = units_lib.UnitPieceModel(str(tmp_path / "out" / "unit_pieces.model"))
  records = _records(tmp_path / "out", "dev")
  for record, original in zip(records, rows[30:]):
    assert record["text"] == "one two " + ["zero", "one", "two"][
        int(record["id"][1:]) % 3]
    np.testing.assert_array_equal(pieces.decode(record["units"]), original)


def test_imported_unit_out_of_range_names_file_and_line(tmp_path):
  units_file, text_file = _write_units(tmp_path, [[1, 2], [3, 9, 4], [0]])
  with pytest.raises(readers.CorpusError, match=r"train\.km:2: unit 9 is "
                     r"outside \[0, 8\)"):
    readers.read_fairseq_units(units_file, text_file, num_units=8)
  # Units read with a larger K, then prepared with K=8: prepare names the line.
  utts = readers.read_fairseq_units(units_file, text_file, num_units=10)
  source = prepare.UtteranceSource({"train": utts})
  with pytest.raises(prepare.PrepareError,
                     match=r"train\.km:2: unit 9 is outside \[0, 8\)"):
    prepare.prepare(source, str(tmp_path / "out"),
                    prepare.PrepareOptions(extractor="units", num_clusters=8))


def test_imported_npy_features(tmp_path):
  rng = np.random.default_rng(1)
  feats_dir = tmp_path / "feats"
  feats_dir.mkdir()
  lines = []
  for i in range(12):
    np.save(feats_dir / f"utt{i}.npy",
            rng.normal(size=(int(rng.integers(20, 40)), 6)).astype(np.float32))
    lines.append(f"utt{i}\tHello World, {['one', 'two'][i % 2]}!\tspk{i % 3}\n")
  (feats_dir / "transcripts.tsv").write_text("".join(lines))
  utts = readers.read_npy_features(str(feats_dir))
  source = prepare.UtteranceSource({"train": utts[:10], "test": utts[10:]})
  metadata = prepare.prepare(
      source, str(tmp_path / "out"),
      prepare.PrepareOptions(extractor="npy", num_clusters=4, kmeans_steps=10,
                             merge_repeats=False, text_model_type="word"))
  assert metadata["speech_size"] == 4 and metadata["text_size"] == 7
  records = _records(tmp_path / "out", "test")
  assert [r["text"] for r in records] == ["hello world one", "hello world two"]
  assert [r["speaker"] for r in records] == ["spk1", "spk2"]
  assert [len(r["units"]) for r in records] == [
      np.load(feats_dir / f"utt{i}.npy").shape[0] for i in (10, 11)]


def test_smoke_task_builds_and_yields_batches(tmp_path_factory, monkeypatch):
  data_dir = tmp_path_factory.mktemp("sld_data")
  monkeypatch.setenv("SLD_DATA_DIR", str(data_dir))
  task = "sld_embedded_digits_logmel_smoke"
  layout = tasks.get_layout(task)
  assert layout.speech_size == 128 and layout.text_size == 14
  metadata = json.loads(
      (data_dir / "prepared" / task / "metadata.json").read_text())
  assert {s: metadata["splits"][s]["num_examples"] for s in ec.SPLITS} == {
      "train": 150, "dev": 30, "test": 30}
  batch = next(tasks.get_dataset(task, "train", 256, batch_size=4,
                                 shuffle=True, seed=0).as_numpy_iterator())
  assert batch["decoder_target_tokens"].shape == (4, 256)
  targets = batch["decoder_target_tokens"]
  assert np.all(targets[targets > 0] < layout.real_size)
  assert np.sum(targets == layout.speech_end_id) == np.sum(
      targets == layout.eos_id) == batch["decoder_segment_ids"].max(1).sum()
  eval_batches = list(tasks.get_dataset(task, "test", 256, batch_size=8,
                                        pack=False, shuffle=False)
                      .as_numpy_iterator())
  assert sum(len(b["id"]) for b in eval_batches) == 30
  first = eval_batches[0]
  row = first["decoder_target_tokens"][0]
  prompt = first["speech_length"][0]
  assert row[prompt - 1] == layout.speech_end_id
  assert np.all(layout.is_unit(row[:prompt - 1]))
  vocab = tasks.registry.seqio.get_mixture_or_task(task).output_features[
      "targets"].vocabulary
  assert vocab.decode(row) == first["text"][0].decode()
