"""A seqio vocabulary over the shared text + speech id space.

``SpeechTextVocabulary`` wraps the text SentencePiece model (pad 0, eos 1,
unk 2, no bos) and places it in ``sld_jax.vocab.VocabLayout``: text ids keep
their SentencePiece ids, ``<speech_end>`` and the K speech units follow::

  layout = VocabLayout(text_size=14, speech_size=128)   # size 256
  vocab.encode("one two")            -> [5, 7]            (text ids only)
  vocab.decode([150, 143, 14, 5, 7, 1, 0, 0])
                                     -> "one two"
  (143 and 150 are units, 14 is <speech_end>, 1 is <text_end>; decoding stops
  at the first <text_end> and drops everything that is not a text id)

``vocab_size`` is ``layout.size`` (rounded up to a multiple of 128), so seqio
and the model agree on the embedding size.

The model file and K can be given directly, or as a ``resolver`` called on
first use: tasks are registered at import time, before the prepared data
(and so the text model and K) exist.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Optional, Sequence

import seqio
import sentencepiece as spm
import tensorflow as tf
import tensorflow_text as tf_text

from sld_jax import vocab as vocab_lib

Resolver = Callable[[], tuple[str, int]]


def check_text_model(model_file: str) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece model and checks pad 0 / eos 1 / unk 2 / no bos."""
  try:
    processor = spm.SentencePieceProcessor(model_file=model_file)
  except (OSError, RuntimeError) as e:
    raise ValueError(f"cannot load SentencePiece model {model_file}: {e}") from e
  expected = {"pad_id": vocab_lib.PAD_ID, "eos_id": vocab_lib.EOS_ID,
              "unk_id": vocab_lib.UNK_ID, "bos_id": -1}
  actual = {name: getattr(processor, name)() for name in expected}
  if actual != expected:
    raise ValueError(
        f"SentencePiece model {model_file} has special ids {actual}; the "
        f"shared vocabulary needs {expected} (train it with "
        "sld_jax.speech.text_normalize.train_text_model)")
  return processor


class SharedLayoutVocabulary(seqio.Vocabulary):
  """A text vocabulary placed in a ``VocabLayout``, resolved on first use.

  Subclasses give ``_SOURCE`` (the name of what the text vocabulary is read
  from, for messages) and ``_resolve(source, speech_size)``, which returns a
  dict with at least ``"layout"``; ``_state()`` holds that dict plus
  ``"source"``. Pickling keeps the resolved source and K, not the resolver
  closure (tf.data and multiprocessing workers rebuild from them).
  """

  _SOURCE = "source"

  def __init__(self, source: Optional[str] = None, speech_size: Optional[int] = None, *,
               resolver: Optional[Resolver] = None, name: str = ""):
    super().__init__(extra_ids=0)
    if resolver is None:
      if source is None or speech_size is None:
        raise ValueError(f"{type(self).__name__} needs {self._SOURCE} and speech_size, "
                         "or a resolver")
      given = (source, int(speech_size))
      resolver = lambda: given
    elif source is not None or speech_size is not None:
      raise ValueError(f"give either a resolver or {self._SOURCE} + speech_size, not both")
    self._resolver = resolver
    self._name = name
    self._lock = threading.Lock()
    self._resolved = None

  def _resolve(self, source: str, speech_size: int) -> dict:
    raise NotImplementedError

  def _state(self) -> dict:
    with self._lock:
      if self._resolved is None:
        source, speech_size = self._resolver()
        self._resolved = {"source": source, **self._resolve(source, int(speech_size))}
      return self._resolved

  def __getstate__(self):
    return {"source": self._state()["source"], "speech_size": self.speech_size,
            "name": self._name}

  def __setstate__(self, state):
    self.__init__(state["source"], state["speech_size"], name=state["name"])

  @property
  def layout(self) -> vocab_lib.VocabLayout:
    return self._state()["layout"]

  @property
  def text_size(self) -> int:
    return self.layout.text_size

  @property
  def speech_size(self) -> int:
    return self.layout.speech_size

  @property
  def speech_end_id(self) -> int:
    return self.layout.speech_end_id

  @property
  def speech_offset(self) -> int:
    return self.layout.speech_offset

  @property
  def bos_id(self) -> Optional[int]:
    return None

  @property
  def eos_id(self) -> int:
    return vocab_lib.EOS_ID

  @property
  def unk_id(self) -> int:
    return vocab_lib.UNK_ID

  @property
  def _base_vocab_size(self) -> int:
    return self.layout.size

  def encode_units(self, units: Sequence[int]) -> list[int]:
    """Speech units in [0, K) -> their vocabulary ids (python)."""
    return self.layout.units_to_ids(units).tolist()

  def __hash__(self):
    return hash(type(self).__name__)

  def __str__(self) -> str:
    if self._resolved is None:
      return f"{type(self).__name__}({self._name or 'unresolved'})"
    layout = self.layout
    return (f"{type(self).__name__}(name={self._name!r}, text_size={layout.text_size}, "
            f"speech_size={layout.speech_size}, size={layout.size}, "
            f"{self._SOURCE}={self._state()['source']})")


class SpeechTextVocabulary(SharedLayoutVocabulary):
  """Text SentencePiece ids inside the shared text + speech vocabulary.

  ``SpeechTextVocabulary(sentencepiece_model_file, speech_size)``, or
  ``SpeechTextVocabulary(resolver=f)`` with ``f() -> (model_file, K)`` called
  once on first use; ``name`` is shown in ``str(vocab)``.
  """

  _SOURCE = "sentencepiece_model_file"

  def _resolve(self, source: str, speech_size: int) -> dict:
    processor = check_text_model(source)
    with tf.io.gfile.GFile(source, "rb") as f:
      model_bytes = f.read()
    return {"processor": processor, "model_bytes": model_bytes,
            "layout": vocab_lib.VocabLayout(text_size=processor.GetPieceSize(),
                                            speech_size=speech_size)}

  @property
  def sentencepiece_model_file(self) -> str:
    return self._state()["source"]

  @property
  def tokenizer(self) -> spm.SentencePieceProcessor:
    return self._state()["processor"]

  @property
  def tf_tokenizer(self) -> tf_text.SentencepieceTokenizer:
    return tf_text.SentencepieceTokenizer(model=self._state()["model_bytes"])

  def _encode(self, s: str) -> Sequence[int]:
    return self.tokenizer.EncodeAsIds(s)

  def _text_ids(self, ids: Iterable[int]) -> list[int]:
    """Real text ids (UNK and up, below the text size): no PAD/EOS/speech."""
    text_size = self.text_size
    return [int(i) for i in ids if vocab_lib.UNK_ID <= int(i) < text_size]

  def _decode(self, ids: Iterable[int]) -> str:
    return self.tokenizer.DecodeIds(self._text_ids(ids))

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    return tf.cast(self.tf_tokenizer.tokenize(s), tf.int32)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.convert_to_tensor(ids)
    keep = tf.logical_and(ids >= vocab_lib.UNK_ID, ids < self.text_size)
    if ids.shape.rank == 1:
      return self.tf_tokenizer.detokenize(tf.boolean_mask(ids, keep))
    text_ids = tf.ragged.boolean_mask(ids, keep)
    return self.tf_tokenizer.detokenize(text_ids)

  def __eq__(self, other) -> bool:
    if not isinstance(other, SpeechTextVocabulary):
      return False
    mine, theirs = self._state(), other._state()
    return mine["model_bytes"] == theirs["model_bytes"] and mine["layout"] == theirs["layout"]
