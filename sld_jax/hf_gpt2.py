"""Pretrained Hugging Face GPT-2 <-> sld_jax ``Decoder`` parameters.

Import (``load_hf_gpt2``) reads a local HF GPT-2 directory (``config.json``
and ``model.safetensors``, a sharded ``model.safetensors.index.json``, or
``pytorch_model.bin``; tensor names with or without the ``transformer.``
prefix; ``lm_head.weight`` may be absent since it is tied; see
``hf_gpt2_files``) and returns an
sld_jax ``DecoderConfig`` and parameter tree. HF GPT-2 uses ``Conv1D``, so
its weights are ``[in, out]`` and map without transposes::

  HF GPT-2 tensor            shape     sld_jax parameter
  wte.weight                 [Vg, E]   token_embedder/embedding [V, E] (rows moved, below)
  wpe.weight                 [P, E]    position_embedder/embedding [max_length, E]
  h.i.ln_1.{weight,bias}     [E]       layers_i/pre_attention_norm/{scale,bias}
  h.i.attn.c_attn.weight     [E, 3E]   layers_i/attention/{query,key,value}/kernel [E, H, D]
  h.i.attn.c_attn.bias       [3E]      layers_i/attention/{query,key,value}/bias [H, D]
  h.i.attn.c_proj.{w,b}      [E, E]    layers_i/attention/out/kernel [H, D, E], bias [E]
  h.i.ln_2.{weight,bias}     [E]       layers_i/pre_mlp_norm/{scale,bias}
  h.i.mlp.c_fc.{w,b}         [E, M]    layers_i/mlp/wi/{kernel,bias}
  h.i.mlp.c_proj.{w,b}       [M, E]    layers_i/mlp/wo/{kernel,bias}
  ln_f.{weight,bias}         [E]       final_norm/{scale,bias}

(``c_attn``'s output columns are ``[query | key | value]``, each split into
H heads of D = E / H columns.) With ``scan_layers`` the ``layers_i`` become
one stacked ``layers`` subtree.

Vocabulary: GPT-2 row g moves to row ``TextIdMap.ours_of_gpt2[g]`` (see
``sld_jax.gpt2_vocab``: ordinary ids +3, ``<|endoftext|>`` -> 1 = EOS). For
GPT-2 with K = 6000 units (``VocabLayout(50259, 6000)``, 56320 rows)::

  rows 0 (PAD), 2 (UNK)                      new
  row 1 (EOS)         = wte[50256]            <|endoftext|>
  rows 3 .. 50258     = wte[0 .. 50255]
  row 50259 (<speech_end>), 50260 .. 56259 (units), 56260 (<time_mask>),
  56261 .. 56319 (rounding): new

New rows are ``new_row_init="mean"``: the mean of the pretrained rows plus
N(0, (0.01 * per-dimension std)^2) noise, so the text distribution barely
moves (each new row's logit is about the average text logit), or
``"normal"``: N(0, 0.02^2) like a fresh GPT-2 row, as the release
initialised its new rows (the paper configs choose it with
``hf_gpt2.init_params_from.new_row_init = "normal"``). The text columns of the
imported model reproduce the GPT-2 logits exactly; a softmax over the whole
real vocabulary (as the losses use) gives the new rows a little mass, at
most ``log(1 + new / text)`` nats of extra loss with mean rows (Jensen).

Export (``export_hf_gpt2``) writes ``config.json`` + ``model.safetensors``
that ``transformers.GPT2LMHeadModel.from_pretrained`` loads, in one of two
vocabulary orders:

* ``vocab_order="sld"`` (default): all ``layout.size`` rows in sld_jax id
  order: the exported model takes and predicts sld_jax ids (text via
  ``Gpt2SpeechTextVocabulary`` or ``SpeechTextVocabulary``, units at
  ``layout.speech_offset + u``); its logits equal the sld_jax model's.
  A GPT-2 tokenizer, if given, goes to ``text_tokenizer/`` so that HF does not
  pair it with the wrong ids.
* ``vocab_order="gpt2"`` (needs the ``TextIdMap``): only the text rows, back
  in GPT-2 order, a plain GPT-2 text model again for the original tokenizer
  (copied to the directory); its logits equal the sld_jax text columns.

``sld_jax_export.json`` in the directory records the order, the layout and
the map, so ``load_hf_gpt2`` reads an sld-order export back unpermuted.

Training init: ``init_params_from(path, config, layout)`` takes either a HF
GPT-2 directory (converted on the fly) or a directory written by
``save_params`` / ``scripts/convert_gpt2.py`` (orbax ``<dir>/params``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from sld_jax import checkpointing
from sld_jax import gpt2_vocab
from sld_jax import hf_gpt2_files as hf_files
from sld_jax import partitioning
from sld_jax import vocab as vocab_lib
from sld_jax.model import decoder as decoder_lib
from sld_jax.model.config import DecoderConfig

Params = Any

NEW_ROW_INITS = ("mean", "normal")
VOCAB_ORDERS = ("sld", "gpt2")
EXPORT_METADATA = "sld_jax_export.json"
PARAMS_METADATA = "sld_jax_params.json"
PARAMS_SUBDIR = "params"
TEXT_TOKENIZER_SUBDIR = "text_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json")
MEAN_INIT_NOISE = 0.01
NORMAL_INIT_STDDEV = 0.02


# ----------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------


def decoder_config_of(hf: hf_files.HfGpt2Config, vocab_size: int) -> DecoderConfig:
  """The sld_jax config of a GPT-2 checkpoint, over ``vocab_size`` rows."""
  return DecoderConfig(
      vocab_size=vocab_size, num_layers=hf.n_layer, num_heads=hf.n_head, embed_dim=hf.n_embd,
      mlp_dim=hf.n_inner, max_length=hf.n_positions, dropout_rate=hf.dropout,
      layer_norm_epsilon=hf.layer_norm_epsilon, tie_embeddings=hf.tie_word_embeddings)


def check_config_matches(expected: DecoderConfig, hf: hf_files.HfGpt2Config,
                         vocab_size: int, where: str) -> None:
  """Raises ValueError naming every field where ``expected`` and the checkpoint differ."""
  pairs = (("num_layers", "n_layer", hf.n_layer), ("num_heads", "n_head", hf.n_head),
           ("embed_dim", "n_embd", hf.n_embd), ("mlp_dim", "n_inner", hf.n_inner),
           ("tie_embeddings", "tie_word_embeddings", hf.tie_word_embeddings),
           ("vocab_size", "vocab_size (extended to the layout)", vocab_size),
           ("norm", "(GPT-2 norm)", "layernorm"), ("position", "(GPT-2 positions)", "learned"),
           ("mlp", "(GPT-2 MLP)", "gelu"))
  problems = [f"DecoderConfig.{ours}={getattr(expected, ours)!r} but the checkpoint has "
              f"{theirs}={value!r}" for ours, theirs, value in pairs
              if getattr(expected, ours) != value]
  if expected.max_length > hf.n_positions:
    problems.append(f"DecoderConfig.max_length={expected.max_length} exceeds the checkpoint's "
                    f"n_positions={hf.n_positions}")
  if not np.isclose(expected.layer_norm_epsilon, hf.layer_norm_epsilon, rtol=1e-6, atol=0):
    problems.append(f"DecoderConfig.layer_norm_epsilon={expected.layer_norm_epsilon} but the "
                    f"checkpoint has layer_norm_epsilon={hf.layer_norm_epsilon}")
  if problems:
    raise ValueError(f"the expected model config does not match {where}: "
                     + "; ".join(problems))


def _layout_json(layout: vocab_lib.VocabLayout) -> dict:
  return {"text_size": layout.text_size, "speech_size": layout.speech_size}


def _layout_of_json(data: Any, where: str) -> vocab_lib.VocabLayout:
  try:
    return vocab_lib.VocabLayout(int(data["text_size"]), int(data["speech_size"]))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: bad layout {data!r}: {e}") from e


def _resolve_layout(layout: Optional[vocab_lib.VocabLayout], speech_size: Optional[int],
                    text_size: int, where: str) -> vocab_lib.VocabLayout:
  if layout is None:
    if speech_size is None:
      raise ValueError(f"{where}: give a layout or speech_size")
    return vocab_lib.VocabLayout(text_size=text_size, speech_size=int(speech_size))
  if layout.text_size != text_size:
    raise ValueError(f"{where}: the layout has text_size={layout.text_size} but the "
                     f"checkpoint's text vocabulary gives text_size={text_size}")
  if speech_size is not None and int(speech_size) != layout.speech_size:
    raise ValueError(f"{where}: speech_size={speech_size} disagrees with the layout's "
                     f"speech_size={layout.speech_size}")
  return layout


# ----------------------------------------------------------------------------
# Parameter trees.
# ----------------------------------------------------------------------------


def _abstract_params(config: DecoderConfig, shardings: Optional[Params] = None) -> Params:
  """The ``Decoder`` params as ``jax.ShapeDtypeStruct``s (with ``shardings``, if given)."""
  abstract, _ = partitioning.abstract_state(
      functools.partial(decoder_lib.init_params, config), jax.random.key(0))
  return abstract if shardings is None else partitioning.with_shardings(abstract, shardings)


def _check_tree(params: Params, config: DecoderConfig, where: str) -> None:
  """Raises if ``params`` does not have exactly the Decoder's names and shapes."""
  checkpointing.check_params_match(
      params, _abstract_params(config), where,
      f"Decoder with {config.num_layers} layers, embed_dim {config.embed_dim}, vocab_size "
      f"{config.vocab_size}", saved_name="parameters")


