"""Multi-head causal self-attention with an optional per-row KV cache.

Parameters map one to one onto Hugging Face GPT-2's ``attn.c_attn`` (split
in three) and ``attn.c_proj``::

  query/key/value  kernel [E, H, D] ('embed', 'heads', 'kv'), bias [H, D]
  out              kernel [H, D, E] ('heads', 'kv', 'embed'), bias [E]

Three modes (``mode`` attribute):

* ``"full"``: ordinary attention over the given rows under ``mask``.
* ``"prefill"``: as ``"full"``, and keys/values of positions
  ``< prefill_lengths[b]`` are written to cache slots ``[0, P)``; the rest of
  the first P slots are zeroed.
* ``"decode"``: one token per row. Its key/value go to slot
  ``cache_index[b]`` of the cache (a per-row scatter, in place inside a
  decoding loop), and it attends to slots ``<= cache_index[b]`` by
  elementwise products reduced over the cache in its own layout (no per-step
  transpose of the cache, see ``_attend_one``). Rows whose cache is already
  full (``cache_index[b] >= max_length``) get NaN outputs instead of silently
  overwriting the last slot.

The cache lives in the ``'cache'`` collection::

  cached_key, cached_value  [B, max_length, H, D]
      ('cache_batch', 'cache_length', 'cache_heads', 'cache_kv')

In modes ``"prefill"``/``"decode"``, the call that *creates* the cache
variables (``model.init``) behaves as ``"full"``; ``max_length`` is the length
of that call's input.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sld_jax.model import layers
from sld_jax.model import masks
from sld_jax.model import packed_attention
from sld_jax.model import splash
from sld_jax.model import triton_attention
from sld_jax.model.config import DecoderConfig

Array = jnp.ndarray

MODES = ("full", "prefill", "decode")
HEAD_ACTIVATION_AXES = ("batch", "length", "heads", "kv")
# The attention output [B, L, H, D], named for remat policies (decoder.remat_policy).
ATTENTION_OUT = "attention_out"
CACHE_AXES = ("cache_batch", "cache_length", "cache_heads", "cache_kv")
# Masked scores; finite so that a fully masked (padding) query stays finite.
_MASKED_SCORE = -1e10


def _write_one_slot(cache: Array, value: Array, index: Array) -> Array:
  """Per-row ``cache[b, index[b]] = value[b, 0]`` for cache ``[B, M, H, D]``."""
  def write_row(row_cache, row_value, row_index):
    return jax.lax.dynamic_update_slice(row_cache, row_value, (row_index, 0, 0))
  return jax.vmap(write_row)(cache, value.astype(cache.dtype), index)


class SelfAttention(nn.Module):
  """Causal multi-head self-attention (see the module docstring)."""

  config: DecoderConfig
  mode: str = "full"
  deterministic: bool = True

  @nn.compact
  def __call__(self,
               x: Array,
               mask: Optional[Array],
               positions: Array,
               cache_index: Optional[Array] = None,
               prefill_lengths: Optional[Array] = None) -> Array:
    """Attends ``x [B, L, E]`` to itself (or to the cache); returns ``[B, L, E]``.

    Args:
      x: normalised residual stream.
      mask: boolean ``[B|1, 1, L, L]`` (modes "full"/"prefill"); ignored in
        "decode", where the mask comes from ``cache_index``. With
        ``attention_implementation`` "splash" or "cudnn_packed": the int
        segment ids ``[B, L]`` instead (they make the causal mask themselves);
        "cudnn_packed" also takes ``(segment ids, segment starts [B, M + 1])``
        (``packed_attention.host_segment_starts``).
      positions: ``[B, L]`` positions, used for RoPE.
      cache_index: ``[B]`` slot of the new token (mode "decode").
      prefill_lengths: ``[B]`` real prompt lengths (mode "prefill").
    """
    cfg = self.config
    if self.mode not in MODES:
      raise ValueError(f"SelfAttention.mode must be one of {MODES}, got {self.mode!r}")
    heads, head_dim = cfg.num_heads, cfg.head_dim

    def projection(name, in_shape, out_shape, axes, stddev=layers.INIT_STDDEV):
      return layers.Projection(in_shape=in_shape, out_shape=out_shape, kernel_axes=axes,
                               use_bias=True, init_stddev=stddev, dtype=cfg.compute_dtype,
                               param_dtype=cfg.params_dtype, name=name)

    qkv_axes = ("embed", "heads", "kv")
    query = projection("query", (cfg.embed_dim,), (heads, head_dim), qkv_axes)(x)
    key = projection("key", (cfg.embed_dim,), (heads, head_dim), qkv_axes)(x)
    value = projection("value", (cfg.embed_dim,), (heads, head_dim), qkv_axes)(x)
    if cfg.position == "rope":
      query = layers.apply_rope(query, positions, cfg.rope_max_wavelength)
      key = layers.apply_rope(key, positions, cfg.rope_max_wavelength)
    query = nn.with_logical_constraint(query, HEAD_ACTIVATION_AXES)
    key = nn.with_logical_constraint(key, HEAD_ACTIVATION_AXES)
    value = nn.with_logical_constraint(value, HEAD_ACTIVATION_AXES)

    overflow = None
    if self.mode != "full":
      cache_ready = self.has_variable("cache", "cached_key")
      zeros = nn.with_logical_partitioning(jnp.zeros, CACHE_AXES)
      cached_key = self.variable("cache", "cached_key", zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", zeros, value.shape, value.dtype)
      if cache_ready and self.mode == "decode":
        key, value, mask, overflow = self._decode_update(
            cached_key, cached_value, key, value, cache_index)
      elif cache_ready:
        self._prefill_update(cached_key, cached_value, key, value, prefill_lengths)

    if self.mode == "decode" and mask is not None and query.shape[1] == 1:
      out = self._attend_one(query, key, value, mask)
    elif self.mode != "decode" and cfg.attention_implementation != "einsum":
      out = self._attend_fused(query, key, value, mask)
    else:
      out = self._attend(query, key, value, mask)
    if overflow is not None:
      out = jnp.where(overflow[:, None, None, None], jnp.nan, out)
    out = checkpoint_name(out, ATTENTION_OUT)
    out = projection("out", (heads, head_dim), (cfg.embed_dim,), ("heads", "kv", "embed"),
                     layers.residual_init_stddev(cfg))(out)
    out = nn.Dropout(rate=cfg.dropout_rate)(out, deterministic=self.deterministic)
    return nn.with_logical_constraint(out, layers.EMBED_ACTIVATION_AXES)

  def _decode_update(self, cached_key, cached_value, key, value, cache_index):
    """Writes one token per row; returns full-cache keys/values and their mask."""
    batch, length = key.shape[:2]
    cache_length = cached_key.value.shape[1]
    if length != 1:
      raise ValueError(f"decode mode takes one token per row, got length {length}")
    if cache_index is None or cache_index.shape != (batch,):
      raise ValueError(
          f"decode mode needs cache_index of shape ({batch},), got "
          f"{None if cache_index is None else cache_index.shape}")
    cached_key.value = nn.with_logical_constraint(
        _write_one_slot(cached_key.value, key, cache_index), CACHE_AXES)
    cached_value.value = nn.with_logical_constraint(
        _write_one_slot(cached_value.value, value, cache_index), CACHE_AXES)
    mask = masks.decode_step_mask(cache_index, cache_length)
    overflow = cache_index >= cache_length
    return cached_key.value, cached_value.value, mask, overflow

  def _prefill_update(self, cached_key, cached_value, key, value, prefill_lengths):
    """Writes the prompt's keys/values to slots ``[0, P)``, zero past each length."""
    batch, length = key.shape[:2]
    cache_length = cached_key.value.shape[1]
    if length > cache_length:
      raise ValueError(
          f"prompt length {length} exceeds the cache length {cache_length}; "
          "build the cache with a larger max_length")
    if prefill_lengths is None or prefill_lengths.shape != (batch,):
      raise ValueError(
          f"prefill mode needs prefill_lengths of shape ({batch},), got "
          f"{None if prefill_lengths is None else prefill_lengths.shape}")
    real = masks.prompt_mask(prefill_lengths, length)[:, :, None, None]
    for variable, new in ((cached_key, key), (cached_value, value)):
      new = jnp.where(real, new, 0).astype(variable.value.dtype)
      variable.value = nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(variable.value, new, (0, 0, 0, 0)), CACHE_AXES)

  def _attend_one(self, query, key, value, mask):
    """``_attend`` for one query per row against the cache, without transposes.

    ``query [B, 1, H, D]``, ``key``/``value [B, M, H, D]`` (the cache
    layout), ``mask [B, 1, 1, M]`` -> ``[B, 1, H, D]``. The einsums of
    ``_attend`` contract per (batch, head), which XLA on CPU serves by
    transposing every cache buffer to ``[B, H, ., .]`` at every step (a
    full copy of the cache, most of a small model's step time); here the
    scores are ``sum_d q[b, h, d] * k[b, m, h, d]`` and the output
    ``sum_m p[b, m, h] * v[b, m, h, d]``: elementwise products reduced in
    float32, each reading a cache buffer once in its own layout.
    """
    cfg = self.config
    scores = jnp.sum(query.astype(jnp.float32) * key.astype(jnp.float32), axis=-1)  # [B, M, H]
    scores = scores / math.sqrt(cfg.head_dim)
    scores = jnp.where(mask[:, 0, 0, :, None], scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=1)
    probs = nn.Dropout(rate=cfg.attention_dropout)(probs, deterministic=self.deterministic)
    out = jnp.sum(probs[..., None] * value.astype(jnp.float32), axis=1, keepdims=True)
    return nn.with_logical_constraint(out.astype(cfg.compute_dtype), HEAD_ACTIVATION_AXES)

  def _attend(self, query, key, value, mask):
    """Softmax attention in float32; ``[B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D]``.

    The heads are moved in front (``[B, H, L, D]``) before the two batched
    matmuls: XLA on CPU runs ``bhqd,bhkd->bhqk`` and ``bhqk,bhkd->bhqd`` 1.3-1.9x
    faster than the same contractions written over ``[B, L, H, D]`` (whose
    layouts it picks itself, e.g. a ``[B, H, D, Lq]`` output), forward and
    backward.
    """
    cfg = self.config
    query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
    scores = jnp.einsum("bhqd,bhkd->bhqk", query, key).astype(jnp.float32)
    scores = scores / math.sqrt(cfg.head_dim)
    if mask is not None:
      scores = jnp.where(mask, scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(rate=cfg.attention_dropout)(probs, deterministic=self.deterministic)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(cfg.compute_dtype), value)
    return nn.with_logical_constraint(jnp.swapaxes(out, 1, 2), HEAD_ACTIVATION_AXES)

  def _attend_fused(self, query, key, value, mask):
    """``_attend`` through ``jax.nn.dot_product_attention`` (no dropout).

    ``[B, L, H, D]`` in and out, the layout that function takes, so no
    transposes; ``mask [B|1, 1, L, L]`` (causal and same-segment) is passed
    as is. With ``attention_implementation="cudnn"`` this is cuDNN's flash
    attention: scores are computed block by block in float32 and never
    stored, forward or backward. ``"xla"`` is the same function's portable
    path (what CPU tests compare against ``_attend``).
    """
    cfg = self.config
    scale = 1.0 / math.sqrt(cfg.head_dim)
    if cfg.attention_implementation == "splash":
      out = splash.splash_attention(query, key, value, mask, scale, HEAD_ACTIVATION_AXES)
    elif cfg.attention_implementation == "triton":
      out = triton_attention.triton_attention(
          query, key, value, mask, scale, HEAD_ACTIVATION_AXES, block=cfg.triton_block,
          backward_block=cfg.triton_backward_block)
    elif cfg.attention_implementation == "cudnn_packed":
      segment_ids, starts = mask if isinstance(mask, tuple) else (mask, None)
      out = packed_attention.packed_attention(query, key, value, segment_ids, scale,
                                              cfg.max_segments_per_row, starts)
    else:
      implementation = "cudnn" if cfg.attention_implementation == "cudnn" else "xla"
      out = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale,
                                         implementation=implementation)
    return nn.with_logical_constraint(out.astype(cfg.compute_dtype), HEAD_ACTIVATION_AXES)
