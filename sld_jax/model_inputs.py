"""The model's inputs, built one way for training, teacher-forced scoring and decoding.

Training batches come from ``seqio.DecoderFeatureConverter``, which shifts
the targets right (``seqio.utils.make_autoregressive_inputs``): every
sequence's inputs start with id 0, and a packed row restarts each segment at
0. ``decoder_input_tokens`` below is that function on host arrays; the
eval batches of synthetic sources, the teacher-forced check of eval batches
and the decoding prompts all go through it, and tests/test_model_inputs.py
checks it against the converter on real packed and unpacked batches.

One utterance (``VocabLayout(text_size=14)``: <speech_end>=14, unit u ->
15 + u, <text_end>=1), units [3, 0], text ids [5, 7]::

  position               0   1   2   3   4   5
  decoder_target_tokens 18  15  14   5   7   1     units <speech_end> text <text_end>
  decoder_input_tokens   0  18  15  14   5   7     (the targets shifted right)
                         `--- prompt ---'
  speech_length = 3     (units + <speech_end>: the target prefix before the text)
  prompt_length = 4     (speech_length + 1: the leading 0 too)
  prompt        = [0, 18, 15, 14]   = decoder_input_tokens[:prompt_length]

The first text token (5) is the target of the position whose input is
<speech_end> (position ``prompt_length - 1 = speech_length``), so decoding
prefills ``prompt`` and reads its next-token logits there: exactly the
logits teacher forcing computes at that position in training.
``prompt_from_units`` builds the same prompt from raw unit ids, with no
reference text.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sld_jax.vocab import PAD_ID, VocabLayout

BOS_ID = PAD_ID  # seqio's make_autoregressive_inputs starts every sequence with 0

# The features of a model batch (all ``[batch, length]`` int32), as
# ``seqio.DecoderFeatureConverter`` names them; a batch needs the first
# REQUIRED_FEATURES, packed rows add segment ids and positions.
REQUIRED_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
FEATURES = REQUIRED_FEATURES + ("decoder_segment_ids", "decoder_positions")


def decoder_input_tokens(targets, segment_ids=None) -> np.ndarray:
  """The targets shifted right by one, 0 first (per packed segment).

  ``targets`` is ``[L]`` or ``[B, L]``; ``segment_ids`` (same shape, packed
  rows, 0 = padding) restarts each segment at 0, as seqio does::

    targets     [3, 8, 1, 9, 1, 5, 4, 1, 0, 0]
    segment_ids [1, 1, 1, 2, 2, 3, 3, 3, 0, 0]
    inputs      [0, 3, 8, 0, 9, 0, 5, 4, 0, 0]
  """
  targets = np.asarray(targets)
  if targets.ndim not in (1, 2):
    raise ValueError(f"decoder_input_tokens: targets must be [L] or [B, L], got {targets.shape}")
  inputs = np.zeros_like(targets)
  inputs[..., 1:] = targets[..., :-1]
  inputs[..., 0] = BOS_ID
  if segment_ids is not None:
    segment_ids = np.asarray(segment_ids)
    if segment_ids.shape != targets.shape:
      raise ValueError(f"decoder_input_tokens: segment_ids has shape {segment_ids.shape}, "
                       f"targets {targets.shape}")
    first = np.ones(targets.shape, bool)
    first[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    inputs = np.where(first, BOS_ID, inputs)
  return inputs.astype(targets.dtype)


def speech_targets(units, layout: VocabLayout) -> np.ndarray:
  """Unit indices in ``[0, K)`` -> the target prefix ``unit ids.. <speech_end>``."""
  return np.concatenate([layout.units_to_ids(units), [layout.speech_end_id]]).astype(np.int32)


def prompt_length(speech_length):
  """Prompt tokens of an utterance with ``speech_length`` = units + <speech_end>."""
  return np.asarray(speech_length) + 1


def prompt_tokens(speech_prefix) -> np.ndarray:
  """``[u1 .. uN, <speech_end>]`` targets -> the prompt ``[0, u1 .. uN, <speech_end>]``.

  The first ``len(speech_prefix) + 1`` inputs that training feeds for any
  sequence whose targets start with ``speech_prefix``.
  """
  speech_prefix = np.asarray(speech_prefix, np.int32)
  if speech_prefix.ndim != 1:
    raise ValueError(f"prompt_tokens: expected a 1-D target prefix, got {speech_prefix.shape}")
  return decoder_input_tokens(np.append(speech_prefix, PAD_ID))


def prompt_from_units(units, layout: VocabLayout) -> np.ndarray:
  """Raw unit indices (no reference text) -> the decoding prompt.

  ``prompt_from_units([3, 0], VocabLayout(text_size=14, speech_size=8))``
  is ``[0, 18, 15, 14]`` (length ``prompt_length(len(units) + 1)``).
  """
  return prompt_tokens(speech_targets(units, layout))


def speech_lengths(targets, layout: VocabLayout) -> np.ndarray:
  """``[B]``: units + <speech_end> of each row (first <speech_end> + 1; 0 if none)."""
  targets = np.asarray(targets)
  is_end = targets == layout.speech_end_id
  return np.where(is_end.any(axis=-1), np.argmax(is_end, axis=-1) + 1, 0).astype(np.int32)


def batch_prompts(targets, width: int, layout: VocabLayout,
                  inputs: Optional[np.ndarray] = None,
                  where: str = "batch") -> tuple[np.ndarray, np.ndarray]:
  """Prompts ``[B, width]`` and their lengths ``[B]`` of unpacked target rows.

  Row b's prompt is ``decoder_input_tokens(targets)[b, :prompt_length]``,
  right-padded with 0; a row without <speech_end> (a dummy padding row)
  gets the prompt of an empty utterance, ``[0, <speech_end>]``. When the
  batch's own ``inputs`` are given they must equal the shifted targets
  (they are what teacher forcing feeds), else ValueError.
  """
  targets = np.asarray(targets)
  shifted = decoder_input_tokens(targets)
  if inputs is not None and not np.array_equal(np.asarray(inputs), shifted):
    row = int(np.flatnonzero((np.asarray(inputs) != shifted).any(axis=1))[0])
    raise ValueError(
        f"{where}: row {row}'s decoder_input_tokens are not its targets shifted right with 0 "
        f"first (seqio's DecoderFeatureConverter): got {np.asarray(inputs)[row][:12].tolist()}"
        f"..., expected {shifted[row][:12].tolist()}...")
  speech = speech_lengths(targets, layout)
  lengths = prompt_length(np.where(speech > 0, speech, 1)).astype(np.int32)
  if lengths.size and lengths.max() > width:
    raise ValueError(f"{where}: a {int(lengths.max())}-token prompt does not fit width {width}")
  shifted = np.pad(shifted, ((0, 0), (0, max(0, width - shifted.shape[1]))))[:, :width]
  prompts = np.where(np.arange(width)[None, :] < lengths[:, None], shifted, PAD_ID)
  prompts[speech == 0, 0] = BOS_ID
  prompts[speech == 0, 1] = layout.speech_end_id
  return prompts.astype(np.int32), lengths