def _new_rows(table: np.ndarray, count: int, method: str, rng: np.random.Generator) -> np.ndarray:
  if method == "mean":
    noise = rng.standard_normal((count, table.shape[1])) * (MEAN_INIT_NOISE * table.std(axis=0))
    return (table.mean(axis=0) + noise).astype(np.float32)
  return (rng.standard_normal((count, table.shape[1])) * NORMAL_INIT_STDDEV).astype(np.float32)


def _extend_rows(gpt2_table: np.ndarray, id_map: gpt2_vocab.TextIdMap, size: int, method: str,
                 rng: np.random.Generator) -> np.ndarray:
  """``[Vg, E]`` GPT-2 rows -> ``[size, E]`` rows in sld_jax id order."""
  table = np.empty((size, gpt2_table.shape[1]), np.float32)
  ours = id_map.ours_of_gpt2
  is_new = np.ones(size, bool)
  is_new[ours] = False
  table[is_new] = _new_rows(gpt2_table, int(is_new.sum()), method, rng)
  table[ours] = gpt2_table
  return table


def _layer_from_hf(state, i, hf: hf_files.HfGpt2Config, source: str) -> Params:
  e, h, m = hf.n_embd, hf.n_head, hf.n_inner
  d = e // h
  take = lambda name, shape: hf_files.take_tensor(state, f"h.{i}.{name}", shape, source)
  norm = lambda name: {"scale": take(f"{name}.weight", (e,)), "bias": take(f"{name}.bias", (e,))}
  qkv_kernels = np.split(take("attn.c_attn.weight", (e, 3 * e)), 3, axis=1)
  qkv_biases = np.split(take("attn.c_attn.bias", (3 * e,)), 3)
  attention = {name: {"kernel": kernel.reshape(e, h, d), "bias": bias.reshape(h, d)}
               for name, kernel, bias in zip(("query", "key", "value"), qkv_kernels, qkv_biases)}
  attention["out"] = {"kernel": take("attn.c_proj.weight", (e, e)).reshape(h, d, e),
                      "bias": take("attn.c_proj.bias", (e,))}
  return {
      "pre_attention_norm": norm("ln_1"),
      "attention": attention,
      "pre_mlp_norm": norm("ln_2"),
      "mlp": {"wi": {"kernel": take("mlp.c_fc.weight", (e, m)),
                     "bias": take("mlp.c_fc.bias", (m,))},
              "wo": {"kernel": take("mlp.c_proj.weight", (m, e)),
                     "bias": take("mlp.c_proj.bias", (e,))}},
  }


