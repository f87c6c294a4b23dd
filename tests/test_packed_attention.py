"""cuDNN's packed layout describes the same attention as the dense packed mask.

The cuDNN kernel needs a Hopper GPU (``benchmarks/accelerator_step.py
--check_attention`` compares it there); what runs on CPU is the part that
can be wrong without one: segment ids -> (offsets, lengths), checked against
a naive loop, and the mask those offsets describe, checked against
``masks.decoder_attention_mask`` at every real query.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax.model import masks
from sld_jax.model import packed_attention
from sld_jax.model.config import DecoderConfig


def _packed_rows(rng, batch, length, max_len=9):
  """seqio-style packed segment ids: 1, 2, ... then trailing 0 padding."""
  rows = np.zeros((batch, length), np.int32)
  for row in range(batch):
    start, segment = 0, 1
    fill = rng.integers(length // 2, length + 1)
    while start < fill:
      size = min(int(rng.integers(1, max_len)), fill - start)
      rows[row, start:start + size] = segment
      start, segment = start + size, segment + 1
  return rows


def _naive_layout(row, max_segments):
  offsets, lengths = [], []
  for position, value in enumerate(row):
    if position == 0 or value != row[position - 1]:
      offsets.append(position)
      lengths.append(0)
    lengths[-1] += 1
  count = len(offsets)
  offsets = (offsets + [-1] * (max_segments + 1))[:max_segments + 1]
  lengths = (lengths + [-1] * max_segments)[:max_segments]
  return offsets, lengths, count


def test_segment_layout_equals_a_naive_walk():
  rng = np.random.default_rng(0)
  segments = _packed_rows(rng, 6, 40)
  segments[0] = 1                                   # one segment, no padding
  max_segments = 12
  offsets, lengths, count = packed_attention.segment_layout(jnp.asarray(segments), max_segments)
  for row in range(len(segments)):
    want_offsets, want_lengths, want_count = _naive_layout(list(segments[row]), max_segments)
    assert int(count[row]) == want_count
    if want_count <= max_segments:
      np.testing.assert_array_equal(offsets[row], want_offsets)
      np.testing.assert_array_equal(lengths[row], want_lengths)
  assert int(count[0]) == 1 and list(np.asarray(lengths[0][:2])) == [40, -1]


def test_segment_layout_of_the_docstring_example():
  offsets, lengths, count = packed_attention.segment_layout(
      jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1] * 7]), 4)
  np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])
  np.testing.assert_array_equal(lengths, [[3, 2, 2, -1], [7, -1, -1, -1]])
  np.testing.assert_array_equal(count, [3, 1])


def test_layout_mask_equals_the_dense_packed_mask_at_real_queries():
  rng = np.random.default_rng(1)
  length = 48
  segments = _packed_rows(rng, 5, length)
  offsets, lengths, count = packed_attention.segment_layout(jnp.asarray(segments), 32)
  assert int(count.max()) <= 32
  described = np.asarray(packed_attention.layout_mask(offsets, lengths, length))
  dense = np.asarray(masks.decoder_attention_mask(length, jnp.asarray(segments)))
  real = segments > 0
  assert real.sum() > 0 and (~real).sum() > 0
  for row in range(len(segments)):
    np.testing.assert_array_equal(described[row, 0][real[row]], dense[row, 0][real[row]])
  # Padding attends to padding only (causally), so its outputs are defined.
  pad_rows = ~real
  for row in range(len(segments)):
    queries = np.flatnonzero(pad_rows[row])
    if len(queries):
      assert not described[row, 0][np.ix_(queries, np.flatnonzero(real[row]))].any()
      assert described[row, 0, queries, queries].all()


def test_rows_with_more_segments_than_the_bound_are_counted():
  segments = jnp.asarray([np.arange(1, 11, dtype=np.int32)])       # 10 one-token segments
  _, _, count = packed_attention.segment_layout(segments, 4)
  assert int(count[0]) == 10                  # > 4: packed_attention takes the dense path


def test_config_names_the_packed_implementation_and_its_bound():
  config = DecoderConfig(vocab_size=64, dropout_rate=0.0, attention_implementation="cudnn_packed")
  assert config.max_segments_per_row == 16
  with pytest.raises(ValueError, match="max_segments_per_row must be >= 1"):
    DecoderConfig(vocab_size=64, max_segments_per_row=0)
