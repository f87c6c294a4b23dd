"""Decoder-only Transformer (GPT-2 family by default) and KV-cache decoding.

``Decoder(config)`` consumes seqio decoder features and returns float32
logits ``[B, L, V]``. With the defaults it is GPT-2: learned absolute
positions, pre-LayerNorm blocks, ``gelu_new`` MLP, final LayerNorm, tied
input/output embedding, dropout on embeddings, attention probabilities and
residual branches. ``config.position='rope'``, ``norm='rmsnorm'``,
``mlp='swiglu'`` switch to the LLaMA-style parts.

Parameter tree (plain stack; with ``scan_layers`` the ``layers_i`` subtrees
become one ``layers`` subtree with a leading ``[num_layers]`` axis named
'layers')::

  token_embedder/embedding          [V, E]        ('vocab', 'embed')       wte
  position_embedder/embedding       [max_len, E]  ('abspos', 'embed')      wpe
  layers_i/pre_attention_norm/...   [E]           ('embed',)               ln_1
  layers_i/attention/{query,key,value}/kernel [E, H, D], bias [H, D]       c_attn
  layers_i/attention/out/kernel     [H, D, E], bias [E]                    attn.c_proj
  layers_i/pre_mlp_norm/...         [E]                                    ln_2
  layers_i/mlp/wi/kernel [E, M] + bias, mlp/wo/kernel [M, E] + bias        mlp.c_fc/c_proj
  final_norm/{scale,bias}           [E]                                    ln_f
  logits_dense/kernel               [E, V]   only if not tie_embeddings

The output projection runs in ``config.logits_via_embedding_dtype`` (None:
float32) and the logits are always returned in float32.

Packed rows: for the seqio features of one packed row::

  decoder_input_tokens = [[ 7,  8,  9, 12, 13,  0]]
  decoder_segment_ids  = [[ 1,  1,  1,  2,  2,  0]]
  decoder_positions    = [[ 0,  1,  2,  0,  1,  0]]

the logits at positions 0-2 equal those of ``[[7, 8, 9]]`` alone and those
at 3-4 equal those of ``[[12, 13]]`` alone (see ``masks.py``).

KV-cache decoding (pure, jit-friendly functions below): right-padded prompts
of different lengths need no left-padding because the cache keeps a per-row
``cache_index``::

  cache  = init_cache(config, batch_size=2, max_length=8)
  prompt = [[5, 6, 7], [5, 0, 0]]; lengths = [3, 1]
  logits, cache = prefill(config, params, cache, prompt, lengths)
  next_token = argmax(last_logits(logits, lengths))   # logits at [2] and [0]
  # the same next-token logits [B, V], projected at those positions only:
  #   prefill(config, params, cache, prompt, lengths, logits="last")
  # cache_index == [3, 1]
  step_logits, cache = decode_step(config, params, cache, next_token)
  # row 0 wrote slot 3 (position 3), row 1 slot 1; cache_index == [4, 2]
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sld_jax.model import attention
from sld_jax.model import layers
from sld_jax.model import masks
from sld_jax.model.config import DecoderConfig
from sld_jax.model.config import SEGMENT_ID_ATTENTION

Array = jnp.ndarray
Params = Any
Cache = Any

LOGITS_AXES = ("batch", "length", "vocab")


class DecoderLayer(nn.Module):
  """One pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

  Returns ``(x, None)`` so that it can be the body of ``nn.scan``.
  """

  config: DecoderConfig
  mode: str = "full"
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, positions, cache_index, prefill_lengths):
    cfg = self.config
    x = nn.with_logical_constraint(x, layers.EMBED_ACTIVATION_AXES)
    h = layers.make_norm(cfg, "pre_attention_norm")(x)
    h = attention.SelfAttention(cfg, mode=self.mode, deterministic=self.deterministic,
                                name="attention")(h, mask, positions, cache_index, prefill_lengths)
    x = x + h
    h = layers.make_norm(cfg, "pre_mlp_norm")(x)
    h = layers.Mlp(cfg, deterministic=self.deterministic, name="mlp")(h)
    x = nn.with_logical_constraint(x + h, layers.EMBED_ACTIVATION_AXES)
    return x, None


class Decoder(nn.Module):
  """Decoder-only Transformer over seqio decoder features (module docstring)."""

  config: DecoderConfig

  @nn.compact
  def __call__(self,
               decoder_input_tokens: Array,
               decoder_positions: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               *,
               enable_dropout: bool = False,
               decode: bool = False,
               prefill: bool = False,
               prefill_lengths: Optional[Array] = None,
               logits_positions: Optional[Array] = None,
               return_hidden: bool = False,
               decoder_segment_starts: Optional[Array] = None) -> Array:
    """Returns float32 logits ``[B, L, V]`` (``[B, 1, V]`` with ``logits_positions``).

    Args:
      decoder_input_tokens: int ``[B, L]``.
      decoder_positions: int ``[B, L]``, restarting at 0 per packed segment;
        ``arange(L)`` when None. Ignored in decode mode (the cache index is
        the position).
      decoder_segment_ids: int ``[B, L]``, 0 = padding; attention stays
        within a segment. None: causal attention over the whole row.
      enable_dropout: apply dropout (needs a ``'dropout'`` rng).
      decode: one token per row against the ``'cache'`` collection (make it
        mutable). The first call, inside ``init``, creates a cache whose
        length is the input length.
      prefill: run the prompt and write its keys/values to the cache;
        ``prefill_lengths [B]`` gives the real prompt lengths.
      logits_positions: int ``[B]``: run the final norm and the output
        projection at position ``logits_positions[b]`` of row b only and
        return ``[B, 1, V]``, e.g. ``prefill_lengths - 1`` for the next-token
        logits of right-padded prompts. With ``tokens [[5, 6, 7], [5, 0, 0]]``
        and ``logits_positions [2, 0]`` the result is the full forward's
        ``logits[0, 2]`` and ``logits[1, 0]``, at ``1/L`` of the projection's
        cost (``[B, L, E] x [E, V]`` is most of a prompt pass's FLOPs when
        V is large).
      return_hidden: return the final-norm outputs ``[B, L, E]`` instead of
        the logits, for a loss that projects them itself in chunks
        (``losses.compute_loss_chunked`` with ``vocab_projection``).
      decoder_segment_starts: int ``[B, M + 1]``, the start of each segment
        of each row, -1 padded (``packed_attention.host_segment_starts``):
        read by ``attention_implementation="cudnn_packed"`` only, which then
        declares exactly M segment slots and needs no fallback.
    """
    cfg = self.config
    tokens = decoder_input_tokens
    if tokens.ndim != 2:
      raise ValueError(f"decoder_input_tokens must be [batch, length], got shape {tokens.shape}")
    if decode and prefill:
      raise ValueError("Decoder: decode and prefill are mutually exclusive")
    batch, length = tokens.shape
    for feature, array in (("decoder_positions", decoder_positions),
                           ("decoder_segment_ids", decoder_segment_ids)):
      if array is not None and array.shape != tokens.shape:
        raise ValueError(
            f"{feature} has shape {array.shape}, decoder_input_tokens has {tokens.shape}")
    deterministic = not enable_dropout

    # mode tells the attention layers whether to touch the cache. Inside
    # model.init the cache does not exist yet: it is created (length = input
    # length) and the layers attend as in "full" mode.
    mode, cache_index = "full", None
    if decode or prefill:
      mode = "decode" if decode else "prefill"
      cache_ready = self.has_variable("cache", "cache_index")
      index = self.variable("cache", "cache_index",
                            nn.with_logical_partitioning(jnp.zeros, ("cache_batch",)),
                            (batch,), jnp.int32)
      if cache_ready and index.value.shape != (batch,):
        raise ValueError(
            f"Decoder: the cache was built for batch {index.value.shape[0]}, "
            f"the input has batch {batch}")
      if cache_ready and decode:
        cache_index = index.value
        decoder_positions = cache_index[:, None]
      elif cache_ready:
        if prefill_lengths is None:
          raise ValueError("Decoder: prefill=True needs prefill_lengths [batch]")
        prefill_lengths = jnp.asarray(prefill_lengths, jnp.int32)
        index.value = prefill_lengths
    decoding = cache_index is not None

    if decoder_positions is None:
      decoder_positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    if decoding:
      mask = None
    elif cfg.attention_implementation in SEGMENT_ID_ATTENTION:
      # These build the causal mask themselves (block-sparse); they take the segments.
      mask = (jnp.ones(tokens.shape, jnp.int32) if decoder_segment_ids is None
              else decoder_segment_ids)
      if cfg.attention_implementation == "cudnn_packed" and decoder_segment_starts is not None:
        mask = (mask, decoder_segment_starts)
    else:
      mask = masks.decoder_attention_mask(length, decoder_segment_ids)

    token_embedder = layers.Embed(cfg.vocab_size, cfg.embed_dim, ("vocab", "embed"),
                                  dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                                  name="token_embedder")
    x = token_embedder(tokens)
    if cfg.position == "learned":
      x = x + layers.Embed(cfg.max_length, cfg.embed_dim, ("abspos", "embed"),
                           dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                           name="position_embedder")(decoder_positions)
    x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x.astype(cfg.compute_dtype), layers.EMBED_ACTIVATION_AXES)

    x = self._layer_stack(mode, deterministic)(
        x, mask, decoder_positions, cache_index, prefill_lengths)

    if decoding:
      index.value = cache_index + 1

    if logits_positions is not None:
      logits_positions = jnp.asarray(logits_positions, jnp.int32)
      if logits_positions.shape != (batch,):
        raise ValueError(
            f"logits_positions must be [batch] = ({batch},), got {logits_positions.shape}")
      x = jnp.take_along_axis(x, logits_positions[:, None, None], axis=1)
    x = layers.make_norm(cfg, "final_norm")(x)
    if return_hidden and not self.is_initializing():
      return nn.with_logical_constraint(x, layers.EMBED_ACTIVATION_AXES)
    logits_dtype = cfg.logits_dtype
    if cfg.tie_embeddings:
      logits = token_embedder.attend(x, dtype=logits_dtype)
    else:
      logits = layers.Projection(in_shape=(cfg.embed_dim,), out_shape=(cfg.vocab_size,),
                                 kernel_axes=("embed", "vocab"), use_bias=False,
                                 dtype=logits_dtype, param_dtype=cfg.params_dtype,
                                 name="logits_dense")(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), LOGITS_AXES)

  def _layer_stack(self, mode: str, deterministic: bool):
    """A callable ``(x, mask, positions, cache_index, prefill_lengths) -> x``."""
    cfg = self.config
    layer_cls = DecoderLayer
    if cfg.remat:
      layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers,
                           policy=remat_policy(cfg.remat_policy))
    if cfg.scan_layers:
      stack = nn.scan(
          layer_cls,
          variable_axes={"params": 0, "cache": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast,) * 4,
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, mode=mode, deterministic=deterministic, name="layers")
      return lambda *args: stack(*args)[0]

    stack = [layer_cls(cfg, mode=mode, deterministic=deterministic, name=f"layers_{i}")
             for i in range(cfg.num_layers)]

    def run(x, *args):
      for layer in stack:
        x, _ = layer(x, *args)
      return x
    return run


def remat_policy(name: str):
  """``DecoderConfig.remat_policy`` -> a ``jax.checkpoint_policies`` policy."""
  policies = jax.checkpoint_policies
  attention_out = policies.save_only_these_names(attention.ATTENTION_OUT)
  return {"full": policies.nothing_saveable,
          "minimal": policies.dots_with_no_batch_dims_saveable,
          "save_attention_out": attention_out,
          "minimal_attention_out": policies.save_from_both_policies(
              policies.dots_with_no_batch_dims_saveable, attention_out)}[name]


def vocab_table(config: DecoderConfig, params: Params, num_rows: int) -> Array:
  """``[num_rows, E]``: the output layer's rows for ids ``[0, num_rows)``.

  The tied embedding's rows, or ``logits_dense``'s kernel transposed;
  logits are ``h @ table.T`` (``vocab_projection``). ``params`` unboxed.
  """
  if config.tie_embeddings:
    return params["token_embedder"]["embedding"][:num_rows]
  return jnp.swapaxes(params["logits_dense"]["kernel"][:, :num_rows], 0, 1)


def vocab_projection(config: DecoderConfig, params: Params, num_rows: int
                     ) -> Callable[[Array], Array]:
  """The output layer for the first ``num_rows`` vocabulary ids, as a function.

  ``h [..., E] -> float32 logits [..., num_rows]``, the same product as the
  decoder's own last step (tied embedding or ``logits_dense``, in
  ``logits_via_embedding_dtype``) restricted to ids ``[0, num_rows)``, e.g.
  ``layout.real_size`` to leave the rounding ids out. ``params`` unboxed.
  """
  table = vocab_table(config, params, num_rows)
  dtype = config.logits_dtype

  def project(hidden: Array) -> Array:
    logits = jnp.einsum("...e,ve->...v", hidden.astype(dtype), table.astype(dtype),
                        preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, LOGITS_AXES[-logits.ndim:])
  return project


def _as_model(config_or_model: Union[DecoderConfig, Decoder]) -> Decoder:
  if isinstance(config_or_model, Decoder):
    return config_or_model
  if isinstance(config_or_model, DecoderConfig):
    return Decoder(config_or_model)
  raise TypeError(f"expected a DecoderConfig or Decoder, got {type(config_or_model).__name__}")


def init_params(config_or_model: Union[DecoderConfig, Decoder], rng: Array) -> Params:
  """Fresh parameters, still boxed in ``nn.LogicallyPartitioned``.

  Boxed so that ``partitioning.abstract_state`` can read the logical axes;
  ``nn.meta.unbox`` gives plain arrays. The parameters do not depend on
  ``attention_implementation``, so the init pass runs the portable "einsum"
  attention: a model configured for a GPU or TPU kernel (cuDNN, splash) is
  initialised, and its state shapes derived, on any backend.
  """
  config = _as_model(config_or_model).config
  return _jitted_init_params(Decoder(config.replace(attention_implementation="einsum")), rng)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_init_params(model: Decoder, rng: Array) -> Params:
  return model.init({"params": rng}, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_cache(config_or_model: Union[DecoderConfig, Decoder], batch_size: int,
                   max_length: int) -> Cache:
  """Shapes/dtypes of the cache, boxed with its logical axes (for shardings)."""
  model = _as_model(config_or_model)
  cfg = model.config
  if batch_size < 1 or max_length < 1:
    raise ValueError(
        f"init_cache: batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
  if cfg.position == "learned" and max_length > cfg.max_length:
    raise ValueError(
        f"init_cache: max_length={max_length} exceeds DecoderConfig.max_length="
        f"{cfg.max_length}, the number of learned position embeddings")
  tokens = jax.ShapeDtypeStruct((batch_size, max_length), jnp.int32)
  variables = jax.eval_shape(
      lambda t: model.init({"params": jax.random.key(0)}, t, decode=True), tokens)
  return variables["cache"]


def _strip_boxes(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def init_cache(config_or_model: Union[DecoderConfig, Decoder], batch_size: int,
               max_length: int) -> Cache:
  """An empty cache: per layer ``cached_key/cached_value [B, max_length, H, D]``
  (stacked ``[num_layers, ...]`` under ``scan_layers``) and ``cache_index [B]``,
  all zeros. Jit it with ``out_shardings`` from ``abstract_cache`` to place it
  sharded."""
  shapes = _strip_boxes(abstract_cache(config_or_model, batch_size, max_length))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _check_concrete_lengths(lengths: Array, prompt_length: int, where: str) -> None:
  if isinstance(lengths, jax.core.Tracer):
    return
  values = np.asarray(lengths)
  if values.size and (values.min() < 1 or values.max() > prompt_length):
    raise ValueError(
        f"{where}: lengths must lie in [1, {prompt_length}], got {values.tolist()}")


PREFILL_LOGITS = ("all", "last")


def prefill(config_or_model: Union[DecoderConfig, Decoder], params: Params, cache: Cache,
            prompt_tokens: Array, prompt_lengths: Array, *,
            logits: str = "all") -> tuple[Array, Cache]:
  """Runs right-padded prompts ``[B, P]`` once and fills the cache.

  Keys/values of positions ``< prompt_lengths[b]`` go to slots ``[0, P)`` (the
  rest are zeroed and never attended) and ``cache_index`` becomes
  ``prompt_lengths``.

  ``logits="all"`` returns the logits of every prompt position ``[B, P, V]``
  (the next-token logits are ``last_logits(logits, prompt_lengths)``);
  ``logits="last"`` returns only those next-token logits ``[B, V]``, the
  output projection computed at position ``prompt_lengths[b] - 1`` alone
  (what decoding needs: no ``[B, P, V]`` buffer, ``1/P`` of its FLOPs).
  """
  if logits not in PREFILL_LOGITS:
    raise ValueError(f"prefill: logits must be one of {PREFILL_LOGITS}, got {logits!r}")
  model = _as_model(config_or_model)
  prompt_tokens = jnp.asarray(prompt_tokens)
  if prompt_tokens.ndim != 2:
    raise ValueError(f"prefill: prompt_tokens must be [batch, length], got {prompt_tokens.shape}")
  _check_concrete_lengths(prompt_lengths, prompt_tokens.shape[1], "prefill")
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  positions = jnp.maximum(prompt_lengths - 1, 0) if logits == "last" else None
  out, updated = model.apply({"params": params, "cache": cache}, prompt_tokens,
                             prefill=True, prefill_lengths=prompt_lengths,
                             logits_positions=positions, mutable=["cache"])
  return (out[:, 0] if logits == "last" else out), updated["cache"]


def decode_step(config_or_model: Union[DecoderConfig, Decoder], params: Params, cache: Cache,
                tokens: Array) -> tuple[Array, Cache]:
  """Feeds one token per row (``tokens [B]``) at position ``cache_index[b]``.

  Returns the next-token logits ``[B, V]`` and the cache with the token's
  keys/values written and ``cache_index`` incremented. Rows whose cache is
  full get NaN logits.
  """
  model = _as_model(config_or_model)
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"decode_step: tokens must be [batch], got shape {tokens.shape}")
  logits, updated = model.apply({"params": params, "cache": cache}, tokens[:, None],
                                decode=True, mutable=["cache"])
  return logits[:, 0], updated["cache"]


def restrict_vocab(config_or_model: Union[DecoderConfig, Decoder], params: Params,
                   vocab_size: int) -> tuple[Decoder, Params]:
  """The same decoder over the ids ``[0, vocab_size)`` only.

  Returns a ``Decoder`` with ``config.vocab_size = vocab_size`` and params
  whose token embedding keeps its first ``vocab_size`` rows (and an untied
  ``logits_dense`` its first ``vocab_size`` columns); the rest is shared. It
  reads only ids below ``vocab_size`` (others embed as NaN) and its logits
  are the first ``vocab_size`` columns of the full decoder's. For KV-cache
  decode steps that only ever feed and score text ids: slice once, outside
  the decoding loop, and every step projects onto ``vocab_size`` rows (a
  slice taken inside the loop would be copied at every step). The cache is
  the full decoder's.

  ``restrict_vocab(config, params, 3)`` on ``V = 5``, ``E = 2``::

    embedding [[a0, a1], [b0, b1], [c0, c1], [d0, d1], [e0, e1]]
           -> [[a0, a1], [b0, b1], [c0, c1]]
  """
  model = _as_model(config_or_model)
  cfg = model.config
  if not 0 < vocab_size <= cfg.vocab_size:
    raise ValueError(
        f"restrict_vocab: vocab_size must lie in [1, {cfg.vocab_size}], got {vocab_size}")
  params = dict(params)
  embedder = dict(params["token_embedder"])
  embedder["embedding"] = embedder["embedding"][:vocab_size]
  params["token_embedder"] = embedder
  if not cfg.tie_embeddings:
    dense = dict(params["logits_dense"])
    dense["kernel"] = dense["kernel"][:, :vocab_size]
    params["logits_dense"] = dense
  return Decoder(cfg.replace(vocab_size=vocab_size)), params


def last_logits(logits: Array, lengths: Array) -> Array:
  """``logits [B, L, V]`` at position ``lengths[b] - 1`` of each row: ``[B, V]``."""
  _check_concrete_lengths(lengths, logits.shape[1], "last_logits")
  index = jnp.maximum(jnp.asarray(lengths, jnp.int32) - 1, 0)
  return jnp.take_along_axis(logits, index[:, None, None], axis=1)[:, 0]


def _stack(arrays: Sequence[Any]) -> Any:
  if all(isinstance(x, np.ndarray) for x in arrays):
    return np.stack(arrays)
  return jnp.stack(arrays)


def stack_layer_params(params: Params, num_layers: int) -> Params:
  """Plain-stack params (``layers_0..layers_{n-1}``) -> scanned (``layers``).

  Each leaf of ``layers`` is the layers' leaves stacked on a new leading
  axis: ``layers_0/mlp/wi/kernel [E, M]``, ``layers_1/...`` ->
  ``layers/mlp/wi/kernel [2, E, M]``. Host (NumPy) leaves stay on the host;
  ``unstack_layer_params`` is the inverse.
  """
  params = dict(params)
  missing = [f"layers_{i}" for i in range(num_layers) if f"layers_{i}" not in params]
  if missing:
    raise ValueError(f"stack_layer_params: params lack {missing}")
  per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: _stack(xs), *per_layer)
  return params


def unstack_layer_params(params: Params, num_layers: int) -> Params:
  """Scanned params (``layers`` with a leading layer axis) -> plain stack."""
  params = dict(params)
  if "layers" not in params:
    raise ValueError("unstack_layer_params: params lack 'layers'")
  stacked = params.pop("layers")
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