def _layer_to_hf(layer: Params, i: int) -> dict[str, np.ndarray]:
  attention = layer["attention"]
  e = attention["query"]["kernel"].shape[0]
  prefix = f"transformer.h.{i}."
  return {
      prefix + "ln_1.weight": layer["pre_attention_norm"]["scale"],
      prefix + "ln_1.bias": layer["pre_attention_norm"]["bias"],
      prefix + "attn.c_attn.weight": np.concatenate(
          [attention[n]["kernel"].reshape(e, e) for n in ("query", "key", "value")], axis=1),
      prefix + "attn.c_attn.bias": np.concatenate(
          [attention[n]["bias"].reshape(e) for n in ("query", "key", "value")]),
      prefix + "attn.c_proj.weight": attention["out"]["kernel"].reshape(e, e),
      prefix + "attn.c_proj.bias": attention["out"]["bias"],
      prefix + "ln_2.weight": layer["pre_mlp_norm"]["scale"],
      prefix + "ln_2.bias": layer["pre_mlp_norm"]["bias"],
      prefix + "mlp.c_fc.weight": layer["mlp"]["wi"]["kernel"],
      prefix + "mlp.c_fc.bias": layer["mlp"]["wi"]["bias"],
      prefix + "mlp.c_proj.weight": layer["mlp"]["wo"]["kernel"],
      prefix + "mlp.c_proj.bias": layer["mlp"]["wo"]["bias"],
  }


