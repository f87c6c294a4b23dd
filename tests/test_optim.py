"""Schedules, the weight-decay mask and the AdamW update (sld_jax/optim.py)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sld_jax import optim
from sld_jax.model import decoder as decoder_lib
from sld_jax.model.config import DecoderConfig
from sld_jax.train_state import TrainState


def _values(schedule, steps):
  return np.array([float(schedule(step)) for step in steps])


def test_linear_decay_without_warmup_is_the_paper_schedule():
  schedule = optim.learning_rate_schedule(total_steps=4, kind="linear", peak_value=1.0)
  np.testing.assert_allclose(_values(schedule, range(6)), [1, .75, .5, .25, 0, 0], atol=1e-7)


def test_linear_warmup_then_decay():
  schedule = optim.learning_rate_schedule(total_steps=4, kind="linear", peak_value=1.0,
                                          warmup_steps=2)
  np.testing.assert_allclose(_values(schedule, range(5)), [0, .5, 1, .5, 0], atol=1e-7)


def test_warmup_cosine_reaches_end_value():
  schedule = optim.learning_rate_schedule(total_steps=12, kind="cosine", peak_value=2.0,
                                          warmup_steps=2, end_value=0.2)
  values = _values(schedule, range(13))
  np.testing.assert_allclose(values[:3], [0, 1, 2], atol=1e-6)
  # Half-way through the decay: (peak + end) / 2.
  np.testing.assert_allclose(values[7], 1.1, atol=1e-6)
  np.testing.assert_allclose(values[12], 0.2, atol=1e-6)
  assert np.all(np.diff(values[2:]) <= 1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="step"), "kind"),
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_steps=20), "warmup_steps"),
])
def test_bad_schedule_arguments_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.learning_rate_schedule(**{"total_steps": 10, **kwargs})


def test_weight_decay_mask_follows_gpt2_convention_on_decoder_params():
  config = DecoderConfig(vocab_size=128, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32,
                         max_length=8)
  boxed = jax.eval_shape(functools.partial(decoder_lib.init_params, config),
                         jax.random.key(0))
  for params in (boxed, nn.meta.unbox(boxed)):
    mask = optim.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(path): value
            for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = {k for k, v in flat.items() if v}
    kept = {k for k, v in flat.items() if not v}
    assert any("token_embedder" in k for k in decayed)
    assert any("position_embedder" in k for k in decayed)
    assert all("kernel" in k or "embedding" in k for k in decayed), decayed
    assert all(k.split("]")[-2].endswith(("'bias'", "'scale'")) for k in kept), kept
    assert any("final_norm" in k for k in kept) and any("query" in k for k in kept)


def test_weight_decay_mask_reads_stacked_layer_names():
  # Scanned layers stack biases into 2-D arrays; the mask goes by name.
  params = {"layers": {"mlp": {"wi": {"kernel": jnp.ones((2, 4, 8)), "bias": jnp.ones((2, 8))}},
                       "pre_mlp_norm": {"scale": jnp.ones((2, 4))}}}
  mask = optim.weight_decay_mask(params)
  assert mask["layers"]["mlp"]["wi"] == {"kernel": True, "bias": False}
  assert mask["layers"]["pre_mlp_norm"]["scale"] is False


def test_adamw_step_matches_hand_computation():
  params = {"dense": {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5, 0.5])}}
  grads = {"dense": {"kernel": jnp.array([[0.1, 0.2]]), "bias": jnp.array([-0.3, 0.0])}}
  lr, decay, eps = 0.1, 0.01, 1e-8
  tx = optim.make_optimizer(learning_rate=lr, weight_decay=decay, eps=eps)
  state = TrainState.create(params, tx).apply_gradients(grads, tx)
  assert int(state.step) == 1

  def expected(p, g, decays):
    # First Adam step: m_hat = g, v_hat = g^2 -> update g / (|g| + eps).
    return p - lr * (g / (jnp.abs(g) + eps) + (decay * p if decays else 0.0))

  np.testing.assert_allclose(state.params["dense"]["kernel"],
                             expected(params["dense"]["kernel"], grads["dense"]["kernel"], True),
                             atol=2e-6)
  np.testing.assert_allclose(state.params["dense"]["bias"],
                             expected(params["dense"]["bias"], grads["dense"]["bias"], False),
                             atol=2e-6)


def test_gradient_clipping_scales_gradients_to_the_max_norm():
  params = {"w": jnp.zeros(4)}
  grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}       # global norm 5
  for clip, norm in ((None, 5.0), (1.0, 1.0)):
    tx = optim.make_optimizer(learning_rate=1.0, clip_grad_norm=clip)
    state = TrainState.create(params, tx).apply_gradients(grads, tx)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")   # (1 - b1) * g after one step
    np.testing.assert_allclose(optax.tree.norm(mu), 0.1 * norm, rtol=1e-6)
  with pytest.raises(ValueError, match="clip_grad_norm"):
    optim.make_optimizer(learning_rate=1.0, clip_grad_norm=0.0)


def test_schedule_drives_the_optimizer_per_step():
  schedule = optim.learning_rate_schedule(total_steps=2, peak_value=1.0)
  tx = optim.make_optimizer(learning_rate=schedule)
  state = TrainState.create({"w": jnp.zeros(1)}, tx)
  grads = {"w": jnp.ones(1)}
  state = state.apply_gradients(grads, tx)   # lr 1.0
  np.testing.assert_allclose(state.params["w"], [-1.0], rtol=1e-4)
  state = state.apply_gradients(grads, tx)   # lr 0.5
  np.testing.assert_allclose(state.params["w"], [-1.5], rtol=1e-4)
  state = state.apply_gradients(grads, tx)   # lr 0.0
  np.testing.assert_allclose(state.params["w"], [-1.5], rtol=1e-4)
