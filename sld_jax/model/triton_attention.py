"""Flash attention as a Pallas Triton kernel (GPUs) for packed causal rows.

``jax.experimental.pallas.ops.gpu.attention.mha`` is FlashAttention-2 written
in Pallas for Triton: scores block by block in float32, never stored,
forward and backward, with segment ids for packing and a causal mask whose
empty key blocks it skips::

  segment_ids  [1 1 1 2 2 0]      query 4 sees keys 3-4 (same segment, causal)

It is the GPU alternative to cuDNN's (``attention_implementation="cudnn"``
and ``"cudnn_packed"``): no segment-slot bound, no host-side offsets, and a
kernel whose source is in jax. It does causal attention's work over the
whole row (blocks are skipped for causality, not for segments). Off GPUs it
runs in Pallas interpret mode, slowly: what the CPU tests use to check it
against the reference attention. Under a mesh it runs on each device's rows
and heads (``kernel_sharding.on_each_device``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

from sld_jax.model import kernel_sharding

BLOCK = 128           # query and key block of the forward kernel (jax's default)
BACKWARD_BLOCK = 64   # blocks of the two backward kernels


def triton_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     segment_ids: jax.Array, scale: float,
                     logical_axes: tuple[str, ...] = ("batch", "length", "heads", "kv")
                     ) -> jax.Array:
  """Causal attention within segments; ``[B, L, H, D]`` in and out.

  Args:
    query, key, value: ``[B, L, H, D]``, ``L`` a multiple of 128.
    segment_ids: int ``[B, L]`` (``decoder_segment_ids``; all ones for an
      unpacked row).
    scale: multiplies the scores (``1 / sqrt(D)``).
    logical_axes: of ``query``, ``key``, ``value`` and the output (how the
      kernel's ``shard_map`` splits them under a mesh).
  """
  length = query.shape[1]
  if length % BLOCK:
    raise ValueError(
        f"attention_implementation='triton' needs the row length ({length}) to be a "
        f"multiple of {BLOCK}")
  return kernel_sharding.on_each_device(
      functools.partial(_on_one_device, scale=scale), query, key, value, segment_ids,
      logical_axes, "triton")


def _on_one_device(query, key, value, segment_ids, scale):
  sizes = pallas_attention.BlockSizes(
      block_q=BLOCK, block_k=BLOCK, block_q_dkv=BACKWARD_BLOCK, block_kv_dkv=BACKWARD_BLOCK,
      block_q_dq=BACKWARD_BLOCK, block_kv_dq=BACKWARD_BLOCK)

  def attend(interpret, query, key, value, segment_ids):
    return pallas_attention.mha(query, key, value, segment_ids, sm_scale=scale, causal=True,
                                block_sizes=sizes, interpret=interpret)

  # The kernel where the program is compiled for a GPU (also without one:
  # benchmarks/compile_only_gpu.py), the interpreter elsewhere.
  return jax.lax.platform_dependent(
      query, key, value, segment_ids.astype(jnp.int32),
      cuda=functools.partial(attend, False), default=functools.partial(attend, True))