def _host_params(params: Params, config: DecoderConfig, where: str) -> Params:
  """Unboxed, plain-stack float32 numpy params, checked against the config."""
  params = jax.device_get(nn.meta.unbox(params))
  _check_tree(params, config, where)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  if config.scan_layers:
    params = decoder_lib.unstack_layer_params(params, config.num_layers)
  return params


# ----------------------------------------------------------------------------
# Import.
# ----------------------------------------------------------------------------


def _read_export_metadata(model_dir: str) -> Optional[dict]:
  path = os.path.join(model_dir, EXPORT_METADATA)
  if not os.path.exists(path):
    return None
  meta = hf_files.read_json(path)
  if meta.get("vocab_order") not in VOCAB_ORDERS:
    raise ValueError(f"{path}: vocab_order must be one of {VOCAB_ORDERS}, "
                     f"got {meta.get('vocab_order')!r}")
  return meta


def _gpt2_text_id_map(model_dir: str, hf: hf_files.HfGpt2Config, check_tokenizer: bool
                      ) -> gpt2_vocab.TextIdMap:
  config_file = os.path.join(model_dir, "config.json")
  if not check_tokenizer:
    if hf.eos_token_id is None:
      raise ValueError(f"{config_file} has no single eos_token_id; cannot place "
                       f"{gpt2_vocab.EOS_TOKEN} without the tokenizer")
    return gpt2_vocab.TextIdMap(hf.vocab_size, hf.eos_token_id)
  try:
    tokenizer = gpt2_vocab.load_gpt2_tokenizer(model_dir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e} (pass check_tokenizer=False to import the weights "
                            "using config.json's eos_token_id alone)") from e
  id_map = gpt2_vocab.text_id_map_of_tokenizer(tokenizer, hf.vocab_size)
  if hf.eos_token_id is not None and hf.eos_token_id != id_map.gpt2_eos_id:
    raise ValueError(
        f"{config_file} has eos_token_id={hf.eos_token_id} but the tokenizer in {model_dir} "
        f"puts {gpt2_vocab.EOS_TOKEN} at {id_map.gpt2_eos_id}")
  return id_map


