"""The shared text + speech id space used by data, model, losses and decoding.

Layout for ``VocabLayout(text_size=G, speech_size=K)``::

  [0, G)                 text vocabulary: 0 = PAD, 1 = EOS = <text_end>, 2 = UNK
                         (a SentencePiece model trained with pad_id=0, eos_id=1,
                         unk_id=2, bos_id=-1 maps onto this directly)
  G                      <speech_end>
  [G + 1, G + 1 + K)     speech unit (or unit piece) u  ->  id G + 1 + u
  G + 1 + K = real_size  <time_mask>: the input corruption symbol of time
                         masking (``sld_jax.lm.time_mask``); input-only
  (real_size, size)      rounding ids: ``size`` is a multiple of 128 so the
                         embedding/logit matrices shard evenly

Ids from ``real_size`` on (``<time_mask>`` and the rounding ids) are never
targets and never enter a softmax (losses and decoding slice the logits to
``[0, real_size)``); they have embedding rows only.

Example, ``VocabLayout(text_size=5, speech_size=3)``::

  id:      0    1           2    3    4    5             6   7   8   9            10 ... 127
  meaning: PAD  <text_end>  UNK  t3   t4   <speech_end>  u0  u1  u2  <time_mask>  (rounding)
  is_text_target:   F T T T T F F F F F
  is_speech_target: F F F F F T T T T F
  is_unit:          F F F F F F T T T F

Why ``<time_mask>`` sits at ``real_size``: the released code masks inputs
with GPT-2's ``<|endoftext|>``, a symbol distinct from its ``<text_end>``;
here id 1 is both EOS/<text_end> and (in GPT-2 mode) ``<|endoftext|>``, so
masking with it would make the corruption symbol the stop symbol and share
its tied output vector. The first id past the real vocabulary keeps every
text, ``<speech_end>`` and unit id where it was (text models, prepared data
and the meaning of every predicted id are unchanged), stays out of every
softmax, and gets its own embedding row: a row checkpoints of this layout
already had (a rounding row) whenever ``real_size`` is not a multiple of 128;
when it is, ``size`` grows by 128.

This differs from the released SLD code (text [0,G), <text_end>=G,
<speech_end>=G+1) only by where <text_end> sits; seqio needs id 0 = PAD and
uses EOS = 1, so <text_end> is the text model's EOS here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
ROUND_TO = 128


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class VocabLayout:
  """Where text ids, <speech_end> and speech units live in one vocabulary.

  Attributes:
    text_size: number of text ids, including PAD (0), EOS/<text_end> (1), UNK.
    speech_size: number K of speech units (or unit pieces).
  """

  text_size: int
  speech_size: int

  def __post_init__(self):
    if self.text_size < 3:
      raise ValueError(
          f"VocabLayout.text_size must be >= 3 (PAD, EOS, UNK), got {self.text_size}")
    if self.speech_size < 1:
      raise ValueError(
          f"VocabLayout.speech_size must be >= 1, got {self.speech_size}")

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    """<text_end>: the end of the transcript and of the whole sequence."""
    return EOS_ID

  @property
  def text_end_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def speech_end_id(self) -> int:
    return self.text_size

  @property
  def speech_offset(self) -> int:
    """Id of speech unit 0."""
    return self.text_size + 1

  @property
  def real_size(self) -> int:
    """Ids that can be predicted: text, <speech_end>, units."""
    return self.text_size + 1 + self.speech_size

  @property
  def mask_id(self) -> int:
    """<time_mask>: replaces input tokens in time masking; never a target."""
    return self.real_size

  @property
  def size(self) -> int:
    """Embedding/logit rows: ``real_size + 1`` (<time_mask>) rounded up to 128."""
    return _round_up(self.real_size + 1, ROUND_TO)

  # Classification of (target) ids; work on numpy and jax arrays alike.
  def is_text(self, ids):
    """Text targets: real text ids including <text_end>; PAD excluded."""
    return (ids > PAD_ID) & (ids < self.text_size)

  def is_speech(self, ids):
    """Speech targets: <speech_end> and the units."""
    return (ids >= self.speech_end_id) & (ids < self.real_size)

  def is_unit(self, ids):
    return (ids >= self.speech_offset) & (ids < self.real_size)

  def units_to_ids(self, units):
    """Maps unit indices in [0, K) to vocabulary ids; raises on out-of-range."""
    units = np.asarray(units)
    if units.size and (units.min() < 0 or units.max() >= self.speech_size):
      bad = units[(units < 0) | (units >= self.speech_size)][0]
      raise ValueError(
          f"speech unit {int(bad)} is outside [0, {self.speech_size}) "
          f"(VocabLayout.speech_size={self.speech_size})")
    return units.astype(np.int32) + self.speech_offset

  def ids_to_units(self, ids):
    ids = np.asarray(ids)
    if ids.size and not np.all(self.is_unit(ids)):
      bad = ids[~self.is_unit(ids)][0]
      raise ValueError(
          f"id {int(bad)} is not a speech unit id "
          f"(units are [{self.speech_offset}, {self.real_size}))")
    return ids - self.speech_offset

  def check_ids(self, ids, name: str = "ids") -> None:
    """Host-side check that every id is a real vocabulary id, in ``[0, real_size)``.

    ``VocabLayout(5, 3).check_ids([[0, 1, 9]], "targets")`` raises
    ``targets: id 9 at position (0, 2) is outside the vocabulary [0, 9) ...``
    (9 is <time_mask>, an input-only id).

    Raises:
      ValueError: the ids are not integers, or naming the first id that is
        negative or ``>= real_size`` (rounding ids included) and its position.
    """
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"{name}: vocabulary ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= self.real_size)
    if np.any(bad):
      position = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f"{name}: id {int(ids[position])} at position {position} is outside the vocabulary "
          f"[0, {self.real_size}) (text_size={self.text_size}, speech_size={self.speech_size}; "
          f"ids in [{self.real_size}, {self.size}) are <time_mask> and rounding ids)")
