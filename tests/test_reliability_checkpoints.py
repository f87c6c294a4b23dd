"""Checkpoints that are corrupt, of another model, or worse than an earlier one.

docs/reliability.md lists the guarantees; these are the in-process ones:

- 16 bytes flipped in the latest checkpoint's arrays: resume, eval and the
  params reader refuse it naming the step and the file; resume names the
  previous good step, and falls back to it only with
  ``train.corrupt_checkpoint="use_previous"``.
- resuming with another model size fails with the shape check, before any
  array is read.
- a loss that explodes but stays finite stops training before the diverged
  state is saved; rotation never removes the best-known-good checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

import jax
import numpy as np
import pytest

from sld_jax import checkpointing
from sld_jax import input_pipeline
from sld_jax import lm
from sld_jax import optim
from sld_jax import trained_run as trained_run_lib
from sld_jax import trainer as trainer_lib
from sld_jax.model.config import decoder_config

import tiny_train

# Its module fixtures are built once: all of it on one xdist worker (scripts/test.sh).
pytestmark = pytest.mark.xdist_group("reliability_checkpoints")


def _train(model_dir, total_steps, embed_dim=32, **overrides):
  source = input_pipeline.SyntheticSource(text_size=16, speech_size=48, global_batch_size=8,
                                          sequence_length=32, max_units=10)
  decoder = functools.partial(decoder_config, size="tiny", num_layers=1, num_heads=4,
                              embed_dim=embed_dim, mlp_dim=64, max_length=32)
  kwargs = dict(
      model_dir=str(model_dir), total_steps=total_steps, train_data=source,
      model=functools.partial(lm.SpeechTextLM, decoder=decoder),
      learning_rate=functools.partial(optim.learning_rate_schedule, peak_value=3e-3,
                                      kind="constant", warmup_steps=0),
      log_every=1, checkpoint_every=2, keep_checkpoints=None, tensorboard=False,
      compiler_options=tiny_train.FAST_COMPILE)
  kwargs.update(overrides)
  return trainer_lib.train(**kwargs)


def _flip_bytes(step_dir: str, count: int = 16) -> str:
  """Flips ``count`` bytes in the middle of the step's largest array file."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    f.seek(0)
    f.write(data)
  return os.path.relpath(path, step_dir)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4 (copied per test)."""
  model_dir = tmp_path_factory.mktemp("trained")
  _train(model_dir, 4)
  return str(model_dir)


def _copy(run: str, tmp_path) -> str:
  import shutil  # pylint: disable=g-import-not-at-top
  target = str(tmp_path / "run")
  shutil.copytree(run, target)
  return target


def test_every_checkpoint_has_a_checksum_manifest(trained_run):
  for step in (2, 4):
    step_dir = os.path.join(trained_run, "checkpoints", str(step))
    with open(os.path.join(step_dir, checkpointing.CHECKSUMS_FILE)) as f:
      manifest = json.load(f)
    assert manifest["step"] == step
    assert any(name.startswith("state/") for name in manifest["files"])
    assert checkpointing.verify_checksums(step_dir, step)


def test_a_corrupt_checkpoint_is_refused_naming_step_file_and_previous_good(trained_run,
                                                                             tmp_path):
  run = _copy(trained_run, tmp_path)
  flipped = _flip_bytes(os.path.join(run, "checkpoints", "4"))

  with pytest.raises(checkpointing.CorruptCheckpointError) as raised:
    _train(run, 6)
  message = str(raised.value)
  assert "checkpoint step 4" in message and flipped in message, message
  assert "newest good checkpoint is step 2" in message and "use_previous" in message, message
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2", "4"]  # nothing moved

  # Eval (and transcription, which reads through the same function) refuses it too.
  location = trained_run_lib.locate_checkpoints(run)
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                          tiny_train.checkpointed_params(trained_run, 4))
  with pytest.raises(checkpointing.CorruptCheckpointError, match=rf"step 4.*{flipped}"):
    trained_run_lib.restore_params(location, 4, abstract, None, "tiny", [])

  # With the explicit flag, resume sets step 4 aside and continues from step 2.
  result = _train(run, 6, corrupt_checkpoint="use_previous")
  assert result.step == 6
  assert os.path.isdir(os.path.join(run, checkpointing.CORRUPT_SUBDIR, "4"))
  assert [line["step"] for line in tiny_train.read_metrics(run)] == [1, 2, 3, 4, 5, 6]
  straight = _train(tmp_path / "straight", 6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(result.state.params), jax.device_get(straight.state.params))


def test_resuming_with_another_model_size_names_the_shapes(trained_run, tmp_path):
  run = _copy(trained_run, tmp_path)
  with pytest.raises(checkpointing.CheckpointMismatchError) as raised:
    _train(run, 6, embed_dim=64)
  message = str(raised.value)
  assert "does not fit the configured model" in message
  assert "checkpoint [" in message and ", 32]" in message and ", 64]" in message, message
  assert message.count("\n") < 20


def test_the_best_known_good_checkpoint_is_never_rotated_out(tmp_path):
  state = {"w": np.arange(4, dtype=np.float32)}
  directory = str(tmp_path / "checkpoints")
  checkpointer = checkpointing.Checkpointer(directory, save_interval_steps=1, max_to_keep=2,
                                            async_save=False)
  for step, loss in zip(range(1, 6), (5.0, 1.0, 4.0, 6.0, 7.0)):
    checkpointer.save(step, state, {"step": step}, metrics={checkpointing.BEST_METRIC: loss})
  checkpointer.close()
  assert sorted(int(s) for s in os.listdir(directory) if s.isdigit()) == [2, 4, 5]
  # A restarted run knows the metrics of earlier checkpoints.
  checkpointer = checkpointing.Checkpointer(directory, save_interval_steps=1, max_to_keep=2)
  checkpointer.save(6, state, {"step": 6}, metrics={checkpointing.BEST_METRIC: 9e13})
  checkpointer.close()
  assert sorted(int(s) for s in os.listdir(directory) if s.isdigit()) == [2, 5, 6]


def test_a_finite_loss_explosion_stops_before_the_diverged_state_is_saved(tmp_path):
  # lr 3e-3 for 12 steps, then 1e6: the loss grows by orders of magnitude but
  # stays finite.
  def exploding(total_steps):
    del total_steps
    return lambda step: jax.numpy.where(step >= 12, 1e6, 3e-3)

  with pytest.raises(trainer_lib.DivergenceError,
                     match=r"diverged: (loss|grad_norm) .* at step 1[3-9].*times its median.*"
                           r"last good checkpoint is step 1[2-8]"):
    _train(tmp_path, 40, learning_rate=exploding, keep_checkpoints=2)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps and max(steps) <= 18, steps
  lines = tiny_train.read_metrics(str(tmp_path))
  good = [line["loss"] for line in lines if line["step"] <= 12]
  params = tiny_train.checkpointed_params(str(tmp_path), max(steps))
  assert all(np.all(np.abs(leaf) < 1e3) for leaf in jax.tree.leaves(params))
  assert max(good) < 20


def test_the_divergence_monitor_watches_loss_and_gradient_norm():
  monitor = trainer_lib.DivergenceMonitor(loss_factor=10, grad_norm_factor=100, window=5,
                                          min_history=3)
  for step, loss in enumerate((4.0, 3.9, 3.8, 3.7), start=1):
    assert monitor.check(step, {"loss": loss, "grad_norm": 1.0}) is None
  assert monitor.check(4, {"loss": 1e9, "grad_norm": 1.0}) is None  # a step seen before
  problem = monitor.check(5, {"loss": 3.6, "grad_norm": 500.0})
  assert problem and problem.startswith("grad_norm 500 at step 5")
  assert "loss 90" in monitor.check(6, {"loss": 90.0, "grad_norm": 1.0})
  assert trainer_lib.DivergenceMonitor(loss_factor=0, grad_norm_factor=0, window=5,
                                       min_history=3).check(9, {"loss": 1e30,
                                                                 "grad_norm": 1e30}) is None


def test_the_params_reader_is_shared_by_init_from(trained_run):
  from sld_jax import hf_gpt2  # pylint: disable=g-import-not-at-top
  from sld_jax.vocab import VocabLayout  # pylint: disable=g-import-not-at-top
  config = decoder_config(size="tiny", num_layers=1, num_heads=4, embed_dim=32, mlp_dim=64,
                          max_length=32, vocab_size=VocabLayout(16, 48).size)
  params = hf_gpt2.init_params_from(trained_run, config, VocabLayout(16, 48))
  expected = tiny_train.checkpointed_params(trained_run, 4)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)
  with contextlib.closing(checkpointing.model_dir_checkpoints(trained_run)) as reader:
    assert reader.all_steps() == [2, 4] and reader.last_good_step() == 4
