"""GPT-2 byte-level BPE as the text vocabulary of the shared id space.

A pretrained GPT-2 has no PAD and no UNK, and its end-of-text token
``<|endoftext|>`` sits at the end of its vocabulary, while the shared layout
(``sld_jax.vocab.VocabLayout``) needs ``0 = PAD``, ``1 = EOS = <text_end>``,
``2 = UNK``. ``TextIdMap`` moves the GPT-2 ids into that layout, keeping
their order::

  our id = gpt2 id + 3    for gpt2 ids below <|endoftext|>
         = gpt2 id + 2    for gpt2 ids above it (none in the released GPT-2)
  <|endoftext|>  ->  1    (EOS = <text_end>)
  0 (PAD), 2 (UNK)        new ids with no GPT-2 counterpart
  text_size = gpt2_vocab_size - 1 + 3

Worked example, the released GPT-2 (50257 ids, ``<|endoftext|>`` = 50256)
with K = 6000 speech units::

  text          "Hello"    " world"   <|endoftext|>
  gpt2 ids      15496      995        50256
  our ids       15499      998        1

  layout = VocabLayout(text_size=50259, speech_size=6000)
  <speech_end> = 50259, units 50260 .. 56259, real_size 56260, size 56320

Small example, ``TextIdMap(gpt2_vocab_size=5, gpt2_eos_id=4)``::

  gpt2 id:  0  1  2  3  4              ours_of_gpt2 = [3, 4, 5, 6, 1]
  our id:   0    1    2    3  4  5  6  gpt2_of_ours = [-1, 4, -1, 0, 1, 2, 3]
  meaning:  PAD  EOS  UNK  g0 g1 g2 g3                 (-1: no GPT-2 id)

``Gpt2SpeechTextVocabulary`` is the seqio vocabulary over that layout, the
GPT-2 counterpart of ``sld_jax.seqio_vocab.SpeechTextVocabulary``:
``encode`` gives our ids, ``decode`` stops at the first EOS and drops PAD,
UNK, ``<speech_end>``, the units and rounding ids (GPT-2 has no UNK piece to
print). The tokenizer is read with Hugging Face ``tokenizers`` from
``tokenizer.json``, or from ``vocab.json`` + ``merges.txt`` (the original
GPT-2 files), never downloaded.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tokenizers

from sld_jax import hf_gpt2_files as hf_files
from sld_jax import seqio_vocab
from sld_jax import vocab as vocab_lib

EOS_TOKEN = "<|endoftext|>"
# The ids GPT-2 text ids are shifted past: PAD, EOS, UNK.
NUM_SPECIALS = 3
# tokenizer_config.json classes that are GPT-2 byte-level BPE.
KNOWN_TOKENIZER_CLASSES = ("GPT2Tokenizer", "GPT2TokenizerFast")


@dataclasses.dataclass(frozen=True)
class TextIdMap:
  """GPT-2 ids <-> shared-layout text ids (see the module docstring).

  Attributes:
    gpt2_vocab_size: rows of the GPT-2 embedding (``config.json`` vocab_size).
    gpt2_eos_id: the id of ``<|endoftext|>``.
  """

  gpt2_vocab_size: int
  gpt2_eos_id: int

  def __post_init__(self):
    if self.gpt2_vocab_size < 1:
      raise ValueError(f"TextIdMap.gpt2_vocab_size must be >= 1, got {self.gpt2_vocab_size}")
    if not 0 <= self.gpt2_eos_id < self.gpt2_vocab_size:
      raise ValueError(
          f"TextIdMap.gpt2_eos_id={self.gpt2_eos_id} is outside the GPT-2 vocabulary "
          f"[0, {self.gpt2_vocab_size})")

  @property
  def text_size(self) -> int:
    return self.gpt2_vocab_size - 1 + NUM_SPECIALS

  @property
  def ours_of_gpt2(self) -> np.ndarray:
    """``[gpt2_vocab_size]`` int32: our id of each GPT-2 id."""
    gpt2 = np.arange(self.gpt2_vocab_size, dtype=np.int32)
    ours = np.where(gpt2 < self.gpt2_eos_id, gpt2 + NUM_SPECIALS, gpt2 + NUM_SPECIALS - 1)
    ours[self.gpt2_eos_id] = vocab_lib.EOS_ID
    return ours.astype(np.int32)

  @property
  def gpt2_of_ours(self) -> np.ndarray:
    """``[text_size]`` int32: the GPT-2 id of each of our text ids, -1 for PAD/UNK."""
    inverse = np.full(self.text_size, -1, np.int32)
    inverse[self.ours_of_gpt2] = np.arange(self.gpt2_vocab_size, dtype=np.int32)
    return inverse

  def to_ours(self, gpt2_ids) -> np.ndarray:
    gpt2_ids = np.asarray(gpt2_ids, np.int64)
    if gpt2_ids.size and (gpt2_ids.min() < 0 or gpt2_ids.max() >= self.gpt2_vocab_size):
      bad = gpt2_ids[(gpt2_ids < 0) | (gpt2_ids >= self.gpt2_vocab_size)][0]
      raise ValueError(f"GPT-2 id {int(bad)} is outside [0, {self.gpt2_vocab_size})")
    return self.ours_of_gpt2[gpt2_ids]

  def to_gpt2(self, our_ids) -> np.ndarray:
    """Our text ids -> GPT-2 ids; raises for PAD, UNK and non-text ids."""
    our_ids = np.asarray(our_ids, np.int64)
    inverse = self.gpt2_of_ours
    valid = (our_ids >= 0) & (our_ids < self.text_size)
    valid[valid] = inverse[our_ids[valid]] >= 0
    if not np.all(valid):
      bad = int(our_ids[~valid][0])
      raise ValueError(
          f"id {bad} has no GPT-2 counterpart (PAD=0 and UNK=2 are new, text ids "
          f"are [0, {self.text_size}))")
    return inverse[our_ids]

  def to_json(self) -> dict:
    return {"gpt2_vocab_size": self.gpt2_vocab_size, "gpt2_eos_id": self.gpt2_eos_id}

  @classmethod
  def from_json(cls, data: dict, where: str = "text_id_map") -> "TextIdMap":
    try:
      return cls(int(data["gpt2_vocab_size"]), int(data["gpt2_eos_id"]))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{where}: not a text id map {data!r}: {e}") from e


def _byte_level_bpe(vocab_file: str, merges_file: str) -> tokenizers.Tokenizer:
  """The original GPT-2 files as a tokenizer (what GPT2TokenizerFast builds)."""
  try:
    model = tokenizers.models.BPE.from_file(vocab_file, merges_file)
  except Exception as e:  # tokenizers raises a bare Exception on bad files.
    raise ValueError(f"cannot read GPT-2 BPE from {vocab_file} + {merges_file}: {e}") from e
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  if tokenizer.token_to_id(EOS_TOKEN) is not None:
    tokenizer.add_special_tokens([EOS_TOKEN])
  return tokenizer


def _is_byte_level_bpe(spec: dict) -> bool:
  if (spec.get("model") or {}).get("type") != "BPE":
    return False
  pre = spec.get("pre_tokenizer") or {}
  parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
  return any((part or {}).get("type") == "ByteLevel" for part in parts)


def load_gpt2_tokenizer(tokenizer_dir: str) -> tokenizers.Tokenizer:
  """Reads a GPT-2 byte-level BPE tokenizer from a Hugging Face directory.

  Looks for ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``.

  Raises:
    FileNotFoundError: none of those files (naming what was looked for).
    ValueError: the files are not a GPT-2 byte-level BPE tokenizer (e.g. a
      SentencePiece model, or another ``tokenizer_class``), or it has no
      ``<|endoftext|>`` token.
  """
  if not os.path.isdir(tokenizer_dir):
    raise FileNotFoundError(f"GPT-2 tokenizer directory {tokenizer_dir} does not exist")
  config_file = os.path.join(tokenizer_dir, "tokenizer_config.json")
  if os.path.exists(config_file):
    tokenizer_class = hf_files.read_json(config_file).get("tokenizer_class")
    if tokenizer_class is not None and tokenizer_class not in KNOWN_TOKENIZER_CLASSES:
      raise ValueError(
          f"{config_file}: unknown tokenizer_class {tokenizer_class!r}; only GPT-2 "
          f"byte-level BPE {KNOWN_TOKENIZER_CLASSES} can be the text vocabulary here "
          "(use sld_jax.seqio_vocab.SpeechTextVocabulary for SentencePiece)")
  json_file = os.path.join(tokenizer_dir, "tokenizer.json")
  vocab_file = os.path.join(tokenizer_dir, "vocab.json")
  merges_file = os.path.join(tokenizer_dir, "merges.txt")
  if os.path.exists(json_file):
    spec = hf_files.read_json(json_file)
    if not _is_byte_level_bpe(spec):
      raise ValueError(
          f"{json_file}: unknown tokenizer (model {(spec.get('model') or {}).get('type')!r}, "
          f"pre_tokenizer {(spec.get('pre_tokenizer') or {}).get('type')!r}); expected "
          "GPT-2 byte-level BPE (model 'BPE', pre_tokenizer 'ByteLevel')")
    tokenizer = tokenizers.Tokenizer.from_file(json_file)
  elif os.path.exists(vocab_file) and os.path.exists(merges_file):
    tokenizer = _byte_level_bpe(vocab_file, merges_file)
  else:
    present = sorted(os.listdir(tokenizer_dir))
    raise FileNotFoundError(
        f"no GPT-2 tokenizer in {tokenizer_dir}: need tokenizer.json or vocab.json + "
        f"merges.txt; found {present}")
  if tokenizer.token_to_id(EOS_TOKEN) is None:
    raise ValueError(f"tokenizer in {tokenizer_dir} has no {EOS_TOKEN} token: not GPT-2")
  return tokenizer


def text_id_map_of_tokenizer(tokenizer: tokenizers.Tokenizer,
                             gpt2_vocab_size: Optional[int] = None) -> TextIdMap:
  """The id map of a tokenizer, over ``gpt2_vocab_size`` embedding rows.

  ``gpt2_vocab_size`` defaults to the tokenizer's size (added tokens
  included); a checkpoint may have more rows (padding), never fewer.
  """
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if gpt2_vocab_size is not None and gpt2_vocab_size < size:
    raise ValueError(
        f"GPT-2 tokenizer has {size} ids but the model only {gpt2_vocab_size} rows")
  return TextIdMap(gpt2_vocab_size or size, tokenizer.token_to_id(EOS_TOKEN))


def _tokenizer_and_map(tokenizer_dir: str) -> tuple[tokenizers.Tokenizer, TextIdMap]:
  tokenizer = load_gpt2_tokenizer(tokenizer_dir)
  config_file = os.path.join(tokenizer_dir, "config.json")
  rows = hf_files.read_json(config_file).get("vocab_size") if os.path.exists(config_file) else None
  return tokenizer, text_id_map_of_tokenizer(tokenizer, rows)


def text_id_map_of_dir(tokenizer_dir: str) -> TextIdMap:
  """The id map for a HF GPT-2 directory: ``config.json``'s vocab_size when present."""
  return _tokenizer_and_map(tokenizer_dir)[1]


