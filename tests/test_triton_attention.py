"""The segment-skipping Pallas Triton attention (interpreted on CPU).

- ``segment_bounds``: each token's segment run, against a plain loop.
- ``key_block_range`` / ``query_block_range``: every block pair holding a
  visible (query, key) pair is visited, and the first and last visited
  blocks hold one (the ranges are exact at both ends), against brute force
  over the ``[L, L]`` mask.
- ``triton_attention`` with small blocks (many of them in a 256-token row,
  segments across block edges, padding, an unpacked row) == attention
  written out over the ``[L, L]`` mask: values and gradients, float32 and
  bfloat16, forward and backward blocks equal or not.
- ``visited_block_fraction`` on a hand-counted row.
- The decoder passes ``DecoderConfig.triton_block`` / ``triton_backward_block``
  to the kernel; the config refuses blocks that are not powers of two >= 16.
(Within the decoder against the reference at its defaults, under a mesh, and
the errors: ``test_fused_paths.py``.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax.model import decoder
from sld_jax.model import triton_attention
from sld_jax.model.config import DecoderConfig

jax.config.update("jax_default_matmul_precision", "highest")


def _packed_rows(rng, rows, length, sizes=(5, 60)):
  """Contiguous segments of random sizes, the last run padding (id 0)."""
  segments = np.zeros((rows, length), np.int32)
  for row in range(rows):
    start, segment = 0, 1
    while True:
      size = int(rng.integers(*sizes))
      if start + size > length - 3:
        break
      segments[row, start:start + size] = segment
      start, segment = start + size, segment + 1
  return segments


def _visible(segments):
  """``[B, L, L]``: query ``q`` sees key ``k``."""
  length = segments.shape[1]
  causal = np.tril(np.ones((length, length), bool))
  return (segments[:, :, None] == segments[:, None, :]) & causal


def test_segment_bounds_are_each_tokens_run():
  segments = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
  first, last = triton_attention.segment_bounds(jnp.asarray(segments))
  np.testing.assert_array_equal(first, [[0, 0, 0, 3, 3, 5, 5], [0] * 7])
  np.testing.assert_array_equal(last, [[2, 2, 2, 4, 4, 6, 6], [6] * 7])

  segments = _packed_rows(np.random.default_rng(0), 4, 200)
  first, last = map(np.asarray, triton_attention.segment_bounds(jnp.asarray(segments)))
  for row, ids in enumerate(segments):
    for position in range(len(ids)):
      start = position
      while start > 0 and ids[start - 1] == ids[position]:
        start -= 1
      end = position
      while end < len(ids) - 1 and ids[end + 1] == ids[position]:
        end += 1
      assert (first[row, position], last[row, position]) == (start, end)


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 16), (16, 32)])
def test_block_ranges_visit_exactly_the_blocks_with_visible_pairs(block_q, block_k):
  segments = _packed_rows(np.random.default_rng(1), 6, 256, sizes=(3, 90))
  segments[5] = 1                                            # one unpacked row
  visible = _visible(segments)
  first, last = triton_attention.segment_bounds(jnp.asarray(segments))
  blocks_q, blocks_k = 256 // block_q, 256 // block_k
  pairs = visible.reshape(6, blocks_q, block_q, blocks_k, block_k).any(axis=(2, 4))

  lo, hi = (np.broadcast_to(x, (6, blocks_q)) for x in triton_attention.key_block_range(
      jnp.arange(blocks_q), first[:, ::block_q], block_q, block_k))
  for row in range(6):
    for query_block in range(blocks_q):
      seen = np.flatnonzero(pairs[row, query_block])
      assert (lo[row, query_block], hi[row, query_block]) == (seen.min(), seen.max() + 1)

  lo, hi = (np.broadcast_to(x, (6, blocks_k)) for x in triton_attention.query_block_range(
      jnp.arange(blocks_k), last[:, block_k - 1::block_k], block_q, block_k))
  for row in range(6):
    for key_block in range(blocks_k):
      seen = np.flatnonzero(pairs[row, :, key_block])
      assert (lo[row, key_block], hi[row, key_block]) == (seen.min(), seen.max() + 1)


def _written_out_attention(query, key, value, segments, scale):
  scores = jnp.einsum("bqhd,bkhd->bhqk", query.astype(jnp.float32),
                      key.astype(jnp.float32)) * scale
  scores = jnp.where(_visible(segments)[:, None], scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, value.astype(jnp.float32))


@pytest.mark.parametrize("dtype,tolerance,block,backward_block",
                         [("float32", 2e-5, 32, 32), ("bfloat16", 2e-2, 64, 32)])
def test_triton_attention_equals_written_out_attention(dtype, tolerance, block,
                                                       backward_block):
  rng = np.random.default_rng(2)
  segments = _packed_rows(rng, 3, 256, sizes=(5, 80))
  segments[2] = 1
  shape = (3, 256, 2, 8)
  query, key, value, weights = (jnp.asarray(rng.standard_normal(shape), dtype)
                                for _ in range(4))
  kernel = functools.partial(triton_attention.triton_attention, segment_ids=segments,
                             scale=0.35, block=block, backward_block=backward_block)
  reference = functools.partial(_written_out_attention, segments=segments, scale=0.35)

  def weighted_sum(attend, *qkv):
    return jnp.sum(attend(*qkv).astype(jnp.float32) * weights.astype(jnp.float32))

  got, want = kernel(query, key, value), reference(query, key, value)
  assert got.dtype == query.dtype and got.shape == shape
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tolerance)
  grads = jax.grad(functools.partial(weighted_sum, kernel), (0, 1, 2))(query, key, value)
  expected = jax.grad(functools.partial(weighted_sum, reference), (0, 1, 2))(query, key, value)
  for name, got, want in zip("qkv", grads, expected):
    bound = tolerance * float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=bound, err_msg=f"d{name}")


def test_visited_block_fraction_counts_the_skipped_blocks():
  # Blocks of 4; query blocks visit key blocks [0, 1), [1, 2), [1, 3), [2, 4):
  # 6 of causal attention's 10.
  segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 0]], np.int32)
  assert triton_attention.visited_block_fraction(segments, block=4) == pytest.approx(0.6)
  assert triton_attention.visited_block_fraction(np.ones((2, 16), np.int32), 4) == 1.0


def test_the_decoder_runs_the_kernel_with_its_configured_blocks():
  """Rows of 64 tokens take blocks of 64 and 32 (the default 128 would
  refuse them); the logits equal the written-out attention's."""
  einsum = DecoderConfig(vocab_size=64, num_layers=1, num_heads=2, embed_dim=32, mlp_dim=64,
                         max_length=64, dropout_rate=0.0)
  triton = einsum.replace(attention_implementation="triton", triton_block=64,
                          triton_backward_block=32)
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(1, 64, (2, 64)), jnp.int32)
  segments = jnp.asarray([[1] * 20 + [2] * 40 + [0] * 4, [1] * 64], jnp.int32)
  positions = jnp.asarray([list(range(20)) + list(range(40)) + [0] * 4, list(range(64))],
                          jnp.int32)
  params = decoder.Decoder(einsum).init(jax.random.key(0), tokens, positions, segments)
  logits = {name: decoder.Decoder(config).apply(params, tokens, positions, segments)
            for name, config in (("einsum", einsum), ("triton", triton))}
  real = np.asarray(segments) > 0
  np.testing.assert_allclose(np.asarray(logits["triton"])[real],
                             np.asarray(logits["einsum"])[real], atol=1e-4)
  with pytest.raises(ValueError, match=r"row length \(64\) to be a multiple of 128"):
    decoder.Decoder(einsum.replace(attention_implementation="triton")).apply(
        params, tokens, positions, segments)


@pytest.mark.parametrize("field,value", [("triton_block", 96), ("triton_backward_block", 8)])
def test_triton_blocks_must_be_powers_of_two_from_16(field, value):
  with pytest.raises(ValueError, match=f"DecoderConfig.{field} must be a power of two >= 16"):
    DecoderConfig(vocab_size=64, **{field: value})
