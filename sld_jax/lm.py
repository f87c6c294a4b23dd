"""``SpeechTextLM``: the decoder, its objective and the features it reads.

The model wrapper between the network (``sld_jax.model.decoder.Decoder``) and
the trainer, in the t5x spirit: it owns the loss function, the input
corruption used in training, and the contract on batches (seqio decoder
features, see ``sld_jax.input_pipeline``).

Time masking (the released code's input corruption): during training each
*input* token is replaced by ``<text_end>`` (EOS, id 1) with probability
``time_mask_prob``; targets, weights, segments and positions are unchanged,
and only real tokens (id > 0) are touched::

  decoder_input_tokens  [ 0  9 10 12  8  5  0 11  8  4]
  coin < p              [ .  x  .  .  .  x  x  .  .  .]
  corrupted             [ 0  1 10 12  8  1  0 11  8  4]   (the 0s stay: BOS/padding)

Gradient accumulation splits a batch into microbatches whose gradients add
up to the gradient of the whole batch: every objective is a sum of per-token
means (``ce_text``, ``ce_speech``, ``kl_speech``), and a microbatch's term is
weighted by its share of the term's tokens (``microbatch_objective``). So a
step does not depend on how it is split. Example: 3 text tokens in
microbatch 1 and 1 in microbatch 2::

  ce_text(batch) = 3/4 * ce_text(micro 1) + 1/4 * ce_text(micro 2)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from sld_jax import losses
from sld_jax.model import decoder as decoder_lib
from sld_jax.model.config import DecoderConfig, decoder_config
from sld_jax.vocab import VocabLayout

Batch = Mapping[str, jax.Array]
REQUIRED_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
OPTIONAL_FEATURES = ("decoder_segment_ids", "decoder_positions")
COUNTS = ("num_text_tokens", "num_speech_tokens", "num_unit_tokens", "num_sequences",
          "num_target_tokens")
# Per-token means and the count each one is a mean over ("kl" is resolved
# from the KL target: units for "paper", sequences for "reference").
MEANS = {"ce_text": "num_text_tokens", "accuracy_text": "num_text_tokens",
         "ce_speech": "num_speech_tokens", "accuracy_speech": "num_speech_tokens",
         "kl_speech": "kl"}


def time_mask(tokens: jax.Array, rng: jax.Array, prob: float,
              replacement: int = 1) -> jax.Array:
  """Replaces each real (> 0) token by ``replacement`` with probability ``prob``."""
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
  """

  def __init__(self, layout: VocabLayout,
               decoder: Callable[..., DecoderConfig] = decoder_config,
               loss_config: Optional[losses.LossConfig] = None,
               time_mask_prob: float = 0.0,
               loss_chunk_size: Optional[int] = None):
    """Builds the decoder config with ``decoder(vocab_size=layout.size)``.

    Args:
      layout: from the data source (``BatchSource.layout``).
      decoder: a ``DecoderConfig`` factory taking ``vocab_size``; in gin
        ``@decoder_config`` configured by ``gin_configs/models/*.gin``.
      loss_config: the objective; default ``LossConfig()`` (gin-configured).
      time_mask_prob: probability in [0, 1).
      loss_chunk_size: positions per chunk of the chunked loss, or None.
    """
    if not 0.0 <= time_mask_prob < 1.0:
      raise ValueError(f"SpeechTextLM.time_mask_prob must be in [0, 1), got {time_mask_prob}")
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
        enable_dropout=dropout_rng is not None, return_hidden=return_hidden, rngs=rngs)

  # -- the objective ---------------------------------------------------------

  def loss_fn(self, params: Any, batch: Batch, rng: Optional[jax.Array] = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of one batch; training mode iff ``rng`` is given.

    In training mode ``rng`` drives dropout and time masking (independent
    streams folded from it); without it the model runs deterministically on
    the clean inputs (evaluation).

    Returns:
      ``(loss, aux)``: ``losses.compute_loss`` for the configured objective;
      aux also has ``num_target_tokens`` (tokens with weight > 0).
    """
    inputs = batch["decoder_input_tokens"]
    dropout_rng = None
    if rng is not None:
      dropout_rng = jax.random.fold_in(rng, 0)
      inputs = time_mask(inputs, jax.random.fold_in(rng, 1), self.time_mask_prob,
                         self.layout.eos_id)
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    segment_ids = batch.get("decoder_segment_ids")
    if self.loss_chunk_size is None:
      logits = self.logits(params, batch, dropout_rng=dropout_rng, input_tokens=inputs)
      loss, aux = losses.compute_loss_from_config(
          logits, targets, weights, segment_ids, self.layout, self.loss_config)
    else:
      hidden = self.logits(params, batch, dropout_rng=dropout_rng, input_tokens=inputs,
                           return_hidden=True)
      project = decoder_lib.vocab_projection(self.config, params, self.layout.real_size)
      loss, aux = losses.compute_loss_chunked(
          hidden, project, targets, weights, segment_ids, layout=self.layout,
          chunk_size=self.loss_chunk_size, **self.loss_config.knobs())
    aux = dict(aux, num_target_tokens=jnp.sum(batch["decoder_loss_weights"] > 0))
    return loss, aux

  def combine(self, means: Mapping[str, jax.Array]) -> jax.Array:
    """The objective from its per-token means (the sum ``compute_loss`` returns)."""
    method = self.loss_config.method
    if method == "loss_masking":
      return means["ce_text"]
    if method == "multimodal_ce":
      return means["ce_text"] + means["ce_speech"]
    return means["ce_text"] + means["ce_speech"] + self.loss_config.alpha * means["kl_speech"]

  def _count_of(self, mean_name: str) -> str:
    count = MEANS[mean_name]
    if count == "kl":
      return "num_unit_tokens" if self.loss_config.kl_target == "paper" else "num_sequences"
    return count

  def target_counts(self, batch: Batch) -> dict[str, jax.Array]:
    """The token / sequence counts ``loss_fn`` would report, without the model."""
    targets = batch["decoder_target_tokens"]
    weighted = batch["decoder_loss_weights"] > 0
    return {
        "num_text_tokens": jnp.sum(weighted & self.layout.is_text(targets)),
        "num_speech_tokens": jnp.sum(weighted & self.layout.is_speech(targets)),
        "num_unit_tokens": jnp.sum(weighted & self.layout.is_unit(targets)),
        "num_sequences": losses._count_sequences(  # pylint: disable=protected-access
            weighted, batch.get("decoder_segment_ids")),
        "num_target_tokens": jnp.sum(weighted),
    }

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
    _, aux = self.loss_fn(params, batch, rng)
    sums = self.to_sums(aux)
    shares = {name: sums[name] / jnp.maximum(totals[self._count_of(name)], 1).astype(jnp.float32)
              for name in MEANS}
    return self.combine(shares), sums

  # -- the data contract -----------------------------------------------------

  def check_batch(self, batch: Mapping[str, np.ndarray], sequence_length: Optional[int] = None,
                  where: str = "batch") -> None:
    """Host-side check of feature names, dtypes, shapes and id ranges.

    Raises:
      ValueError: naming the feature and what is wrong.
    """
    missing = [name for name in REQUIRED_FEATURES if name not in batch]
    unknown = [name for name in batch if name not in REQUIRED_FEATURES + OPTIONAL_FEATURES]
    if missing or unknown:
      raise ValueError(
          f"{where}: features {sorted(batch)}; missing {missing}, unexpected {unknown} "
          f"(SpeechTextLM reads {REQUIRED_FEATURES + OPTIONAL_FEATURES})")
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
      losses.check_target_ids(batch[name], self.layout, f"{where}: {name}")
