"""GPT-2 import/export against a small random transformers GPT-2 (no downloads)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf
import tokenizers
import torch
import transformers

from sld_jax import gpt2_vocab
import gpt2_tokenizer
from sld_jax import hf_gpt2
from sld_jax import losses
from sld_jax import vocab as vocab_lib
from sld_jax.model import decoder as decoder_lib
from sld_jax.model.config import decoder_config

# Its module fixtures are built once: all of it on one xdist worker (scripts/test.sh).
pytestmark = pytest.mark.xdist_group("hf_gpt2")

jax.config.update("jax_default_matmul_precision", "highest")

SPEECH_SIZE = 20
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a test of the tokenizer",
    "speech recognition with discrete speech tokens",
    "café naïve résumé: 42 units per second!",
] * 4
TEXT = "the quick brown fox, hello speech tokens!"


def _train_tokenizer(out_dir: str) -> transformers.PreTrainedTokenizerBase:
  return gpt2_tokenizer.train_gpt2_tokenizer(out_dir, SENTENCES, vocab_size=400)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A random GPT-2 (2 layers, d=64) with its tokenizer, saved as safetensors."""
  hf_dir = str(tmp_path_factory.mktemp("gpt2") / "hf")
  hf_tok = _train_tokenizer(hf_dir)
  eos = hf_tok.convert_tokens_to_ids(gpt2_vocab.EOS_TOKEN)
  config = transformers.GPT2Config(
      vocab_size=len(hf_tok), n_positions=64, n_embd=64, n_layer=2, n_head=4,
      bos_token_id=eos, eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():  # non-trivial norms and biases
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.05)
  model.save_pretrained(hf_dir)
  return {"dir": hf_dir, "tok": hf_tok, "model": model, "eos": eos}


@pytest.fixture(scope="module")
def imported(source):
  return hf_gpt2.load_hf_gpt2(source["dir"], speech_size=SPEECH_SIZE)


def _hf_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


def _our_logits(config, params, ids) -> np.ndarray:
  tokens = jnp.asarray([ids], jnp.int32)
  return np.asarray(decoder_lib.Decoder(config).apply({"params": params}, tokens))[0]


def _copy(src: str, dst: str) -> str:
  shutil.copytree(src, dst)
  return dst


def test_text_id_map_worked_example():
  id_map = gpt2_vocab.TextIdMap(gpt2_vocab_size=5, gpt2_eos_id=4)
  np.testing.assert_array_equal(id_map.ours_of_gpt2, [3, 4, 5, 6, 1])
  np.testing.assert_array_equal(id_map.gpt2_of_ours, [-1, 4, -1, 0, 1, 2, 3])
  assert id_map.text_size == 7
  middle = gpt2_vocab.TextIdMap(gpt2_vocab_size=5, gpt2_eos_id=0)  # eos first
  np.testing.assert_array_equal(middle.ours_of_gpt2, [1, 3, 4, 5, 6])
  np.testing.assert_array_equal(middle.to_gpt2(middle.to_ours([4, 0, 2])), [4, 0, 2])
  with pytest.raises(ValueError, match="id 2 has no GPT-2 counterpart"):
    id_map.to_gpt2([3, 2])
  released = gpt2_vocab.TextIdMap(50257, 50256)
  layout = vocab_lib.VocabLayout(released.text_size, 6000)
  assert released.to_ours([15496, 995, 50256]).tolist() == [15499, 998, 1]
  assert (layout.speech_end_id, layout.real_size, layout.size) == (50259, 56260, 56320)


def test_import_reproduces_hf_logits(source, imported):
  config, params, layout, id_map = imported
  vg = len(source["tok"])
  assert id_map == gpt2_vocab.TextIdMap(vg, source["eos"])
  assert layout == vocab_lib.VocabLayout(vg + 2, SPEECH_SIZE)
  assert (config.vocab_size, config.num_layers, config.embed_dim) == (layout.size, 2, 64)
  gpt2_ids = source["tok"](TEXT).input_ids + [source["eos"]]
  ours = id_map.to_ours(gpt2_ids).tolist()
  assert ours[-1] == vocab_lib.EOS_ID
  expected = _hf_logits(source["model"], gpt2_ids)
  got = _our_logits(config, params, ours)
  np.testing.assert_allclose(got[:, id_map.ours_of_gpt2], expected, atol=1e-4, rtol=0)
  # New rows (PAD, UNK, <speech_end>, units, rounding) sit near the mean row.
  table = params["token_embedder"]["embedding"]
  mean = table[id_map.ours_of_gpt2].mean(axis=0)
  new = np.setdiff1d(np.arange(layout.size), id_map.ours_of_gpt2)
  assert len(new) == layout.size - vg
  assert np.abs(table[new] - mean).max() < 0.05 * table[id_map.ours_of_gpt2].std()