class Gpt2SpeechTextVocabulary(seqio_vocab.SharedLayoutVocabulary):
  """GPT-2 BPE text ids (shifted by ``TextIdMap``) in the shared vocabulary.

  ::

    vocab = Gpt2SpeechTextVocabulary("gpt2_dir", speech_size=6000)
    vocab.encode("Hello world")      -> [15499, 998]
    vocab.decode([50300, 50259, 15499, 998, 1, 0])  -> "Hello world"
    vocab.vocab_size                 -> 56320 (layout.size)

  ``tokenizer_dir`` is a HF GPT-2 directory (``tokenizer.json`` or
  ``vocab.json`` + ``merges.txt``; its ``config.json`` vocab_size, when
  present, sets the number of GPT-2 rows so the ids match the checkpoint);
  or ``resolver=f`` with ``f() -> (tokenizer_dir, K)`` called on first use.
  """

  _SOURCE = "tokenizer_dir"

  def _resolve(self, source: str, speech_size: int) -> dict:
    tokenizer, id_map = _tokenizer_and_map(source)
    return {"tokenizer": tokenizer, "id_map": id_map,
            "layout": vocab_lib.VocabLayout(text_size=id_map.text_size, speech_size=speech_size)}

  @property
  def text_id_map(self) -> TextIdMap:
    return self._state()["id_map"]

  @property
  def tokenizer_dir(self) -> str:
    return self._state()["source"]

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return self._state()["tokenizer"]

  def _encode(self, s: str) -> Sequence[int]:
    gpt2_ids = self.tokenizer.encode(s, add_special_tokens=False).ids
    return self.text_id_map.to_ours(gpt2_ids).tolist()

  def _gpt2_ids(self, ids: Iterable[int]) -> list[int]:
    """GPT-2 ids of the ordinary text ids in ``ids``; everything else dropped."""
    ids = np.asarray(list(ids), np.int64).reshape(-1)
    keep = ids[(ids >= NUM_SPECIALS) & (ids < self.text_size)]
    return self.text_id_map.to_gpt2(keep).tolist()

  def _decode(self, ids: Iterable[int]) -> str:
    return self.tokenizer.decode(self._gpt2_ids(ids), skip_special_tokens=False)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Scalar string -> ``[n]`` int32; ``[B]`` strings -> ragged ``[B, None]``."""
    s = tf.convert_to_tensor(s, tf.string)

    def encode_batch(strings):
      strings = np.asarray(strings.numpy(), object).reshape(-1)
      rows = [self._encode(x.decode("utf-8")) for x in strings]
      flat = np.asarray([i for row in rows for i in row], np.int32)
      return flat, np.asarray([len(row) for row in rows], np.int64)

    flat, lengths = tf.py_function(encode_batch, [s], (tf.int32, tf.int64))
    flat.set_shape([None])
    if s.shape.rank == 0:
      return flat
    lengths.set_shape([None])
    return tf.RaggedTensor.from_row_lengths(flat, lengths)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """``[n]`` ids -> scalar string; ``[B, n]`` (dense or ragged) -> ``[B]`` strings."""
    if isinstance(ids, tf.RaggedTensor):
      ids = ids.to_tensor(default_value=vocab_lib.PAD_ID)
    ids = tf.convert_to_tensor(ids)
    rank = ids.shape.rank

    def decode_batch(batch):
      array = batch.numpy()
      rows = array.reshape(int(np.prod(array.shape[:-1])), array.shape[-1])
      return np.asarray([self._decode(row).encode("utf-8") for row in rows], object)

    texts = tf.py_function(decode_batch, [ids], tf.string)
    if rank == 1:
      return tf.reshape(texts, [])
    texts.set_shape(ids.shape[:-1])
    return texts

  def __eq__(self, other) -> bool:
    if not isinstance(other, Gpt2SpeechTextVocabulary):
      return False
    mine, theirs = self._state(), other._state()
    return (mine["tokenizer"].to_str() == theirs["tokenizer"].to_str()
            and mine["id_map"] == theirs["id_map"] and mine["layout"] == theirs["layout"])
