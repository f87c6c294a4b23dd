"""Flash attention as a Pallas Triton kernel (GPUs) for packed causal rows.

FlashAttention-2 written in Pallas for Triton, after jax's
``jax.experimental.pallas.ops.gpu.attention.mha``: scores block by block in
float32, never stored, forward and backward, segment ids for packing and the
causal mask. What it adds to jax's kernel is the block range each program
visits. jax's skips key blocks for causality only, so a query block at the
end of a 1024-token row reads all 8 key blocks; here it starts at the block
holding the start of its first query's segment, and the backward pass's key
blocks stop at their last key's segment end::

  segment_ids  [1 1 1 1 | 2 2 2 2 | 2 2 3 3 | 3 3 3 0]    blocks of 4
  query block 2 (ids 2 2 3 3): keys from block 1 (segment 2 starts there)
                               to block 2 (causal), not from block 0

Packed utterances of 55-170 tokens in rows of 1024 leave about a third of
causal attention's block pairs (``visited_block_fraction``); the masks inside
the visited blocks are exact, so the output is the same.

Segments must be contiguous runs of one id, as packing makes them (seqio's
packing, ``decoder_segment_ids``); a segment id that appears in two runs of a
row would lose the keys of its earlier run.

It is the GPU alternative to cuDNN's (``attention_implementation="cudnn"``
and ``"cudnn_packed"``): no segment-slot bound, no host-side offsets. Off
GPUs it runs in Pallas interpret mode, slowly: what the CPU tests use to
check it against the reference attention. Under a mesh it runs on each
device's rows and heads (``kernel_sharding.on_each_device``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sld_jax.model import kernel_sharding

BLOCK = 128           # query and key block of the forward kernel
BACKWARD_BLOCK = 64   # query and key blocks of the backward kernel
LOG2_E = math.log2(math.e)
# Scores of hidden keys: finite, so a query block's first (all hidden) key
# block leaves no NaN; the next visible block's rescaling zeroes its terms.
HIDDEN_SCORE = -0.7 * float(np.finfo(np.float32).max)


def triton_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     segment_ids: jax.Array, scale: float,
                     logical_axes: tuple[str, ...] = ("batch", "length", "heads", "kv"),
                     block: int = BLOCK, backward_block: int = BACKWARD_BLOCK) -> jax.Array:
  """Causal attention within segments; ``[B, L, H, D]`` in and out.

  Args:
    query, key, value: ``[B, L, H, D]``, ``L`` a multiple of ``block``.
    segment_ids: int ``[B, L]`` (``decoder_segment_ids``: contiguous runs,
      padding 0; all ones for an unpacked row).
    scale: multiplies the scores (``1 / sqrt(D)``).
    logical_axes: of ``query``, ``key``, ``value`` and the output (how the
      kernel's ``shard_map`` splits them under a mesh).
    block, backward_block: the forward kernel's query and key block, the
      backward kernel's (tests use small ones to have many blocks in short
      rows).
  """
  length = query.shape[1]
  if length % block or length % backward_block:
    raise ValueError(
        f"attention_implementation='triton' needs the row length ({length}) to be a "
        f"multiple of {max(block, backward_block)}")
  kernel = functools.partial(_on_one_device, scale=scale, block=block,
                             backward_block=backward_block)
  return kernel_sharding.on_each_device(kernel, query, key, value, segment_ids,
                                        logical_axes, "triton")


def segment_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and last position of each token's segment run, ``[B, L]`` int32::

    segment_ids [1 1 1 2 2 0 0]
    first       [0 0 0 3 3 5 5]
    last        [2 2 2 4 4 6 6]
  """
  length = segment_ids.shape[-1]
  positions = jnp.arange(length, dtype=jnp.int32)
  changes = segment_ids[..., 1:] != segment_ids[..., :-1]
  edge = jnp.ones_like(changes[..., :1])
  starts = jnp.concatenate([edge, changes], axis=-1)
  ends = jnp.concatenate([changes, edge], axis=-1)
  first = lax.cummax(jnp.where(starts, positions, 0), axis=segment_ids.ndim - 1)
  last = lax.cummin(jnp.where(ends, positions, length - 1), axis=segment_ids.ndim - 1,
                    reverse=True)
  return first, last


def key_block_range(query_block, first_of_block, block_q: int, block_k: int):
  """Key blocks ``[lo, hi)`` that queries ``query_block * block_q ...`` see:
  from the block holding their first query's segment start (``first`` of the
  block's first query) to the causal bound."""
  return (lax.div(first_of_block, block_k),
          lax.div((query_block + 1) * block_q + block_k - 1, block_k))


