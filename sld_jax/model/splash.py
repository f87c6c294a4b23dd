"""Splash attention (Pallas, TPU) for packed causal rows.

``jax.experimental.pallas.ops.tpu.splash_attention`` computes attention block
by block in VMEM and skips the blocks that the mask leaves empty, so neither
the ``[L, L]`` scores nor the mask are ever materialised. Packing is given as
segment ids, the causal part as a block-sparse ``CausalMask``::

  segment_ids  [1 1 1 2 2 0]      query 4 sees keys 3-4 (same segment, causal)

Padding (segment 0) attends to padding; those rows carry no loss weight.
Off TPUs the kernel runs in Pallas interpret mode, slowly: that is what the
CPU tests use to check the mask logic against ``jax.nn.dot_product_attention``.
Under a mesh it runs on each device's rows and heads
(``kernel_sharding.on_each_device``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask

from sld_jax.model import kernel_sharding

MAX_BLOCK = 512
LANES = 128                  # blocks are multiples of the TPU's 128 lanes


@functools.lru_cache(maxsize=None)
def _kernel(length: int, heads: int, interpret: bool):
  block = min(MAX_BLOCK, length)
  if length % LANES or length % block:
    raise ValueError(
        f"attention_implementation='splash' needs the row length ({length}) to be a "
        f"multiple of {LANES} and of its block size {block}")
  mask = splash_attention_mask.MultiHeadMask(
      [splash_attention_mask.CausalMask((length, length)) for _ in range(heads)])
  sizes = splash_attention_kernel.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  # Concrete mask tables even when first built inside a trace (it is cached).
  with jax.ensure_compile_time_eval():
    return splash_attention_kernel.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     segment_ids: jax.Array, scale: float,
                     logical_axes: tuple[str, ...] = ("batch", "length", "heads", "kv")
                     ) -> jax.Array:
  """Causal attention within segments; ``[B, L, H, D]`` in and out.

  Args:
    query, key, value: ``[B, L, H, D]``.
    segment_ids: int ``[B, L]`` (``decoder_segment_ids``; all ones for an
      unpacked row).
    scale: multiplies the scores (``1 / sqrt(D)``).
    logical_axes: of ``query``, ``key``, ``value`` and the output; under a
      mesh they say (through the logical axis rules) how the kernel's
      ``shard_map`` splits them.
  """
  return kernel_sharding.on_each_device(
      functools.partial(_splash_on_one_device, scale=scale), query, key, value, segment_ids,
      logical_axes, "splash")


def _splash_on_one_device(query, key, value, segment_ids, scale):
  _, length, heads, _ = query.shape

  def attend(interpret, query, key, value, segment_ids):
    kernel = _kernel(length, heads, interpret)

    def one_row(q, k, v, segments):      # [L, H, D] -> the kernel's [H, L, D]
      q, k, v = (jnp.swapaxes(x, 0, 1) for x in (q * scale, k, v))
      ids = splash_attention_kernel.SegmentIds(q=segments, kv=segments)
      return jnp.swapaxes(kernel(q, k, v, segment_ids=ids), 0, 1)

    return jax.vmap(one_row)(query, key, value, segment_ids)

  return kernel_sharding.kernel_or_interpreter(attend, "tpu", query, key, value, segment_ids)
