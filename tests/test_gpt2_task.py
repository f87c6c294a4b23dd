"""The LibriSpeech task with GPT-2 BPE text ids, on imported units (no downloads)."""

from __future__ import annotations

import gin
import numpy as np
import pytest
import seqio
import transformers

from sld_jax import gpt2_vocab
import gpt2_tokenizer
from sld_jax import vocab as vocab_lib
from sld_jax.speech import prepare
from sld_jax.speech import readers
import tasks
from tasks import registry

TASK = "sld_librispeech_units_gpt2"
K = 8
UNITS = {  # utterance id -> imported units in [0, K)
    "u0": [3, 3, 1, 7, 0],
    "u1": [5, 2, 2, 6],
    "u2": [4, 0, 1],
}
TRANSCRIPTS = {
    "u0": "HELLO WORLD THE QUICK BROWN FOX",
    "u1": "SPEECH TOKENS WITH A LAZY DOG",
    "u2": "THE WORLD OF SPEECH",
}
TOKENIZER_SENTENCES = [
    "hello world the quick brown fox jumps over the lazy dog",
    "speech recognition with discrete speech tokens",
] * 4


def _train_tokenizer(out_dir: str) -> transformers.PreTrainedTokenizerBase:
  return gpt2_tokenizer.train_gpt2_tokenizer(out_dir, TOKENIZER_SENTENCES, vocab_size=300)


def _prepare_units(tmp_path) -> str:
  units_file = tmp_path / "train.km"
  text_file = tmp_path / "train.txt"
  units_file.write_text("".join(f"{u}\t{' '.join(map(str, x))}\n" for u, x in UNITS.items()))
  text_file.write_text("".join(f"{u}\t{t}\n" for u, t in TRANSCRIPTS.items()))
  utts = readers.read_fairseq_units(str(units_file), str(text_file), num_units=K)
  out_dir = str(tmp_path / "prepared")
  prepare.prepare(prepare.UtteranceSource({"train": utts}, name="fairseq"), out_dir,
                  prepare.PrepareOptions(extractor="units", num_clusters=K,
                                         merge_repeats=False))
  return out_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("gpt2_task")
  tokenizer_dir = str(tmp_path / "gpt2")
  hf_tok = _train_tokenizer(tokenizer_dir)
  return {"prepared": _prepare_units(tmp_path), "tokenizer_dir": tokenizer_dir,
          "hf_tok": hf_tok}


@pytest.fixture(autouse=True)
def _fresh_config(monkeypatch):
  """Clears gin and re-registers the LibriSpeech tasks (their vocabularies cache)."""
  monkeypatch.delenv(registry.GPT2_DIR_ENV, raising=False)
  gin.clear_config()
  tasks.register_librispeech_tasks()
  yield
  gin.clear_config()
  tasks.register_librispeech_tasks()


def _bind(prepared_dir: str, tokenizer_dir=None) -> None:
  with gin.unlock_config():
    gin.bind_parameter("librispeech_prepared_dir.path", prepared_dir)
    if tokenizer_dir is not None:
      gin.bind_parameter("gpt2_tokenizer_dir.path", tokenizer_dir)


def test_targets_are_units_speech_end_gpt2_text_ids_eos(data):
  _bind(data["prepared"], data["tokenizer_dir"])
  hf_tok = data["hf_tok"]
  id_map = gpt2_vocab.text_id_map_of_dir(data["tokenizer_dir"])
  assert id_map.gpt2_vocab_size == len(hf_tok)
  assert id_map.gpt2_eos_id == len(hf_tok) - 1  # <|endoftext|> last, like GPT-2

  layout = tasks.get_layout(TASK)
  vocabulary = seqio.get_mixture_or_task(TASK).output_features["targets"].vocabulary
  assert isinstance(vocabulary, gpt2_vocab.Gpt2SpeechTextVocabulary)
  assert layout == vocabulary.layout == vocab_lib.VocabLayout(
      text_size=len(hf_tok) - 1 + 3, speech_size=K)
  assert vocabulary.text_id_map == id_map

  batches = tasks.get_dataset(TASK, "train", sequence_length=64, batch_size=3,
                              pack=False, shuffle=False)
  rows = [row for batch in batches.as_numpy_iterator()
          for row in zip(batch["decoder_target_tokens"], batch["text"], batch["id"])]
  assert sorted(r[2].decode() for r in rows) == sorted(UNITS)
  for targets, text, utt_id in rows:
    text, utt_id = text.decode(), utt_id.decode()
    assert text == TRANSCRIPTS[utt_id].lower()  # the prepared (normalised) text
    gpt2_ids = hf_tok(text).input_ids
    assert len(gpt2_ids) > 1
    expected = np.concatenate([
        np.asarray(UNITS[utt_id]) + layout.speech_offset, [layout.speech_end_id],
        id_map.to_ours(gpt2_ids), [vocab_lib.EOS_ID]])
    np.testing.assert_array_equal(targets[:len(expected)], expected)
    assert not targets[len(expected):].any()  # padding only
    assert vocabulary.decode(targets.tolist()) == text


def test_sentencepiece_task_layout_is_still_the_prepared_one(data):
  _bind(data["prepared"])
  metadata = prepare.load_metadata(data["prepared"])
  assert tasks.get_layout(tasks.LIBRISPEECH_TASK) == vocab_lib.VocabLayout(
      text_size=metadata["text_size"], speech_size=metadata["speech_size"])


def test_tokenizer_dir_from_the_environment(data, monkeypatch):
  monkeypatch.setenv(registry.GPT2_DIR_ENV, data["tokenizer_dir"])
  assert tasks.gpt2_tokenizer_dir() == data["tokenizer_dir"]
  _bind(data["prepared"])
  assert tasks.get_layout(TASK).text_size == len(data["hf_tok"]) + 2


def test_missing_tokenizer_dir_names_the_gin_binding_and_the_env_variable(data):
  _bind(data["prepared"])
  with pytest.raises(ValueError, match=r"gpt2_tokenizer_dir\.path.*SLD_GPT2_DIR"):
    tasks.gpt2_tokenizer_dir()
  with pytest.raises(ValueError, match=r"gpt2_tokenizer_dir\.path.*SLD_GPT2_DIR"):
    tasks.get_layout(TASK)


def test_tokenizer_dir_that_does_not_exist_is_named(data, tmp_path):
  missing = str(tmp_path / "no_gpt2_here")
  _bind(data["prepared"], missing)
  with pytest.raises(FileNotFoundError, match="no_gpt2_here does not exist"):
    tasks.get_layout(TASK)
