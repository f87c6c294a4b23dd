"""``SpeechTextLM``: the decoder, its objective and the features it reads.

The model wrapper between the network (``sld_jax.model.decoder.Decoder``) and
the trainer, in the t5x spirit: it owns the loss function, the input
corruption used in training, and the contract on batches (seqio decoder
features, see ``sld_jax.input_pipeline``).

Time masking (the released code's input corruption): during training each
*input* token is replaced by ``<time_mask>`` (``layout.mask_id``, the first
id past the real vocabulary: an input-only symbol, distinct from
``<text_end>``, see ``sld_jax.vocab``) with probability ``time_mask_prob``;
targets, weights, segments and positions are unchanged, and only real tokens
(id > 0) are touched. With ``VocabLayout(text_size=8, speech_size=4)``
(mask id 13)::

  decoder_input_tokens  [ 0  9 10 12  8  5  0 11  8  4]
  coin < p              [ .  x  .  .  .  x  x  .  .  .]
  corrupted             [ 0 13 10 12  8 13  0 11  8  4]   (the 0s stay: BOS/padding)

Gradient accumulation splits a batch into microbatches whose gradients add
up to the gradient of the whole batch: every objective is a sum of per-token
means (``ce_text``, ``ce_speech``, ``kl_speech``), and a microbatch's term is
weighted by its share of the term's tokens (``microbatch_objective``). So a
step does not depend on how it is split. Example: 3 text tokens in
microbatch 1 and 1 in microbatch 2::

  ce_text(batch) = 3/4 * ce_text(micro 1) + 1/4 * ce_text(micro 2)

A microbatch's objective is computed by the loss itself with the whole
batch's counts as denominators (``loss_fn(..., denominators=...)``), and its
gradient is the gradient of that returned loss: never of a loss rebuilt from
the metrics, which carry no gradient under ``loss_backward="in_forward"``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from sld_jax import cross_process
from sld_jax import decoding
from sld_jax import fused_loss
from sld_jax import losses
from sld_jax import model_inputs
from sld_jax.model import decoder as decoder_lib
from sld_jax.model import packed_attention
from sld_jax.model.config import DecoderConfig, decoder_config
from sld_jax.vocab import VocabLayout

Batch = Mapping[str, jax.Array]
TIME_MASK_SYMBOLS = ("time_mask", "text_end")
DROPOUT_RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
LOSS_BACKWARDS = ("recompute", "in_forward")
COUNTS = ("num_text_tokens", "num_speech_tokens", "num_unit_tokens", "num_kl_positions",
          "num_sequences", "num_target_tokens")
# Per-token means and the count each one is a mean over ("kl" is resolved
# from LossConfig.kl_normalization: sequences, or the KL positions).
MEANS = {"ce_text": "num_text_tokens", "accuracy_text": "num_text_tokens",
         "ce_speech": "num_speech_tokens", "accuracy_speech": "num_speech_tokens",
         "kl_speech": "kl"}


def time_mask(tokens: jax.Array, rng: jax.Array, prob: float,
              replacement: int) -> jax.Array:
  """Replaces each real (> 0) token by ``replacement`` with probability ``prob``.

  ``replacement`` is ``layout.mask_id`` in training (``SpeechTextLM.loss_fn``).
  """
  if prob <= 0.0:
    return tokens
  coin = jax.random.bernoulli(rng, prob, tokens.shape)
  return jnp.where(coin & (tokens > 0), jnp.asarray(replacement, tokens.dtype), tokens)


@gin.configurable
class SpeechTextLM:
  """Decoder-only speech-text LM with one of the three ASR objectives.

  Attributes:
    layout: the vocabulary layout of the data.
    config: the decoder's ``DecoderConfig`` (``vocab_size == layout.size``).
    loss_config: the objective (``sld_jax.losses.LossConfig``).
    time_mask_prob: input corruption probability in training (paper: 0.3).
    loss_chunk_size: None: the loss reads the decoder's ``[B, L, V]`` float32
      logits. An int C: the decoder returns its last hidden states and the
      loss projects them C positions at a time
      (``losses.compute_loss_chunked``): the same values, without ``[B, L, V]``
      logits in memory in either pass (what large vocabularies need).
    loss_backward: how the chunked loss gets its gradient. "recompute"
      (``losses.compute_loss_chunked``): the backward pass recomputes each
      chunk's logits. "in_forward" (``fused_loss.compute_loss_fused``): each
      chunk's gradient is made in the forward pass from the same logits, one
      ``[B, C, E] x [E, V]`` product fewer per chunk; only the loss carries a
      gradient (the metrics do not). Needs ``loss_chunk_size``.
    time_mask_symbol: "time_mask" (``layout.mask_id``, the default) or
      "text_end" (id 1, what sld_jax used before; kept to measure the
      difference, docs/paper-fidelity.md).
    dropout_rng_impl: the PRNG that draws dropout masks: "threefry2x32"
      (jax's default, the same masks on every backend) or "rbg" /
      "unsafe_rbg" (XLA's RngBitGenerator: on GPUs and TPUs several times
      cheaper per bit, which matters at 3 masks of ``[B, L, E]`` per layer;
      masks then depend on the backend). The dropout key is drawn from the
      step's key either way, so runs stay reproducible on one backend.
  """

  def __init__(self, layout: VocabLayout,
               decoder: Callable[..., DecoderConfig] = decoder_config,
               loss_config: Optional[losses.LossConfig] = None,
               time_mask_prob: float = 0.0, time_mask_symbol: str = "time_mask",
               loss_chunk_size: Optional[int] = None,
               loss_backward: str = "recompute",
               dropout_rng_impl: str = "threefry2x32"):
    """Builds the decoder config with ``decoder(vocab_size=layout.size)``.

    Args:
      layout: from the data source (``BatchSource.layout``).
      decoder: a ``DecoderConfig`` factory taking ``vocab_size``; in gin
        ``@decoder_config`` configured by ``gin_configs/models/*.gin``.
      loss_config: the objective; default ``LossConfig()`` (gin-configured).
      time_mask_prob: probability in [0, 1).
      time_mask_symbol: "time_mask" or "text_end" (the replacement id).
      loss_chunk_size: positions per chunk of the chunked loss, or None.
      loss_backward: "recompute" or "in_forward" (chunked loss only).
      dropout_rng_impl: "threefry2x32", "rbg" or "unsafe_rbg".
    """
    if not 0.0 <= time_mask_prob < 1.0:
      raise ValueError(f"SpeechTextLM.time_mask_prob must be in [0, 1), got {time_mask_prob}")
    if time_mask_symbol not in TIME_MASK_SYMBOLS:
      raise ValueError(f"SpeechTextLM.time_mask_symbol must be one of {TIME_MASK_SYMBOLS}, "
                       f"got {time_mask_symbol!r}")
    if dropout_rng_impl not in DROPOUT_RNG_IMPLS:
      raise ValueError(f"SpeechTextLM.dropout_rng_impl must be one of {DROPOUT_RNG_IMPLS}, "
                       f"got {dropout_rng_impl!r}")
    self.dropout_rng_impl = dropout_rng_impl
    self.layout = layout
    self.config = decoder(vocab_size=layout.size)
    if self.config.vocab_size != layout.size:
      raise ValueError(
          f"decoder vocab_size {self.config.vocab_size} != layout.size {layout.size}")
    self.loss_config = loss_config if loss_config is not None else losses.LossConfig()
    self.time_mask_prob = float(time_mask_prob)
    if loss_chunk_size is not None and (isinstance(loss_chunk_size, bool) or
                                        not isinstance(loss_chunk_size, int) or
                                        loss_chunk_size <= 0):
      raise ValueError(
          f"SpeechTextLM.loss_chunk_size must be None or a positive int, got {loss_chunk_size!r}")
    self.loss_chunk_size = loss_chunk_size
    if loss_backward not in LOSS_BACKWARDS:
      raise ValueError(f"SpeechTextLM.loss_backward must be one of {LOSS_BACKWARDS}, "
                       f"got {loss_backward!r}")
    if loss_backward == "in_forward" and loss_chunk_size is None:
      raise ValueError('SpeechTextLM.loss_backward="in_forward" needs loss_chunk_size '
                       "(the gradient is made one chunk of positions at a time)")
    self.loss_backward = loss_backward
    self.time_mask_id = layout.mask_id if time_mask_symbol == "time_mask" else layout.eos_id
    self.module = decoder_lib.Decoder(self.config)

  # -- parameters and logits -------------------------------------------------

  def init_params(self, rng: jax.Array) -> Any:
    """Fresh parameters, boxed with their logical axes (for sharding)."""
    return decoder_lib.init_params(self.module, rng)

  def logits(self, params: Any, batch: Batch, *, dropout_rng: Optional[jax.Array] = None,
             input_tokens: Optional[jax.Array] = None, return_hidden: bool = False
             ) -> jax.Array:
    """``[B, L, V]`` float32 logits; dropout on iff ``dropout_rng`` is given.

    ``return_hidden``: the decoder's final-norm outputs ``[B, L, E]`` instead.
    """
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    return self.module.apply(
        {"params": params},
        batch["decoder_input_tokens"] if input_tokens is None else input_tokens,
        batch.get("decoder_positions"), batch.get("decoder_segment_ids"),
        enable_dropout=dropout_rng is not None, return_hidden=return_hidden,
        decoder_segment_starts=batch.get("decoder_segment_starts"), rngs=rngs)

  # -- the objective ---------------------------------------------------------

  def loss_fn(self, params: Any, batch: Batch, rng: Optional[jax.Array] = None,
              denominators: Optional[Mapping[str, jax.Array]] = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of one batch; training mode iff ``rng`` is given.

    In training mode ``rng`` drives dropout and time masking (independent
    streams folded from it); without it the model runs deterministically on
    the clean inputs (evaluation). ``denominators``: None, or the counts
    (``target_counts`` of a larger batch) that the summed terms are divided
    by instead of this batch's (``losses.loss_coefficients``).

    Returns:
      ``(loss, aux)``: ``losses.compute_loss`` for the configured objective;
      aux also has ``num_target_tokens`` (tokens with weight > 0).
    """
    inputs = batch["decoder_input_tokens"]
    dropout_rng = None
    if rng is not None:
      dropout_rng = self._dropout_key(jax.random.fold_in(rng, 0))
      inputs = time_mask(inputs, jax.random.fold_in(rng, 1), self.time_mask_prob,
                         self.time_mask_id)
    if self.loss_chunk_size is None:
      logits = self.logits(params, batch, dropout_rng=dropout_rng, input_tokens=inputs)
      loss, aux = losses.compute_loss(
          logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
          batch.get("decoder_segment_ids"), layout=self.layout,
          **self.loss_config.knobs(), denominators=denominators)
    else:
      hidden = self.logits(params, batch, dropout_rng=dropout_rng, input_tokens=inputs,
                           return_hidden=True)
      loss, aux = self.chunked_loss(params, hidden, batch, denominators)
    aux = dict(aux, num_target_tokens=jnp.sum(batch["decoder_loss_weights"] > 0))
    return loss, aux

  def chunked_loss(self, params: Any, hidden: jax.Array, batch: Batch,
                   denominators: Optional[Mapping[str, jax.Array]] = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The output projection and loss from the decoder's final hidden states
    ``[B, L, E]``, ``loss_chunk_size`` positions at a time (``loss_backward``
    decides how its gradient is made); ``loss_fn``'s last part, on its own so
    that it can be timed alone (``benchmarks/accelerator_step.py --breakdown``).
    """
    if self.loss_chunk_size is None:
      raise ValueError("SpeechTextLM.chunked_loss needs loss_chunk_size")
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    segment_ids = batch.get("decoder_segment_ids")
    knobs = dict(self.loss_config.knobs(), denominators=denominators)
    # The whole table (layout.size rows, a multiple of 128): the products keep
    # an aligned width, and the loss leaves the rounding ids out.
    rows = self.layout.size
    if self.loss_backward == "in_forward":
      table = decoder_lib.vocab_table(self.config, params, rows)
      return fused_loss.compute_loss_fused(
          hidden, table, targets, weights, segment_ids, layout=self.layout,
          chunk_size=self.loss_chunk_size, logits_dtype=self.config.logits_dtype, **knobs)
    project = decoder_lib.vocab_projection(self.config, params, rows)
    return losses.compute_loss_chunked(
        hidden, project, targets, weights, segment_ids, layout=self.layout,
        chunk_size=self.loss_chunk_size, **knobs)

  def _dropout_key(self, key: jax.Array) -> jax.Array:
    """``key`` itself (threefry), or a key of ``dropout_rng_impl`` drawn from it."""
    if self.dropout_rng_impl == "threefry2x32":
      return key
    shape = jax.eval_shape(
        lambda: jax.random.key_data(jax.random.key(0, impl=self.dropout_rng_impl))).shape
    return jax.random.wrap_key_data(jax.random.bits(key, shape, jnp.uint32),
                                    impl=self.dropout_rng_impl)

  def combine(self, means: Mapping[str, jax.Array]) -> jax.Array:
    """The objective from its per-token means (the sum ``compute_loss`` returns)."""
    return losses.combine(self.loss_config.method, self.loss_config.alpha, means["ce_text"],
                          means["ce_speech"], means["kl_speech"])

  def _count_of(self, mean_name: str) -> str:
    count = MEANS[mean_name]
    return losses.kl_count_name(self.loss_config.kl_normalization) if count == "kl" else count

  def target_counts(self, batch: Batch) -> dict[str, jax.Array]:
    """The token / sequence counts ``loss_fn`` would report, without the model."""
    weights = batch["decoder_loss_weights"]
    counts = losses.token_counts(batch["decoder_target_tokens"], weights,
                                 batch.get("decoder_segment_ids"), layout=self.layout,
                                 kl_target=self.loss_config.kl_target)
    return dict(counts, num_target_tokens=jnp.sum(weights > 0))

  def to_sums(self, aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-token means -> sums (``mean * count``); counts kept as they are.

    Sums add up over microbatches and batches; ``from_sums`` turns them back.
    """
    out = {name: aux[name] for name in COUNTS}
    for name in MEANS:
      out[name] = aux[name] * aux[self._count_of(name)].astype(jnp.float32)
    return out

  def from_sums(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums from ``to_sums`` (added over batches) -> means and the objective."""
    out = {name: sums[name] for name in COUNTS}
    for name in MEANS:
      out[name] = sums[name] / jnp.maximum(sums[self._count_of(name)], 1).astype(jnp.float32)
    out["loss"] = self.combine(out)
    return out

  def microbatch_objective(self, params: Any, batch: Batch, rng: Optional[jax.Array],
                           totals: Mapping[str, jax.Array]
                           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """This microbatch's share of the whole batch's objective, and its sums.

    ``totals`` are the counts of the whole batch (``target_counts``). Summed
    over the microbatches of a batch, the objectives (and so the gradients)
    equal those of ``loss_fn`` on the whole batch, up to rounding.
    """
    objective, aux = self.loss_fn(params, batch, rng, denominators=totals)
    return objective, self.to_sums(aux)

  def host_features(self, host_batch: Mapping[str, Any], slots: Optional[int] = None
                    ) -> Mapping[str, Any]:
    """``host_batch`` plus what the configured attention reads from the host.

    ``attention_implementation="cudnn_packed"`` on packed rows:
    ``decoder_segment_starts [B, slots + 1]``
    (``packed_attention.host_segment_starts``). ``slots``: None, the rows'
    most segments rounded up (``packed_attention.slots_for``, by
    ``DecoderConfig.segment_slot_multiple``) and agreed by
    all processes (the largest of theirs); or a fixed count covering every
    row, e.g. one executable for many batches. Otherwise, or when the batch
    has the feature already or holds shapes only, ``host_batch`` itself.
    """
    segment_ids = host_batch.get("decoder_segment_ids")
    if (self.config.attention_implementation != "cudnn_packed" or segment_ids is None
        or isinstance(segment_ids, jax.ShapeDtypeStruct)
        or "decoder_segment_starts" in host_batch):
      return host_batch
    segment_ids = np.asarray(segment_ids)
    if slots is None:
      slots = packed_attention.slots_for(packed_attention.host_segment_count(segment_ids),
                                         self.config.segment_slot_multiple)
      slots = int(cross_process.all_max(slots))
    return dict(host_batch,
                decoder_segment_starts=packed_attention.host_segment_starts(segment_ids, slots))

  # -- the data contract -----------------------------------------------------

  def check_batch(self, batch: Mapping[str, np.ndarray], sequence_length: Optional[int] = None,
                  where: str = "batch") -> None:
    """Host-side check of feature names, dtypes, shapes and id ranges.

    Raises:
      ValueError: naming the feature and what is wrong.
    """
    missing = [name for name in model_inputs.REQUIRED_FEATURES if name not in batch]
    unknown = [name for name in batch if name not in model_inputs.FEATURES]
    if missing or unknown:
      raise ValueError(
          f"{where}: features {sorted(batch)}; missing {missing}, unexpected {unknown} "
          f"(SpeechTextLM reads {model_inputs.FEATURES})")
    shape = np.shape(batch["decoder_target_tokens"])
    for name, value in batch.items():
      value = np.asarray(value)
      if value.ndim != 2 or value.shape != shape:
        raise ValueError(f"{where}: {name} has shape {value.shape}, expected [batch, length] "
                         f"= {shape} like decoder_target_tokens")
      if not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"{where}: {name} must be integers, got {value.dtype}")
    if sequence_length is not None and shape[1] != sequence_length:
      raise ValueError(f"{where}: rows have {shape[1]} tokens, expected {sequence_length}")
    if self.config.position == "learned" and shape[1] > self.config.max_length:
      raise ValueError(
          f"{where}: rows have {shape[1]} tokens but the decoder has "
          f"{self.config.max_length} learned positions (DecoderConfig.max_length)")
    for name in ("decoder_input_tokens", "decoder_target_tokens"):
      self.layout.check_ids(batch[name], f"{where}: {name}")

  # -- prediction and scoring of batches (t5x BaseModel.predict_batch / score_batch) --

  def predict_batch(self, params: Any, prompt_tokens: jax.Array, prompt_lengths: jax.Array, *,
                    max_decode_length: int, method: str = "greedy", beam_size: int = 4,
                    length_penalty: float = 0.0,
                    constrain_cache: Optional[Callable[[Any, int, int], Any]] = None
                    ) -> decoding.DecodeResult:
    """Transcripts of right-padded prompts; needs no reference.

    A prompt is what training fed the model before the transcript
    (``seqio.DecoderFeatureConverter`` shifts targets right, so inputs start
    with 0)::

      prompt_tokens  [[0, 18, 15, 14, 0, 0],     prompt_lengths [4, 3]
                      [0, 16, 14,  0, 0, 0]]     (layout text_size=14: <speech_end>=14)

    The KV cache holds ``min(max_length, P + max_decode_length)`` positions
    and row ``b`` may emit ``min(max_decode_length, cache - prompt_lengths[b])``
    tokens, so a row's transcript never depends on the other rows. Jittable;
    ``constrain_cache(cache, batch, cache_length)`` (e.g. a sharding
    constraint) is applied to the fresh cache.
    """
    batch, width = prompt_tokens.shape
    cache_length = min(self.config.max_length, width + max_decode_length)
    cache = decoder_lib.init_cache(self.module, batch, cache_length)
    if constrain_cache is not None:
      cache = constrain_cache(cache, batch, cache_length)
    steps = min(max_decode_length, cache_length - 1)
    return decoding.decode(
        *decoding.cached_fns(self.module, params, self.layout), cache, prompt_tokens,
        prompt_lengths, layout=self.layout, max_decode_length=steps, method=method,
        beam_size=beam_size, alpha=length_penalty,
        budgets=jnp.minimum(steps, cache_length - prompt_lengths),
        cache_batch_axes=decoding.decoder_cache_batch_axes(self.module, batch, cache_length))

  def score_batch(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    """Teacher-forced scores of a batch of whole sequences (one forward pass).

    Returns:
      ``sums``: the batch's ``to_sums`` (add over batches, ``from_sums``);
      ``transcript_logprob`` [B]: log p of each row's text targets
      (<text_end> included) under the full softmax over the real ids;
      ``transcript_tokens`` [B]: how many there are.
    """
    layout = self.layout
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    logits = self.logits(params, batch)
    _, aux = losses.compute_loss_from_config(
        logits, targets, weights, batch.get("decoder_segment_ids"), layout, self.loss_config)
    aux = dict(aux, num_target_tokens=jnp.sum(weights > 0))
    nll = losses.token_terms(logits[..., :layout.real_size], targets, layout,
                             with_kl=False)["nll"]
    text = (weights > 0) & layout.is_text(targets)
    return {"sums": self.to_sums(aux),
            "transcript_logprob": -jnp.sum(jnp.where(text, nll, 0.0), axis=1),
            "transcript_tokens": jnp.sum(text, axis=1)}
