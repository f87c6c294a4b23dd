"""SpeechTextLM: time masking with its own input-only id, and the KL count it sums over."""

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax import lm
from sld_jax import losses
from sld_jax.model.config import DecoderConfig
from sld_jax.vocab import VocabLayout

LAYOUT = VocabLayout(text_size=8, speech_size=4)   # <time_mask> = 13


def _tiny(**kwargs):
  return lm.SpeechTextLM(
      LAYOUT, decoder=lambda vocab_size: DecoderConfig(
          vocab_size=vocab_size, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32,
          max_length=16, dropout_rate=0.0), **kwargs)


def _batch():
  targets = np.array([[9, 10, 12, 8, 5, 1, 11, 8, 4, 1, 0, 0]], np.int32)
  inputs = np.array([[0, 9, 10, 12, 8, 5, 0, 11, 8, 4, 0, 0]], np.int32)
  segments = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]], np.int32)
  positions = np.array([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 0]], np.int32)
  return {"decoder_target_tokens": targets, "decoder_input_tokens": inputs,
          "decoder_loss_weights": (targets > 0).astype(np.int32),
          "decoder_segment_ids": segments, "decoder_positions": positions}


def test_time_mask_uses_the_mask_id_on_real_tokens_only():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, LAYOUT.real_size, (64, 64)),
                       jnp.int32)
  masked = np.asarray(lm.time_mask(tokens, jax.random.key(0), 0.3, LAYOUT.mask_id))
  changed = masked != np.asarray(tokens)
  assert np.all(masked[changed] == LAYOUT.mask_id)
  assert np.all(np.asarray(tokens)[masked == LAYOUT.eos_id] == LAYOUT.eos_id)  # never made
  assert not np.any(changed & (np.asarray(tokens) == 0))
  assert abs(changed.sum() / (np.asarray(tokens) > 0).sum() - 0.3) < 0.03


def test_training_loss_feeds_the_mask_id_and_keeps_targets():
  """loss_fn(rng) == the loss of the inputs masked with <time_mask> (not <text_end>)."""
  model = _tiny(time_mask_prob=0.5, loss_config=losses.LossConfig(method="multimodal_ce"))
  params = model.init_params(jax.random.key(1))
  params = nn.meta.unbox(params)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  rng = jax.random.key(7)
  loss, _ = model.loss_fn(params, batch, rng)

  def loss_with(replacement):
    inputs = lm.time_mask(batch["decoder_input_tokens"], jax.random.fold_in(rng, 1), 0.5,
                          replacement)
    logits = model.logits(params, batch, input_tokens=inputs)
    return losses.compute_loss_from_config(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
        batch["decoder_segment_ids"], LAYOUT, model.loss_config)[0]

  masked = lm.time_mask(batch["decoder_input_tokens"], jax.random.fold_in(rng, 1), 0.5,
                        LAYOUT.mask_id)
  assert int(jnp.sum(masked == LAYOUT.mask_id)) > 0
  np.testing.assert_allclose(loss, loss_with(LAYOUT.mask_id), rtol=1e-6)
  assert abs(float(loss) - float(loss_with(LAYOUT.eos_id))) > 1e-4
  old = _tiny(time_mask_prob=0.5, time_mask_symbol="text_end",
              loss_config=losses.LossConfig(method="multimodal_ce"))
  np.testing.assert_allclose(old.loss_fn(params, batch, rng)[0], loss_with(LAYOUT.eos_id),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="time_mask_symbol must be one of"):
    _tiny(time_mask_symbol="pad")


@pytest.mark.parametrize("method", ["sld", "multimodal_ce", "loss_masking"])
@pytest.mark.parametrize("kl_target", ["paper", "reference"])
@pytest.mark.parametrize("kl_normalization", ["sequence", "token"])
def test_sums_and_counts_follow_the_kl_normalisation(method, kl_target, kl_normalization):
  """The reported loss (rebuilt from summed metrics) is the objective, for
  every objective; the counts are those of the KL normalisation."""
  model = _tiny(loss_config=losses.LossConfig(method=method, kl_target=kl_target,
                                              kl_normalization=kl_normalization))
  params = nn.meta.unbox(model.init_params(jax.random.key(2)))
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  loss, aux = model.loss_fn(params, batch)
  counts = model.target_counts(batch)
  for name in lm.COUNTS:
    assert int(counts[name]) == int(aux[name]), name
  assert int(counts["num_kl_positions"]) == (4 if kl_target == "paper" else 10)
  back = model.from_sums(model.to_sums(aux))
  np.testing.assert_allclose(back["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(back["kl_speech"], aux["kl_speech"], rtol=1e-6)


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_dropout_rng_impl_draws_reproducible_masks_of_its_own(impl):
  """One key, one loss; another key, another; evaluation never draws."""
  def model(rng_impl):
    return lm.SpeechTextLM(LAYOUT, decoder=lambda vocab_size: DecoderConfig(
        vocab_size=vocab_size, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32,
        max_length=16, dropout_rate=0.5), dropout_rng_impl=rng_impl)

  threefry, other = model("threefry2x32"), model(impl)
  params = nn.meta.unbox(threefry.init_params(jax.random.key(1)))
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  loss = jax.jit(other.loss_fn)
  first, again, second = (float(loss(params, batch, jax.random.key(k))[0]) for k in (3, 3, 4))
  assert first == again and first != second
  assert first != float(threefry.loss_fn(params, batch, jax.random.key(3))[0])
  np.testing.assert_allclose(other.loss_fn(params, batch)[0], threefry.loss_fn(params, batch)[0],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="dropout_rng_impl must be one of"):
    model("philox")