def test_pytorch_bin_and_unprefixed_safetensors_give_the_same_params(source, imported, tmp_path):
  state = {name: tensor.clone() for name, tensor in source["model"].state_dict().items()}
  bin_dir = _copy(source["dir"], str(tmp_path / "bin"))
  os.remove(os.path.join(bin_dir, "model.safetensors"))
  torch.save(state, os.path.join(bin_dir, "pytorch_model.bin"))  # with lm_head, prefixed
  bare_dir = _copy(source["dir"], str(tmp_path / "bare"))  # original GPT-2 hub naming
  safetensors.numpy.save_file(
      {name.removeprefix("transformer."): tensor.numpy() for name, tensor in state.items()
       if name != "lm_head.weight"}, os.path.join(bare_dir, "model.safetensors"))
  for model_dir in (bin_dir, bare_dir):
    _, params, _, _ = hf_gpt2.load_hf_gpt2(model_dir, speech_size=SPEECH_SIZE)
    jax.tree.map(np.testing.assert_array_equal, params, imported[1])


def test_text_loss_at_step_zero_equals_the_source_model(source, imported, tmp_path):
  config, _, layout, id_map = imported
  init_dir = hf_gpt2.save_params(imported[1], str(tmp_path / "init"), config=config,
                                 layout=layout, text_id_map=id_map)
  from_hf = hf_gpt2.init_params_from(source["dir"], config, layout)
  from_orbax = hf_gpt2.init_params_from(init_dir, config, layout)
  jax.tree.map(np.testing.assert_array_equal, from_hf, imported[1])
  jax.tree.map(np.testing.assert_array_equal, from_orbax, imported[1])

  gpt2_ids = source["tok"](TEXT).input_ids + [source["eos"]]
  with torch.no_grad():
    hf_loss = float(source["model"](torch.tensor([gpt2_ids]),
                                     labels=torch.tensor([gpt2_ids])).loss)
  ours = id_map.to_ours(gpt2_ids)
  logits = _our_logits(config, from_orbax, ours[:-1].tolist())
  targets = ours[1:]
  # Over the text columns the imported model is the source model.
  text_logits = jnp.asarray(logits[:, id_map.ours_of_gpt2])
  text_ce = -jax.nn.log_softmax(text_logits)[np.arange(len(targets)), id_map.to_gpt2(targets)]
  assert float(text_ce.mean()) == pytest.approx(hf_loss, abs=1e-4)
  # The objective's softmax also covers the new rows: a small, bounded extra.
  loss, aux = losses.compute_loss(
      jnp.asarray(logits[None]), jnp.asarray(targets[None]), jnp.ones((1, len(targets))),
      layout=layout, method="loss_masking")
  assert int(aux["num_text_tokens"]) == len(targets)
  num_text = len(id_map.ours_of_gpt2)
  bound = math.log(1 + (layout.real_size - num_text) / num_text)
  assert hf_loss - 1e-4 <= float(loss) <= hf_loss + bound


@pytest.mark.parametrize("scan_layers", [False, True])
def test_export_in_sld_order_loads_in_transformers(imported, tmp_path, scan_layers):
  config, params, layout, id_map = imported
  if scan_layers:
    config = config.replace(scan_layers=True)
    params = decoder_lib.stack_layer_params(params, config.num_layers)
  out = hf_gpt2.export_hf_gpt2(params, config, layout, str(tmp_path / "out"),
                               text_id_map=id_map)
  model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  assert model.config.vocab_size == layout.size
  ids = [7, 30, layout.speech_end_id, layout.speech_offset + 3, 12, vocab_lib.EOS_ID]
  np.testing.assert_allclose(_hf_logits(model, ids), _our_logits(config, params, ids),
                             atol=1e-4, rtol=0)
  again_config, again, again_layout, again_map = hf_gpt2.load_hf_gpt2(
      out, layout=layout, expected_config=config)
  assert (again_config, again_layout, again_map) == (config, layout, id_map)
  jax.tree.map(np.testing.assert_allclose, again, params)