def query_block_range(key_block, last_of_block, block_q: int, block_k: int):
  """Query blocks ``[lo, hi)`` that see keys ``key_block * block_k ...``: from
  the causal bound to the block holding their last key's segment end
  (``last`` of the block's last key)."""
  return lax.div(key_block * block_k, block_q), lax.div(last_of_block + block_q, block_q)


def visited_block_fraction(segment_ids: np.ndarray, block: int = BLOCK) -> float:
  """Forward key blocks visited over causal attention's (``block`` square):
  what skipping by segment saves on these rows."""
  first, _ = segment_bounds(jnp.asarray(segment_ids))
  blocks = segment_ids.shape[-1] // block
  query_blocks = jnp.arange(blocks)
  lo, hi = key_block_range(query_blocks, first[:, ::block], block, block)
  return float(jnp.sum(hi - lo)) / (segment_ids.shape[0] * blocks * (blocks + 1) / 2)


def _on_one_device(query, key, value, segment_ids, scale, block, backward_block):
  head_dim = query.shape[-1]
  padded = pl.next_power_of_2(max(head_dim, 16))
  if padded != head_dim:                       # zero columns change no score
    widths = [(0, 0)] * 3 + [(0, padded - head_dim)]
    query, key, value = (jnp.pad(x, widths) for x in (query, key, value))
  def attend(interpret, query, key, value, segment_ids):
    return _attention(query, key, value, segment_ids, scale, block, backward_block, interpret)

  out = kernel_sharding.kernel_or_interpreter(attend, "cuda", query, key, value, segment_ids)
  return out[..., :head_dim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(query, key, value, segment_ids, scale, block, backward_block, interpret):
  return _forward(query, key, value, segment_ids, scale, block, interpret)[0]


def _forward(query, key, value, segment_ids, scale, block, interpret):
  batch, length, heads, head_dim = query.shape
  first, _ = segment_bounds(segment_ids)
  row = pl.BlockSpec((None, length), lambda i, b, h: (b, 0))
  whole = pl.BlockSpec((None, length, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  query_block = pl.BlockSpec((None, block, None, head_dim), lambda i, b, h: (b, i, h, 0))
  out, log2_sum = pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale, block=block),
      grid=(length // block, batch, heads),
      in_specs=[query_block, whole, whole, row, row],
      out_specs=[query_block, pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(query.shape, query.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="segment_flash_forward",
  )(query, key, value, segment_ids, first)
  return out, (query, key, value, segment_ids, out, log2_sum)


def _visible_scores(query, key, scale, query_start, key_start, query_segments,
                    key_segments):
  """``[bq, bk]`` float32 scores in base 2 (``scale * log2(e) * q.k``),
  ``HIDDEN_SCORE`` where the key is later or in another segment."""
  scores = jnp.dot(query, key.T, preferred_element_type=jnp.float32) * (scale * LOG2_E)
  query_positions = query_start + jnp.arange(query.shape[0])
  key_positions = key_start + jnp.arange(key.shape[0])
  visible = ((query_segments[:, None] == key_segments[None, :])
             & (query_positions[:, None] >= key_positions[None, :]))
  return jnp.where(visible, scores, HIDDEN_SCORE)


def _forward_kernel(query_ref, key_ref, value_ref, segments_ref, first_ref, out_ref,
                    log2_sum_ref, *, scale, block):
  query_block = pl.program_id(0)
  rows = pl.ds(query_block * block, block)
  query = query_ref[...]
  query_segments = segments_ref[rows]

  def visit(key_block, carry):
    out, row_max, row_sum = carry
    keys = pl.ds(key_block * block, block)
    scores = _visible_scores(query, key_ref[keys, :], scale, query_block * block,
                             key_block * block, query_segments, segments_ref[keys])
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
    rescale = jnp.exp2(row_max - new_max)
    probs = jnp.exp2(scores - new_max[:, None])
    value = value_ref[keys, :]
    out = rescale[:, None] * out + jnp.dot(probs.astype(value.dtype), value,
                                           preferred_element_type=jnp.float32)
    return out, new_max, rescale * row_sum + jnp.sum(probs, axis=1)

  lo, hi = key_block_range(query_block, jnp.min(first_ref[rows]), block, block)
  start = (jnp.zeros(query.shape, jnp.float32), jnp.full((block,), -jnp.inf, jnp.float32),
           jnp.zeros((block,), jnp.float32))
  out, row_max, row_sum = lax.fori_loop(lo, hi, visit, start)
  log2_sum_ref[...] = row_max + jnp.log2(row_sum)
  out_ref[...] = (out / row_sum[:, None]).astype(out_ref.dtype)


def _attention_forward(query, key, value, segment_ids, scale, block, backward_block,
                       interpret):
  return _forward(query, key, value, segment_ids, scale, block, interpret)


def _attention_backward(scale, block, backward_block, interpret, residuals, d_out):
  query, key, value, segment_ids, out, log2_sum = residuals
  batch, length, heads, head_dim = query.shape
  first, last = segment_bounds(segment_ids)
  # delta_i = sum_d out_id * dout_id, [B, H, L] float32 like log2_sum.
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), d_out.astype(jnp.float32))
  row = pl.BlockSpec((None, length), lambda b, h, j: (b, 0))
  whole = pl.BlockSpec((None, length, None, head_dim), lambda b, h, j: (b, 0, h, 0))
  per_head = pl.BlockSpec((None, None, length), lambda b, h, j: (b, h, 0))
  own_block = pl.BlockSpec((None, backward_block, None, head_dim),
                           lambda b, h, j: (b, j, h, 0))
  d_query, d_key, d_value = pl.pallas_call(
      functools.partial(_backward_kernel, scale=scale, block=backward_block),
      grid=(batch, heads, length // backward_block),
      in_specs=[whole, whole, whole, whole, per_head, per_head, row, row, row],
      out_specs=[own_block, own_block, own_block],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="segment_flash_backward",
  )(query, key, value, d_out, log2_sum, delta, segment_ids, first, last)
  return d_query, d_key, d_value, None


def _backward_kernel(query_ref, key_ref, value_ref, d_out_ref, log2_sum_ref, delta_ref,
                     segments_ref, first_ref, last_ref, d_query_ref, d_key_ref, d_value_ref,
                     *, scale, block):
  """Program ``j`` accumulates the key gradients of key block ``j`` over the
  query blocks that see it, then the query gradient of query block ``j``
  over the key blocks it sees (FlashAttention-2's backward pass)."""
  own = pl.program_id(2)
  rows = pl.ds(own * block, block)

  def probs_and_d_scores(query, key, value, d_out, query_rows, key_rows, query_block,
                         key_block):
    scores = _visible_scores(query, key, scale, query_block * block, key_block * block,
                             segments_ref[query_rows], segments_ref[key_rows])
    probs = jnp.exp2(scores - log2_sum_ref[query_rows][:, None])
    d_probs = jnp.dot(d_out, value.T, preferred_element_type=jnp.float32)
    return probs, probs * (d_probs - delta_ref[query_rows][:, None]) * scale

  key, value = key_ref[rows, :], value_ref[rows, :]

  def to_key_block(query_block, carry):
    d_key, d_value = carry
    queries = pl.ds(query_block * block, block)
    query, d_out = query_ref[queries, :], d_out_ref[queries, :]
    probs, d_scores = probs_and_d_scores(query, key, value, d_out, queries, rows,
                                         query_block, own)
    d_value += jnp.dot(probs.astype(d_out.dtype).T, d_out, preferred_element_type=jnp.float32)
    d_key += jnp.dot(d_scores.astype(query.dtype).T, query, preferred_element_type=jnp.float32)
    return d_key, d_value

  lo, hi = query_block_range(own, jnp.max(last_ref[rows]), block, block)
  zeros = jnp.zeros(key.shape, jnp.float32)
  d_key, d_value = lax.fori_loop(lo, hi, to_key_block, (zeros, zeros))
  d_key_ref[...] = d_key.astype(d_key_ref.dtype)
  d_value_ref[...] = d_value.astype(d_value_ref.dtype)

  query, d_out = query_ref[rows, :], d_out_ref[rows, :]

  def from_key_block(key_block, d_query):
    keys = pl.ds(key_block * block, block)
    key = key_ref[keys, :]
    _, d_scores = probs_and_d_scores(query, key, value_ref[keys, :], d_out, rows, keys,
                                     own, key_block)
    return d_query + jnp.dot(d_scores.astype(key.dtype), key,
                             preferred_element_type=jnp.float32)

  lo, hi = key_block_range(own, jnp.min(first_ref[rows]), block, block)
  d_query = lax.fori_loop(lo, hi, from_key_block, jnp.zeros(query.shape, jnp.float32))
  d_query_ref[...] = d_query.astype(d_query_ref.dtype)


_attention.defvjp(_attention_forward, _attention_backward)