def load_hf_gpt2(model_dir: str, *, layout: Optional[vocab_lib.VocabLayout] = None,
                 speech_size: Optional[int] = None,
                 expected_config: Optional[DecoderConfig] = None, init_seed: int = 0,
                 new_row_init: str = "mean", check_tokenizer: bool = True
                 ) -> tuple[DecoderConfig, Params, vocab_lib.VocabLayout,
                            Optional[gpt2_vocab.TextIdMap]]:
  """Converts a local HF GPT-2 directory into sld_jax params (module docstring).

  Args:
    model_dir: holds ``config.json``, the weights and (unless
      ``check_tokenizer=False``) the GPT-2 tokenizer files.
    layout: the shared layout to build; its text_size must be the
      checkpoint's (``TextIdMap.text_size``). Default: built from
      ``speech_size``.
    speech_size: K, when ``layout`` is None (or to cross-check it).
    expected_config: the model the caller will run (e.g. from gin); every
      architecture field must match the checkpoint and its ``max_length``
      may be smaller than ``n_positions`` (the position table is cut). The
      returned config is then this one (dropout, dtypes, scan, remat kept).
    init_seed: seeds the new rows.
    new_row_init: "mean" or "normal" (module docstring).
    check_tokenizer: require the tokenizer and check that its
      ``<|endoftext|>`` id agrees with ``config.json``.

  Returns:
    ``(config, params, layout, text_id_map)``: params are numpy arrays in
    ``config.param_dtype`` (plain or scanned per ``config.scan_layers``);
    ``text_id_map`` is None only for an sld-order export of a model without
    a GPT-2 text vocabulary.
  """
  if new_row_init not in NEW_ROW_INITS:
    raise ValueError(f"new_row_init must be one of {NEW_ROW_INITS}, got {new_row_init!r}")
  hf = hf_files.read_hf_config(model_dir)
  meta = _read_export_metadata(model_dir)
  sld_order = meta is not None and meta["vocab_order"] == "sld"
  if sld_order:
    where = os.path.join(model_dir, EXPORT_METADATA)
    saved = _layout_of_json(meta.get("layout"), where)
    layout = _resolve_layout(layout, speech_size, saved.text_size, where)
    if layout != saved or hf.vocab_size != saved.size:
      raise ValueError(f"{where}: the export's layout {saved} (vocab_size {hf.vocab_size}) "
                       f"differs from the requested {layout}")
    raw_map = meta.get("text_id_map")
    id_map = None if raw_map is None else gpt2_vocab.TextIdMap.from_json(raw_map, where)
  else:
    id_map = _gpt2_text_id_map(model_dir, hf, check_tokenizer)
    layout = _resolve_layout(layout, speech_size, id_map.text_size, model_dir)

  where = f"the GPT-2 checkpoint {os.path.join(model_dir, 'config.json')}"
  if expected_config is not None:
    check_config_matches(expected_config, hf, layout.size, where)
    config = expected_config
  else:
    config = decoder_config_of(hf, layout.size)

  state, source = hf_files.read_hf_state(model_dir)
  e = hf.n_embd
  rng = np.random.default_rng(init_seed)
  wte = hf_files.take_tensor(state, "wte.weight", (hf.vocab_size, e), source)
  lm_head = state.pop("lm_head.weight", None)
  extend = lambda table: (table if sld_order
                          else _extend_rows(table, id_map, layout.size, new_row_init, rng))
  params = {"token_embedder": {"embedding": extend(wte)}}
  wpe = hf_files.take_tensor(state, "wpe.weight", (hf.n_positions, e), source)
  params["position_embedder"] = {"embedding": wpe[:config.max_length]}
  for i in range(hf.n_layer):
    params[f"layers_{i}"] = _layer_from_hf(state, i, hf, source)
  params["final_norm"] = {"scale": hf_files.take_tensor(state, "ln_f.weight", (e,), source),
                          "bias": hf_files.take_tensor(state, "ln_f.bias", (e,), source)}
  if hf.tie_word_embeddings:
    if lm_head is not None and not np.array_equal(lm_head, wte):
      raise ValueError(f"{source}: lm_head.weight differs from wte.weight although "
                       "config.json has tie_word_embeddings=true")
  else:
    if lm_head is None:
      raise ValueError(f"GPT-2 checkpoint {source} lacks tensor 'lm_head.weight' "
                       "(config.json has tie_word_embeddings=false)")
    params["logits_dense"] = {"kernel": extend(lm_head).T.copy()}
  leftover = [name for name in state if not name.endswith(hf_files.IGNORED_SUFFIXES)]
  if leftover:
    raise ValueError(f"GPT-2 checkpoint {source} has tensors sld_jax cannot place: "
                     f"{sorted(leftover)[:10]}")

  if config.scan_layers:
    params = decoder_lib.stack_layer_params(params, config.num_layers)
  _check_tree(params, config, where)
  params = jax.tree.map(lambda x: np.asarray(x, config.params_dtype), params)
  return config, params, layout, id_map


# ----------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------