def test_export_in_gpt2_order_is_the_source_model_again(source, imported, tmp_path):
  config, params, layout, id_map = imported
  out = hf_gpt2.export_hf_gpt2(params, config, layout, str(tmp_path / "gpt2"),
                               text_id_map=id_map, vocab_order="gpt2",
                               tokenizer_dir=source["dir"])
  model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ids = tok(TEXT).input_ids
  np.testing.assert_allclose(_hf_logits(model, ids), _hf_logits(source["model"], ids),
                             atol=1e-5, rtol=0)
  for name, tensor in source["model"].state_dict().items():
    np.testing.assert_allclose(model.state_dict()[name].numpy(), tensor.numpy(), atol=1e-6)


def test_convert_script_import_then_export(source, tmp_path):
  spec = importlib.util.spec_from_file_location(
      "convert_gpt2", os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_gpt2.py"))
  convert_gpt2 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(convert_gpt2)
  init_dir, out_dir = str(tmp_path / "init"), str(tmp_path / "hf_out")
  convert_gpt2.main(["import", "--hf_dir", source["dir"], "--out", init_dir,
                     "--speech_size", str(SPEECH_SIZE), "--max_length", "32"])
  convert_gpt2.main(["export", "--params", init_dir, "--out", out_dir, "--vocab_order", "gpt2",
                     "--tokenizer_dir", source["dir"]])
  model = transformers.GPT2LMHeadModel.from_pretrained(out_dir).eval()
  ids = source["tok"](TEXT).input_ids
  np.testing.assert_allclose(_hf_logits(model, ids), _hf_logits(source["model"], ids),
                             atol=1e-5, rtol=0)


def test_vocabulary_encodes_and_decodes_like_the_hf_tokenizer(source, imported, tmp_path):
  _, _, layout, id_map = imported
  vocab = gpt2_vocab.Gpt2SpeechTextVocabulary(source["dir"], SPEECH_SIZE)
  assert vocab.layout == layout and vocab.vocab_size == layout.size
  assert vocab.text_id_map == id_map
  files_dir = str(tmp_path / "files")  # the original GPT-2 file pair
  os.makedirs(files_dir)
  hf_vocab = dict(source["tok"].get_vocab())
  with open(os.path.join(files_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(hf_vocab, f)
  source["tok"].backend_tokenizer.model.save(str(tmp_path))
  shutil.copy(str(tmp_path / "merges.txt"), os.path.join(files_dir, "merges.txt"))
  from_files = gpt2_vocab.Gpt2SpeechTextVocabulary(files_dir, SPEECH_SIZE)
  assert from_files.text_id_map == id_map

  texts = [TEXT, "café résumé naïve 東京 🙂", "  two  spaces\tand tab", ""]
  for text in texts:
    gpt2_ids = source["tok"](text).input_ids
    ours = vocab.encode(text)
    assert ours == id_map.to_ours(gpt2_ids).tolist()
    assert from_files.encode(text) == ours
    assert vocab.decode(ours) == source["tok"].decode(gpt2_ids) == text
    noisy = ([layout.speech_offset + 4, layout.speech_end_id] + ours
             + [vocab_lib.UNK_ID, vocab_lib.EOS_ID, 5, 0, layout.size - 1])
    assert vocab.decode(noisy) == text  # units, specials, after-EOS dropped
    np.testing.assert_array_equal(vocab.encode_tf(tf.constant(text)).numpy(), ours)
    assert vocab.decode_tf(tf.constant(noisy)).numpy().decode() == text
  batch = vocab.encode_tf(tf.constant(texts[:2]))
  assert batch.to_list() == [vocab.encode(t) for t in texts[:2]]
  decoded = vocab.decode_tf(batch.to_tensor())
  assert [t.decode() for t in decoded.numpy()] == texts[:2]
  assert vocab.encode_units([0, 19]) == [layout.speech_offset, layout.speech_offset + 19]
  assert pickle.loads(pickle.dumps(vocab)) == vocab


def test_clear_errors(source, imported, tmp_path):
  _, params, layout, _ = imported
  with pytest.raises(ValueError, match=r"num_layers=12 but the checkpoint has n_layer=2"):
    hf_gpt2.load_hf_gpt2(source["dir"], layout=layout,
                         expected_config=decoder_config("gpt2_small", vocab_size=layout.size))
  with pytest.raises(ValueError, match=r"text_size=9 but the checkpoint"):
    hf_gpt2.load_hf_gpt2(source["dir"], layout=vocab_lib.VocabLayout(9, SPEECH_SIZE))

  missing = _copy(source["dir"], str(tmp_path / "missing"))
  weights = os.path.join(missing, "model.safetensors")
  tensors = safetensors.numpy.load_file(weights)
  del tensors["transformer.h.1.mlp.c_fc.weight"]
  safetensors.numpy.save_file(tensors, weights)
  with pytest.raises(ValueError, match=r"missing/model.safetensors lacks tensor 'h.1.mlp.c_fc"):
    hf_gpt2.load_hf_gpt2(missing, speech_size=SPEECH_SIZE)
  os.remove(weights)
  with pytest.raises(FileNotFoundError, match="no GPT-2 weights"):
    hf_gpt2.load_hf_gpt2(missing, speech_size=SPEECH_SIZE)

  relu = _copy(source["dir"], str(tmp_path / "relu"))
  config_file = os.path.join(relu, "config.json")
  with open(config_file) as f:
    raw = json.load(f)
  with open(config_file, "w") as f:
    json.dump({**raw, "activation_function": "relu"}, f)
  with pytest.raises(ValueError, match="unsupported activation_function 'relu'"):
    hf_gpt2.load_hf_gpt2(relu, speech_size=SPEECH_SIZE)

  no_tok = _copy(source["dir"], str(tmp_path / "no_tok"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    os.remove(os.path.join(no_tok, name))
  with pytest.raises(FileNotFoundError, match="need tokenizer.json or vocab.json"):
    hf_gpt2.load_hf_gpt2(no_tok, speech_size=SPEECH_SIZE)
  hf_gpt2.load_hf_gpt2(no_tok, speech_size=SPEECH_SIZE, check_tokenizer=False)

  t5 = _copy(source["dir"], str(tmp_path / "t5"))
  with open(os.path.join(t5, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "T5Tokenizer"}, f)
  with pytest.raises(ValueError, match="unknown tokenizer_class 'T5Tokenizer'"):
    gpt2_vocab.Gpt2SpeechTextVocabulary(t5, SPEECH_SIZE).encode("x")
  wordpiece = _copy(source["dir"], str(tmp_path / "wordpiece"))
  os.remove(os.path.join(wordpiece, "tokenizer_config.json"))
  tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1})).save(
      os.path.join(wordpiece, "tokenizer.json"))
  with pytest.raises(ValueError, match="unknown tokenizer .*model 'WordPiece'"):
    hf_gpt2.load_hf_gpt2(wordpiece, speech_size=SPEECH_SIZE)

  with pytest.raises(ValueError, match="cannot export DecoderConfig.position='rope'"):
    hf_gpt2.export_hf_gpt2(params, imported[0].replace(position="rope"), layout,
                           str(tmp_path / "x"))
  with pytest.raises(FileNotFoundError, match="neither a HF GPT-2 directory"):
    hf_gpt2.init_params_from(str(tmp_path), imported[0], layout)


def test_trainer_initialised_from_the_checkpoint_starts_from_the_text_model(source, imported):
  """INIT_FROM: the trainer's step-0 state holds the imported model exactly."""
  from sld_jax import lm as lm_lib
  from sld_jax import optim
  from sld_jax import partitioning
  from sld_jax import trainer as trainer_lib

  config, params, layout, id_map = imported
  model = lm_lib.SpeechTextLM(layout, decoder=lambda vocab_size: config.replace(dropout_rate=0.0),
                              loss_config=losses.LossConfig(method="loss_masking"))
  schedule = optim.learning_rate_schedule(total_steps=10, peak_value=1e-3)
  mesh = partitioning.make_mesh(data=-1, devices=jax.devices()[:1])
  trainer = trainer_lib.Trainer(model, optim.make_optimizer(learning_rate=schedule), schedule,
                                mesh, partitioning.DEFAULT_LOGICAL_AXIS_RULES)
  state = trainer.init_state_from_params(
      hf_gpt2.init_params_from(source["dir"], config, layout,
                               shardings=trainer.state_shardings.params))
  assert int(state.step) == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, params)

  gpt2_ids = source["tok"](TEXT).input_ids + [source["eos"]]
  ours = id_map.to_ours(gpt2_ids).astype(np.int32)
  batch = {"decoder_input_tokens": ours[None, :-1], "decoder_target_tokens": ours[None, 1:],
           "decoder_loss_weights": np.ones((1, len(ours) - 1), np.float32)}
  loss, _ = model.loss_fn(state.params, batch)
  expected, _ = losses.compute_loss(
      jnp.asarray(_our_logits(config, params, ours[:-1].tolist())[None]),
      jnp.asarray(ours[None, 1:]), jnp.ones((1, len(ours) - 1)), layout=layout,
      method="loss_masking")
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)
