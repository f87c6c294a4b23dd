"""Boolean attention masks for packed decoder rows and for KV-cache decoding.

Every mask here is boolean, ``True`` where a query may attend to a key, laid
out ``[batch, 1, query_length, key_length]`` (the ``1`` broadcasts over
heads). Attention turns ``False`` into a large negative score before the
float32 softmax.

Packed rows follow seqio's decoder feature converter: ``decoder_segment_ids``
numbers the sequences of a row from 1 and uses 0 for padding. For the row::

  decoder_segment_ids = [[1, 1, 1, 2, 2, 0]]

``decoder_attention_mask(6, segment_ids)[0, 0]`` is::

        key: 0  1  2  3  4  5
  query 0:   1  0  0  0  0  0
  query 1:   1  1  0  0  0  0
  query 2:   1  1  1  0  0  0
  query 3:   0  0  0  1  0  0      <- second sequence starts afresh
  query 4:   0  0  0  1  1  0
  query 5:   0  0  0  0  0  0      <- padding attends to nothing

A fully masked query row (padding) gets a uniform softmax over large negative
scores, never NaN; its output is garbage that the loss weights drop.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

Array = jnp.ndarray


def causal_mask(length: int) -> Array:
  """``[1, 1, length, length]``: query i sees keys j <= i.

  ``causal_mask(3)[0, 0]`` is ``[[1, 0, 0], [1, 1, 0], [1, 1, 1]]``.
  """
  index = jnp.arange(length)
  return (index[:, None] >= index[None, :])[None, None]


def segment_mask(segment_ids: Array) -> Array:
  """``[batch, 1, length, length]``: same non-zero segment id.

  ``segment_mask([[1, 1, 2, 0]])[0, 0]`` is::

    [[1, 1, 0, 0],
     [1, 1, 0, 0],
     [0, 0, 1, 0],
     [0, 0, 0, 0]]
  """
  if segment_ids.ndim != 2:
    raise ValueError(
        f"decoder_segment_ids must be [batch, length], got shape {segment_ids.shape}")
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  real = (segment_ids[:, :, None] > 0) & (segment_ids[:, None, :] > 0)
  return (same & real)[:, None]


def decoder_attention_mask(length: int, segment_ids: Optional[Array] = None) -> Array:
  """Causal mask, restricted to equal non-zero segments when ids are given.

  Returns ``[1, 1, length, length]`` without segment ids (every position is
  real), else ``[batch, 1, length, length]`` (see the module docstring).
  """
  mask = causal_mask(length)
  if segment_ids is None:
    return mask
  if segment_ids.shape[-1] != length:
    raise ValueError(
        f"decoder_segment_ids has length {segment_ids.shape[-1]}, "
        f"decoder_input_tokens has length {length}")
  return mask & segment_mask(segment_ids)


def decode_step_mask(cache_index: Array, cache_length: int) -> Array:
  """``[batch, 1, 1, cache_length]`` for one new token per row.

  ``cache_index[b]`` is where row b's new token is written; it may attend to
  every cached position up to and including that slot. With
  ``cache_index = [2, 0]`` and ``cache_length = 4``::

    [[[[1, 1, 1, 0]]],
     [[[1, 0, 0, 0]]]]

  Slots past ``cache_index`` hold padding written by ``prefill`` (zeros) or
  stale values and are never attended.
  """
  if cache_index.ndim != 1:
    raise ValueError(f"cache_index must be [batch], got shape {cache_index.shape}")
  slots = jnp.arange(cache_length)
  return (slots[None, :] <= cache_index[:, None])[:, None, None, :]


def prompt_mask(lengths: Array, length: int) -> Array:
  """``[batch, length]``: True at positions < ``lengths[b]``.

  ``prompt_mask([2, 3, 0], 4)`` is
  ``[[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]``.
  """
  if lengths.ndim != 1:
    raise ValueError(f"prompt lengths must be [batch], got shape {lengths.shape}")
  return jnp.arange(length)[None, :] < lengths[:, None]