def export_hf_gpt2(params: Params, config: DecoderConfig, layout: vocab_lib.VocabLayout,
                   out_dir: str, *, text_id_map: Optional[gpt2_vocab.TextIdMap] = None,
                   vocab_order: str = "sld", tokenizer_dir: Optional[str] = None) -> str:
  """Writes a HF GPT-2 directory (``config.json``, ``model.safetensors``).

  Args:
    params: Decoder params (boxed or not, plain or scanned, any dtype; written
      as float32). Must be fully addressable on this process.
    config: their config; must be GPT-2 shaped (layernorm, learned, gelu).
    layout: the shared layout; ``config.vocab_size`` must be ``layout.size``.
    out_dir: created if missing; the files are overwritten.
    text_id_map: the import's map; required for ``vocab_order="gpt2"``,
      recorded in ``sld_jax_export.json`` either way.
    vocab_order: "sld" (all rows, sld_jax ids) or "gpt2" (text rows only, in
      GPT-2 order); see the module docstring.
    tokenizer_dir: a GPT-2 tokenizer to copy (to ``out_dir`` for "gpt2",
      to ``out_dir/text_tokenizer`` for "sld").

  Returns:
    ``out_dir``.
  """
  if vocab_order not in VOCAB_ORDERS:
    raise ValueError(f"vocab_order must be one of {VOCAB_ORDERS}, got {vocab_order!r}")
  for field, gpt2_value in (("norm", "layernorm"), ("position", "learned"), ("mlp", "gelu")):
    if getattr(config, field) != gpt2_value:
      raise ValueError(f"cannot export DecoderConfig.{field}={getattr(config, field)!r} as "
                       f"GPT-2 (needs {gpt2_value!r})")
  if config.vocab_size != layout.size:
    raise ValueError(f"DecoderConfig.vocab_size={config.vocab_size} but the layout has "
                     f"{layout.size} rows")
  if vocab_order == "gpt2":
    if text_id_map is None:
      raise ValueError("vocab_order='gpt2' needs the text_id_map of the GPT-2 import")
    if text_id_map.text_size != layout.text_size:
      raise ValueError(f"text_id_map has text_size {text_id_map.text_size}, the layout "
                       f"{layout.text_size}")
    rows, eos, pad = text_id_map.ours_of_gpt2, text_id_map.gpt2_eos_id, None
  else:
    rows, eos, pad = np.arange(layout.size), vocab_lib.EOS_ID, vocab_lib.PAD_ID
  host = _host_params(params, config, "the params given to export_hf_gpt2")
  tensors = {
      "transformer.wte.weight": host["token_embedder"]["embedding"][rows],
      "transformer.wpe.weight": host["position_embedder"]["embedding"],
      "transformer.ln_f.weight": host["final_norm"]["scale"],
      "transformer.ln_f.bias": host["final_norm"]["bias"],
  }
  for i in range(config.num_layers):
    tensors.update(_layer_to_hf(host[f"layers_{i}"], i))
  if not config.tie_embeddings:
    tensors["lm_head.weight"] = host["logits_dense"]["kernel"].T[rows]
  tensors = {name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()}

  hf_config = {
      "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
      "vocab_size": len(rows), "n_positions": config.max_length, "n_embd": config.embed_dim,
      "n_layer": config.num_layers, "n_head": config.num_heads, "n_inner": config.mlp_dim,
      "activation_function": "gelu_new", "layer_norm_epsilon": config.layer_norm_epsilon,
      "resid_pdrop": config.dropout_rate, "embd_pdrop": config.dropout_rate,
      "attn_pdrop": config.dropout_rate, "initializer_range": 0.02,
      "bos_token_id": int(eos), "eos_token_id": int(eos), "pad_token_id": pad,
      "tie_word_embeddings": config.tie_embeddings, "dtype": "float32",
  }
  metadata = {"vocab_order": vocab_order, "layout": _layout_json(layout),
              "text_id_map": None if text_id_map is None else text_id_map.to_json()}
  os.makedirs(out_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, "model.safetensors"),
                              metadata={"format": "pt"})
  for name, content in (("config.json", hf_config), (EXPORT_METADATA, metadata)):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2)
  if tokenizer_dir is not None:
    gpt2_vocab.load_gpt2_tokenizer(tokenizer_dir)  # fails early on a wrong directory
    target = out_dir if vocab_order == "gpt2" else os.path.join(out_dir, TEXT_TOKENIZER_SUBDIR)
    os.makedirs(target, exist_ok=True)
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(tokenizer_dir, name)):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(target, name))
  return out_dir


# ----------------------------------------------------------------------------
# Orbax params checkpoints and the training init.
# ----------------------------------------------------------------------------


def save_params(params: Params, directory: str, *, config: DecoderConfig,
                layout: vocab_lib.VocabLayout,
                text_id_map: Optional[gpt2_vocab.TextIdMap] = None, source: str = "") -> str:
  """Writes ``directory/params`` (orbax) and ``directory/sld_jax_params.json``."""
  params = nn.meta.unbox(params)
  _check_tree(params, config, "the params given to save_params")
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_SUBDIR), params, force=True)
  checkpointer.wait_until_finished()
  checkpointing.write_checksums(os.path.join(directory, PARAMS_SUBDIR), step=0)
  metadata = {"config": dataclasses.asdict(config), "layout": _layout_json(layout),
              "text_id_map": None if text_id_map is None else text_id_map.to_json(),
              "source": source}
  with open(os.path.join(directory, PARAMS_METADATA), "w", encoding="utf-8") as f:
    json.dump(metadata, f, indent=2)
  return directory


