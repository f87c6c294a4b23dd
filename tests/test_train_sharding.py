"""Sharded training gives the numbers of one device; checkpoints move between meshes.

Tolerances: with ``jax_default_matmul_precision="highest"`` the meshes only
differ in the order of floating-point reductions, so losses, gradient norms
and parameters agree to rtol 1e-4 (observed ~1e-6) after 3 AdamW steps with
dropout and time masking on (random bits do not depend on the sharding).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax import checkpointing
from sld_jax import input_pipeline
from sld_jax import lm
from sld_jax import losses
from sld_jax import optim
from sld_jax import partitioning
from sld_jax import trainer as trainer_lib
from sld_jax.model.config import decoder_config

import tiny_train

# Its module fixtures are built once: all of it on one xdist worker (scripts/test.sh).
pytestmark = pytest.mark.xdist_group("train_sharding")

STEPS = 3
RTOL = 1e-4


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _source():
  return input_pipeline.SyntheticSource(text_size=16, speech_size=48, global_batch_size=8,
                                        sequence_length=32, max_units=10)


@functools.lru_cache(maxsize=None)   # trainers keep their compiled steps: share them
def _trainer(mesh_shape, dropout=0.1, time_mask_prob=0.3, accumulation=1, dtype="float32",
             loss_chunk_size=None, loss_backward="recompute"):
  source = _source()
  decoder = functools.partial(decoder_config, size="tiny", num_layers=1, num_heads=4,
                              embed_dim=32, mlp_dim=64, max_length=32, dropout_rate=dropout,
                              dtype=dtype)
  model = lm.SpeechTextLM(source.layout, decoder=decoder,
                          loss_config=losses.LossConfig(method="sld", kl_target="reference"),
                          time_mask_prob=time_mask_prob, loss_chunk_size=loss_chunk_size,
                          loss_backward=loss_backward)
  schedule = optim.learning_rate_schedule(total_steps=10, peak_value=3e-3)
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = partitioning.make_mesh(*mesh_shape, devices=devices)
  tx = optim.make_optimizer(schedule, weight_decay=0.01, clip_grad_norm=1.0)
  return trainer_lib.Trainer(model, tx, schedule, mesh, seed=3,
                             gradient_accumulation_steps=accumulation,
                             compiler_options=tiny_train.FAST_COMPILE), source


def _run(trainer, source, steps=STEPS):
  state = trainer.init_state()
  history = []
  for host_batch in list(zip(range(steps), source.batches(0)))[:steps]:
    state, metrics = trainer.train_step(state, trainer.shard_batch(host_batch[1]))
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return state, history


@pytest.fixture(scope="module")
def one_device_run():
  trainer, source = _trainer((1, 1, 1))
  state, history = _run(trainer, source)
  return jax.device_get(state.params), history


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_mesh_gives_the_one_device_trajectory(mesh_shape, one_device_run):
  reference_params, reference = one_device_run
  trainer, source = _trainer(mesh_shape)
  state, history = _run(trainer, source)
  for name in ("loss", "ce_text", "ce_speech", "kl_speech", "grad_norm", "param_norm"):
    np.testing.assert_allclose([h[name] for h in history], [h[name] for h in reference],
                               rtol=RTOL, err_msg=name)
  assert [h["num_target_tokens"] for h in history] == [h["num_target_tokens"] for h in reference]
  # The loss moved: the steps did something.
  assert history[-1]["loss"] < history[0]["loss"]
  # Parameters really are sharded as the logical rules say.
  embedding = state.params["token_embedder"]["embedding"]
  assert embedding.sharding.spec == jax.sharding.PartitionSpec("model", "fsdp")
  assert embedding.sharding.mesh.shape == dict(zip(partitioning.MESH_AXES, mesh_shape))
  # atol: the attention key bias has a zero gradient in exact arithmetic, so
  # Adam turns its ~1e-10 rounding noise into ~1e-6 updates.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-5),
               jax.device_get(state.params), reference_params)


@pytest.mark.parametrize("loss_backward", ["recompute", "in_forward"])
def test_sharded_chunked_loss_gives_the_one_device_trajectory(one_device_run, loss_backward):
  """The chunked loss (loss_chunk_size) under data, fsdp and model sharding.

  "in_forward" attaches its gradient to the returned loss only: the trainer
  must differentiate that loss (a loss rebuilt from the metrics would train
  nothing, and the parameters would not follow the reference's).
  """
  reference_params, reference = one_device_run
  trainer, source = _trainer((2, 2, 2), loss_chunk_size=8, loss_backward=loss_backward)
  state, history = _run(trainer, source)
  for name in ("loss", "ce_text", "ce_speech", "kl_speech", "grad_norm", "param_norm"):
    np.testing.assert_allclose([h[name] for h in history], [h[name] for h in reference],
                               rtol=RTOL, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-5),
               jax.device_get(state.params), reference_params)


@pytest.mark.parametrize("loss", [{}, dict(loss_chunk_size=8, loss_backward="in_forward")],
                         ids=["logits", "in_forward"])
def test_gradient_accumulation_matches_the_whole_batch(loss):
  # Without dropout / time masking the microbatch split is the only change.
  whole, source = _trainer((8, 1, 1), dropout=0.0, time_mask_prob=0.0)
  split, _ = _trainer((8, 1, 1), dropout=0.0, time_mask_prob=0.0, accumulation=2, **loss)
  state_whole, history_whole = _run(whole, source, steps=2)
  state_split, history_split = _run(split, source, steps=2)
  for name in ("loss", "ce_text", "ce_speech", "kl_speech", "accuracy_text", "grad_norm",
               "num_sequences", "num_unit_tokens"):
    np.testing.assert_allclose([h[name] for h in history_split],
                               [h[name] for h in history_whole], rtol=1e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               jax.device_get(state_split.params), jax.device_get(state_whole.params))


def test_bfloat16_compute_trains_float32_parameters():
  # Same data and initialisation as the float32 run above; only the matmuls
  # and activations are bfloat16 (the loss is computed in float32).
  bf16, source = _trainer((8, 1, 1), dropout=0.0, time_mask_prob=0.0, dtype="bfloat16")
  state, history = _run(bf16, source, steps=2)
  f32, _ = _trainer((8, 1, 1), dropout=0.0, time_mask_prob=0.0)
  _, reference = _run(f32, source, steps=2)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))
  np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in reference],
                             rtol=2e-2)


def test_time_masking_replaces_only_real_input_tokens():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 50, size=(64, 64)), jnp.int32)
  masked = lm.time_mask(tokens, jax.random.key(0), 0.3, replacement=1)
  changed = np.asarray(masked != tokens)
  assert np.all(np.asarray(masked)[changed] == 1)
  assert not np.any(changed & (np.asarray(tokens) == 0))   # PAD / BOS stay
  eligible = np.asarray((tokens > 0) & (tokens != 1)).sum()
  assert abs(changed.sum() / eligible - 0.3) < 0.03
  np.testing.assert_array_equal(lm.time_mask(tokens, jax.random.key(0), 0.3, 1), masked)
  assert lm.time_mask(tokens, jax.random.key(0), 0.0, 1) is tokens


@pytest.mark.parametrize("kl_target", ["paper", "reference"])
def test_microbatch_objective_of_a_whole_batch_is_its_loss(kl_target):
  source = _source()
  model = lm.SpeechTextLM(
      source.layout, decoder=functools.partial(
          decoder_config, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32, max_length=32),
      loss_config=losses.LossConfig(method="sld", alpha=0.5, kl_target=kl_target))
  batch = source.global_batch(0)
  params = jax.jit(lambda key: nn.meta.unbox(model.init_params(key)))(jax.random.key(0))

  @jax.jit
  def both(params, batch):
    loss, aux = model.loss_fn(params, batch)
    counts = model.target_counts(batch)
    objective, sums = model.microbatch_objective(params, batch, None, counts)
    return loss, aux, counts, objective, model.from_sums(sums)

  loss, aux, counts, objective, metrics = both(params, batch)
  for name, value in counts.items():
    assert int(value) == int(aux[name]) > 0, name
  np.testing.assert_allclose(objective, loss, rtol=1e-6)
  for name in ("loss", "ce_text", "ce_speech", "kl_speech", "accuracy_text"):
    np.testing.assert_allclose(metrics[name], aux[name], rtol=1e-6, err_msg=name)


def test_split_microbatches_keeps_rows_on_their_shard():
  rows = np.arange(8)[:, None]
  micro = trainer_lib.split_microbatches(rows, 2)
  assert micro[:, :, 0].tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
  with pytest.raises(ValueError, match="microbatches"):
    trainer_lib.split_microbatches(rows, 3)


def test_restore_onto_a_different_mesh(tmp_path):
  saver, source = _trainer((2, 2, 2))
  state, _ = _run(saver, source, steps=1)
  checkpointer = checkpointing.Checkpointer(str(tmp_path), save_interval_steps=1,
                                            async_save=True)
  assert checkpointer.save(1, state, source.position(1))
  checkpointer.wait_until_finished()
  saved_params = jax.device_get(state.params)

  loader, _ = _trainer((1, 2, 4))
  restored, position = checkpointer.restore(loader.abstract_state)
  checkpointer.close()
  assert position["step"] == 1 and position["source"] == source.description()
  assert int(restored.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved_params)
  # Every leaf (params and Adam moments) lands in the new mesh's sharding.
  for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(loader.abstract_state)):
    assert leaf.sharding == target.sharding
  assert restored.params["token_embedder"]["embedding"].sharding.spec == (
      jax.sharding.PartitionSpec("model", "fsdp"))
  # And training continues from it on the new mesh.
  restored, metrics = loader.train_step(restored, loader.shard_batch(next(source.batches(1))))
  assert np.isfinite(float(metrics["loss"])) and int(restored.step) == 2


def test_lowered_train_step_is_the_step_that_runs():
  trainer, source = _trainer((2, 2, 2))
  host_batch = next(iter(source.batches(0)))
  executable = trainer.lower_train_step(host_batch).compile()
  assert executable.memory_analysis().argument_size_in_bytes > 0
  state = trainer.init_state()
  state_copy = jax.tree.map(jnp.copy, state)
  _, expected = trainer.train_step(state, trainer.shard_batch(host_batch))
  with trainer.context():
    _, metrics = executable(state_copy, trainer.shard_batch(host_batch))
  for name in ("loss", "grad_norm", "num_target_tokens"):
    np.testing.assert_allclose(float(metrics[name]), float(expected[name]), rtol=1e-6)
