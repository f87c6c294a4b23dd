"""Mesh construction, logical axis rules, sharded init and sharded forward.

Runs on the 8 fake CPU devices that ``tests/conftest.py`` asks XLA for.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sld_jax import partitioning
from sld_jax.model import decoder
from sld_jax.model.config import DecoderConfig

jax.config.update("jax_default_matmul_precision", "highest")

RULES = partitioning.DEFAULT_LOGICAL_AXIS_RULES
TINY = DecoderConfig(vocab_size=128, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
                     max_length=32, dropout_rate=0.1)


def _init_sharded(init_fn, mesh, *args):
  """``(values, shardings)``: ``init_fn(*args)`` unboxed, each device allocating its shards."""
  _, shardings = partitioning.abstract_state(init_fn, *args, mesh=mesh, rules=RULES)
  with partitioning.sharding_context(mesh, RULES):
    values = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return values, shardings


def _needs_8_devices():
  # Fail, never skip: tests/conftest.py always asks XLA for 8 CPU devices.
  assert jax.device_count() == 8, (
      f"{jax.device_count()} devices: tests/conftest.py adds "
      "--xla_force_host_platform_device_count=8 to XLA_FLAGS before jax loads")


def test_make_mesh_fills_minus_one_and_uses_auto_axes():
  _needs_8_devices()
  assert dict(partitioning.make_mesh().shape) == {"data": 8, "fsdp": 1, "model": 1}
  mesh = partitioning.make_mesh(data=-1, model=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "model": 2}
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3
  assert dict(partitioning.make_mesh(data=2, fsdp=-1, model=2).shape)["fsdp"] == 2
  small = partitioning.make_mesh(data=2, devices=jax.devices()[:2])
  assert small.devices.size == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(data=3), "needs 3 devices, have 8"),
    (dict(data=-1, model=3), "not divisible by the fixed axes"),
    (dict(data=-1, fsdp=-1), "only one axis may be -1"),
    (dict(data=0), "sizes must be >= 1 or -1"),
])
def test_make_mesh_errors(kwargs, message):
  _needs_8_devices()
  with pytest.raises(ValueError, match=message):
    partitioning.make_mesh(**kwargs)


def test_rules_map_logical_axes_and_reject_unknowns():
  with nn.logical_axis_rules(RULES):
    assert nn.logical_to_mesh_axes(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert nn.logical_to_mesh_axes(("vocab", "embed")) == P("model", "fsdp")
    assert nn.logical_to_mesh_axes(("embed", "heads", "kv")) == P("fsdp", "model", None)
    assert nn.logical_to_mesh_axes(("layers", "mlp", "embed")) == P(None, "model", "fsdp")
  no_fsdp = partitioning.logical_axis_rules(overrides=[("embed", None)])
  assert nn.logical_to_mesh_axes(("vocab", "embed"), no_fsdp) == P("model", None)
  with pytest.raises(ValueError, match="unknown mesh axes \\['tensor'\\]"):
    partitioning.logical_axis_rules(overrides=[("embed", "tensor")])
  mesh = partitioning.make_mesh(data=-1, devices=jax.devices()[:1])
  boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 4), jnp.float32),
                                        ("embed", "mystery"))}
  with pytest.raises(ValueError, match="\\['mystery'\\] have no rule"):
    partitioning.logical_shardings(boxed, mesh, RULES)


def test_data_sharding_and_shard_host_batch():
  _needs_8_devices()
  mesh = partitioning.make_mesh(data=2, fsdp=2, model=2)
  assert partitioning.data_sharding(mesh).spec == P(("data", "fsdp"), None)
  host = {"decoder_input_tokens": np.arange(48, dtype=np.int32).reshape(8, 6),
          "decoder_loss_weights": np.ones((8, 6), np.float32)}
  batch = partitioning.shard_host_batch(host, mesh)
  for name, array in batch.items():
    assert array.sharding.spec == P(("data", "fsdp"), None)
    assert array.addressable_shards[0].data.shape == (2, 6)
    np.testing.assert_array_equal(array, host[name])
  with pytest.raises(ValueError, match="'decoder_input_tokens' has local batch 6"):
    partitioning.shard_host_batch({"decoder_input_tokens": np.zeros((6, 6), np.int32)}, mesh)


def _packed_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 128, size=(4, 8)).astype(np.int32)
  segments = np.array([[1] * 3 + [2] * 5, [1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [2] * 6])
  positions = np.array([[0, 1, 2, 0, 1, 2, 3, 4], list(range(8)),
                        [0, 1, 2, 3, 4, 0, 0, 0], [0, 1, 0, 1, 2, 3, 4, 5]])
  return tokens, positions.astype(np.int32), segments.astype(np.int32)


@pytest.mark.parametrize("mesh_shape, config", [
    ((4, 1, 2), TINY),
    ((2, 2, 2), TINY.replace(scan_layers=True, position="rope", mlp="swiglu")),
])
def test_sharded_forward_equals_single_device(mesh_shape, config):
  _needs_8_devices()
  mesh = partitioning.make_mesh(*mesh_shape)
  params, shardings = _init_sharded(
      functools.partial(decoder.init_params, config), mesh, jax.random.key(0))

  embedding = params["token_embedder"]["embedding"]
  assert embedding.sharding.spec == P("model", "fsdp")
  assert not embedding.sharding.is_fully_replicated
  assert embedding.addressable_shards[0].data.shape == (128 // 2, 32 // mesh_shape[1])
  layers = params["layers"] if config.scan_layers else params["layers_0"]
  expected_query_spec = P(None, "fsdp", "model", None) if config.scan_layers else (
      P("fsdp", "model", None))
  assert layers["attention"]["query"]["kernel"].sharding.spec == expected_query_spec
  jax.tree.map(lambda x, s: x.sharding == s or pytest.fail(f"{x.sharding} != {s}"),
               params, shardings)

  model = decoder.Decoder(config)
  tokens, positions, segments = _packed_batch()
  data = partitioning.data_sharding(mesh)
  with partitioning.sharding_context(mesh, RULES):
    forward = jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, pos, seg),
                      in_shardings=(shardings, data, data, data),
                      out_shardings=NamedSharding(mesh, P(("data", "fsdp"), None, "model")))
    sharded = forward(params, tokens, positions, segments)

  host_params = jax.tree.map(np.asarray, params)
  single = jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, pos, seg))(
      host_params, tokens, positions, segments)
  assert len(single.sharding.device_set) == 1
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)

  if config.scan_layers:
    _check_sharded_kv_cache_decoding(config, mesh, params, shardings, host_params)


def _check_sharded_kv_cache_decoding(config, mesh, params, shardings, host_params):
  """Prefill + two decode steps with a sharded cache equal the unsharded run."""
  lengths = np.array([3, 8, 1, 5], np.int32)
  prompts = _packed_batch()[0]
  steps = np.array([[9, 10, 11, 12], [13, 14, 15, 16]], np.int32)
  abstract = decoder.abstract_cache(config, batch_size=4, max_length=12)
  cache_shardings = partitioning.logical_shardings(abstract, mesh, RULES)
  assert cache_shardings["cache_index"].spec == P(("data", "fsdp"))
  assert cache_shardings["layers"]["attention"]["cached_key"].spec == (
      P(None, ("data", "fsdp"), None, "model", None))

  def run(params, cache):
    logits, cache = decoder.prefill(config, params, cache, prompts, lengths)
    outputs = [decoder.last_logits(logits, lengths)]
    for tokens in steps:
      step_logits, cache = decoder.decode_step(config, params, cache, tokens)
      outputs.append(step_logits)
    return jnp.stack(outputs), cache

  with partitioning.sharding_context(mesh, RULES):
    cache = jax.jit(functools.partial(decoder.init_cache, config, 4, 12),
                    out_shardings=cache_shardings)()
    sharded, sharded_cache = jax.jit(run, in_shardings=(shardings, cache_shardings),
                                     out_shardings=(None, cache_shardings))(params, cache)
  single, single_cache = jax.jit(run)(host_params, decoder.init_cache(config, 4, 12))
  assert sharded_cache["layers"]["attention"]["cached_key"].sharding == (
      cache_shardings["layers"]["attention"]["cached_key"])
  np.testing.assert_array_equal(sharded_cache["cache_index"], lengths + 2)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(sharded_cache["layers"]["attention"]["cached_value"]),
      np.asarray(single_cache["layers"]["attention"]["cached_value"]), atol=1e-5)


@pytest.mark.parametrize("method, kl_target", [("sld", "paper"), ("sld", "reference")])
def test_sharded_loss_and_grads_equal_single_device(method, kl_target):
  """Forward + objective (+ grads) on a data x model mesh equal one device."""
  _needs_8_devices()
  from sld_jax import losses
  from sld_jax.vocab import VocabLayout

  layout = VocabLayout(text_size=40, speech_size=60)
  config = TINY.replace(vocab_size=layout.size)
  mesh = partitioning.make_mesh(data=4, fsdp=1, model=2)
  params, shardings = _init_sharded(
      functools.partial(decoder.init_params, config), mesh, jax.random.key(1))
  model = decoder.Decoder(config)
  rng = np.random.default_rng(1)
  segments = _packed_batch()[2]
  positions = _packed_batch()[1]
  targets = np.where(rng.random((4, 8)) < 0.5, rng.integers(1, 40, (4, 8)),
                     rng.integers(40, 101, (4, 8))).astype(np.int32) * (segments > 0)
  inputs = np.roll(targets, 1, axis=1) * (positions > 0)
  weights = (targets > 0).astype(np.float32)

  def loss_fn(p, inputs, positions, segments, targets, weights):
    logits = model.apply({"params": p}, inputs, positions, segments)
    return losses.compute_loss(logits, targets, weights, segments, layout=layout,
                               method=method, kl_target=kl_target)[0]

  grad_fn = jax.value_and_grad(loss_fn)
  data = partitioning.data_sharding(mesh)
  with partitioning.sharding_context(mesh, RULES):
    sharded_loss, sharded_grads = jax.jit(
        grad_fn, in_shardings=(shardings,) + (data,) * 5,
        out_shardings=(None, shardings))(params, inputs, positions, segments, targets, weights)
  host_params = jax.tree.map(np.asarray, params)
  single_loss, single_grads = jax.jit(grad_fn)(
      host_params, inputs, positions, segments, targets, weights)
  assert np.isfinite(single_loss) and single_loss > 0
  np.testing.assert_allclose(float(sharded_loss), float(single_loss), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       atol=1e-6, rtol=1e-4),
               sharded_grads, single_grads)