def _params_dir(path: str) -> Optional[str]:
  for candidate in (os.path.join(path, PARAMS_SUBDIR), path):
    if os.path.exists(os.path.join(candidate, "_CHECKPOINT_METADATA")):
      return candidate
  return None


def restore_params(directory: str, config: DecoderConfig, layout: vocab_lib.VocabLayout,
                   shardings: Optional[Params] = None) -> Params:
  """Reads params written by ``save_params``, checked against config and layout.

  Args:
    directory: the ``save_params`` directory (or its ``params`` subdir).
    config, layout: what the caller will run; the saved architecture and
      layout must be the same (dropout, dtypes, remat may differ; a
      plain/scanned mismatch is an error).
    shardings: optional pytree of ``jax.sharding.Sharding`` like the params;
      the arrays are then restored sharded, else as numpy arrays.
  """
  params_dir = _params_dir(directory)
  if params_dir is None:
    raise FileNotFoundError(f"no orbax params checkpoint at {directory} or "
                            f"{os.path.join(directory, PARAMS_SUBDIR)}")
  meta_file = os.path.join(os.path.dirname(params_dir.rstrip("/")), PARAMS_METADATA)
  if os.path.exists(meta_file):
    meta = hf_files.read_json(meta_file)
    saved_layout = _layout_of_json(meta.get("layout"), meta_file)
    if saved_layout != layout:
      raise ValueError(f"{meta_file}: the params were saved for {saved_layout}, "
                       f"the run uses {layout}")
  checkpointing.verify_checksums(params_dir, step=0)
  checkpointer = ocp.StandardCheckpointer()
  saved_tree = checkpointer.metadata(params_dir).item_metadata.tree
  _check_tree(saved_tree, config, f"the orbax params {params_dir}")
  return checkpointer.restore(params_dir, _abstract_params(config, shardings))


def place_params(params: Params, shardings: Params) -> Params:
  """Host numpy params -> global arrays with ``shardings`` (any process count)."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      params, shardings)


@gin.configurable(denylist=["path", "config", "layout", "shardings"])
def init_params_from(path: str, config: DecoderConfig, layout: vocab_lib.VocabLayout, *,
                     shardings: Optional[Params] = None, init_seed: int = 0,
                     new_row_init: str = "mean") -> Params:
  """Initial training params from a HF GPT-2 directory, a ``save_params`` dir
  or a training run.

  Args:
    path: a HF GPT-2 directory (has ``config.json``; converted now, see
      ``load_hf_gpt2``), a directory written by ``save_params`` /
      ``scripts/convert_gpt2.py``, or a MODEL_DIR of ``sld_jax.train`` (its
      latest checkpoint's params, read by ``checkpointing.Checkpointer``).
    config: the model being trained; must match the checkpoint's shape.
    layout: the run's vocabulary layout (``text_size`` must be the GPT-2
      map's: use ``Gpt2SpeechTextVocabulary`` for the data).
    shardings: optional pytree of shardings like the params (e.g. the
      trainer's ``state_shardings.params``): returns global arrays placed so.
    init_seed, new_row_init: for the new rows of a HF import; gin-configurable
      (``hf_gpt2.init_params_from.new_row_init = "normal"``: N(0, 0.02^2) as
      the release's ``resize_token_embeddings`` did; "mean" by default).

  Returns:
    Unboxed params in ``config.param_dtype``: numpy arrays, or jax arrays
    with ``shardings``.
  """
  if os.path.exists(os.path.join(path, "config.json")):
    _, params, _, _ = load_hf_gpt2(path, layout=layout, expected_config=config,
                                   init_seed=init_seed, new_row_init=new_row_init)
    return params if shardings is None else place_params(params, shardings)
  if os.path.isdir(os.path.join(path, checkpointing.CHECKPOINT_SUBDIR)):
    target = _abstract_params(config, shardings)
    with contextlib.closing(checkpointing.model_dir_checkpoints(path)) as reader:
      return reader.restore_params(target, model_info=f"{config}, vocabulary {layout}")
  if _params_dir(path) is None:
    raise FileNotFoundError(
        f"init path {path} is neither a HF GPT-2 directory (config.json) nor an orbax "
        f"params checkpoint ({os.path.join(path, PARAMS_SUBDIR)})")
  return restore_params(path, config, layout, shardings)
