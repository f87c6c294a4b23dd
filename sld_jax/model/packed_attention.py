"""cuDNN flash attention over packed rows, segment by segment (Hopper GPUs).

``jax.nn.dot_product_attention(..., implementation="cudnn")`` takes packing
as a dense ``[B, 1, L, L]`` mask: cuDNN then computes every block of the
causal triangle and reads the mask for each. cuDNN also has a packed
("THD") layout in which each row is a list of variable-length sequences,
given by their start offsets and lengths; attention is causal inside each
sequence and no block that crosses two of them is computed. With rows of
~100-token utterances packed into 1,024 positions that is about a tenth of
the causal triangle's work. jax exposes that layout through its cuDNN
module (``q_offsets``/``q_seqlen``), not yet through ``jax.nn``.

Segment ids become offsets and lengths like this (``max_segments = 4``)::

  segment_ids  [[1 1 1 2 2 0 0],       trailing padding (id 0) is a
                [1 1 1 1 1 1 1]]       segment of its own
  offsets      [[0 3 5 -1 -1],         [B, max_segments + 1], -1 padded
                [0 -1 -1 -1 -1]]
  lengths      [[3 2 2 -1],            [B, max_segments], -1 padded
                [7 -1 -1 -1]]

Every position belongs to a segment, so every output is defined (padding
attends to padding, which no real position reads). The number of slots is
static. Two ways to choose it:

- In training, the host computes the offsets of each batch
  (``host_segment_starts``, slots rounded up to a power of two, or to a
  multiple of ``DecoderConfig.segment_slot_multiple``, at least
  ``MIN_SLOTS``; ``SpeechTextLM.host_features`` adds them to the batch as
  ``decoder_segment_starts [B, slots + 1]``). The slot count is then exact
  for the batch up to the rounding, and nothing is decided on the device;
  each new slot count compiles the step once more.
- Without that feature (evaluation, hand-made batches), the device computes
  them for ``max_segments`` slots, and a batch with a row of more segments
  takes the dense-mask cuDNN path instead (``jax.lax.cond``), so the result
  never depends on the bound, only the speed: cuDNN launches work for every
  declared slot, so a bound far above the real count costs time
  (``DecoderConfig.max_segments_per_row`` gives the figures), and the
  ``lax.cond`` itself cost 0.27 ms per layer's forward + backward on an H200
  (1.47 vs 1.20 ms at 32 slots).

On CPU the cuDNN path does not exist: ``segment_layout`` and
``layout_mask`` (the mask the offsets describe) are tested there against
``masks.decoder_attention_mask``. On an H200 (jax 0.11.2),
``benchmarks/accelerator_step.py --check_attention`` found the outputs and
the q/k/v gradients at real positions within 0.35-0.65% of the float32
reference (relative to its largest value), the same largest errors, to
every digit, as the dense-mask cuDNN path's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sld_jax.model import masks

Array = jnp.ndarray
MIN_SLOTS = 8


def slots_for(count: int, multiple: int = 0) -> int:
  """The declared slots for rows of at most ``count`` segments, at least
  ``MIN_SLOTS``: the next power of two (``multiple=0``: 3 -> 8, 9 -> 16,
  17 -> 32), else the next multiple of ``multiple`` (4: 9 -> 12, 17 -> 20)."""
  count = int(count)
  if multiple:
    return max(MIN_SLOTS, -(-count // multiple) * multiple)
  return max(MIN_SLOTS, 1 << max(count - 1, 0).bit_length())


def _host_starts(segment_ids: np.ndarray) -> np.ndarray:
  """bool ``[B, L]``: where a run of equal ids begins (position 0 always)."""
  starts = np.ones(segment_ids.shape, bool)
  starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
  return starts


def _most_segments(starts: np.ndarray) -> int:
  return int(starts.sum(axis=1).max(initial=1))


def host_segment_count(segment_ids: np.ndarray) -> int:
  """The most segments (padding included) of any row; ``[[1 1 2 0]] -> 3``."""
  return _most_segments(_host_starts(np.asarray(segment_ids)))


def host_segment_starts(segment_ids: np.ndarray, slots: int | None = None) -> np.ndarray:
  """``segment_layout``'s offsets computed on the host: int32 ``[B, slots + 1]``.

  ``slots`` default ``slots_for(host_segment_count(...))``; given, it must
  cover every row (processes of one job pass the largest of theirs).
  """
  segment_ids = np.asarray(segment_ids)
  starts = _host_starts(segment_ids)
  count = _most_segments(starts)
  slots = slots_for(count) if slots is None else slots
  if count > slots:
    raise ValueError(f"host_segment_starts: a row has {count} segments, more than the "
                     f"{slots} slots asked for")
  offsets = np.full((segment_ids.shape[0], slots + 1), -1, np.int32)
  for row, row_starts in enumerate(starts):
    found = np.flatnonzero(row_starts)
    offsets[row, :len(found)] = found
  return offsets


def lengths_from_starts(offsets: Array, length: int) -> Array:
  """``[B, M]`` segment lengths from offsets ``[B, M + 1]`` (-1 padded)."""
  ends = jnp.where(offsets[:, 1:] >= 0, offsets[:, 1:], length)
  return jnp.where(offsets[:, :-1] >= 0, ends - offsets[:, :-1], -1)


def segment_layout(segment_ids: Array, max_segments: int) -> tuple[Array, Array, Array]:
  """``(offsets [B, M+1], lengths [B, M], count [B])`` of each row's runs of equal ids.

  A new segment starts at position 0 and wherever the id changes (see the
  module docstring). ``count`` is the number of segments of each row; rows
  with ``count > max_segments`` are not described completely.
  """
  batch, length = segment_ids.shape
  starts = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  count = jnp.sum(starts, axis=1).astype(jnp.int32)
  offsets = jax.vmap(lambda row: jnp.nonzero(row, size=max_segments + 1, fill_value=-1)[0])(
      starts).astype(jnp.int32)
  return offsets, lengths_from_starts(offsets, length), count


def layout_mask(offsets: Array, lengths: Array, length: int) -> Array:
  """``[B, 1, L, L]``: causal attention inside each (offset, length) segment.

  What cuDNN's packed causal attention computes, written out; for tests.
  """
  position = jnp.arange(length)
  inside = ((position[None, None, :] >= offsets[:, :-1, None]) &
            (position[None, None, :] < offsets[:, :-1, None] + lengths[:, :, None]) &
            (lengths[:, :, None] > 0))                                 # [B, M, L]
  segment = jnp.argmax(inside, axis=1) + jnp.where(jnp.any(inside, axis=1), 0, -length)
  same = segment[:, :, None] == segment[:, None, :]
  return (same & masks.causal_mask(length)[0])[:, None]


def cudnn_packed_attention(query: Array, key: Array, value: Array, offsets: Array,
                           lengths: Array, scale: float) -> Array:
  """cuDNN's packed causal attention for ``segment_layout``'s offsets and lengths.

  No fallback: rows must have at most ``lengths.shape[1]`` segments.
  """
  # pylint: disable-next=g-import-not-at-top
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
  return cudnn_attention.dot_product_attention(
      query, key, value, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
      kv_offsets=offsets, scale=scale, mask_type=cudnn_attention.MaskType.PADDING_CAUSAL,
      qkv_layout="BTNH")


def packed_attention(query: Array, key: Array, value: Array, segment_ids: Array, scale: float,
                     max_segments: int, segment_starts: Array | None = None) -> Array:
  """Causal attention within segments, ``[B, L, H, D]`` in and out (GPU, cuDNN).

  ``segment_starts``: the host's offsets (``host_segment_starts``), which
  cover every row: no fallback. None: computed here for ``max_segments``
  slots, with the dense-mask fallback.
  """
  if segment_starts is not None:
    offsets = segment_starts.astype(jnp.int32)
    return cudnn_packed_attention(query, key, value, offsets,
                                  lengths_from_starts(offsets, query.shape[1]), scale)
  offsets, lengths, count = segment_layout(segment_ids, max_segments)

  def packed(query, key, value):
    return cudnn_packed_attention(query, key, value, offsets, lengths, scale)

  def dense(query, key, value):
    mask = masks.decoder_attention_mask(query.shape[1], segment_ids)
    return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale,
                                        implementation="cudnn")

  return jax.lax.cond(jnp.all(count <= max_segments), packed, dense, query, key, value)
