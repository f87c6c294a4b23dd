"""Interrupted and resumed runs end where uninterrupted runs end.

Data order and randomness are functions of the step, so N steps + resume +
N steps must give the parameters of 2N steps (same program: bit-identical
here; compared at 1e-6). Also: a ``kill -9`` in the middle of a subprocess
run, a NaN stop that keeps the last good checkpoint, and SIGTERM handling.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from sld_jax import checkpointing
from sld_jax import input_pipeline
from sld_jax import lm
from sld_jax import optim
from sld_jax import trainer as trainer_lib
from sld_jax.model.config import decoder_config

import tiny_train


def _train(model_dir, total_steps, **overrides):
  source = input_pipeline.SyntheticSource(text_size=16, speech_size=48, global_batch_size=8,
                                          sequence_length=32, max_units=10)
  decoder = functools.partial(decoder_config, size="tiny", num_layers=1, num_heads=4,
                              embed_dim=32, mlp_dim=64, max_length=32, dropout_rate=0.1)
  kwargs = dict(
      model_dir=str(model_dir), total_steps=total_steps, train_data=source,
      model=functools.partial(lm.SpeechTextLM, decoder=decoder, time_mask_prob=0.3),
      learning_rate=functools.partial(optim.learning_rate_schedule, peak_value=3e-3),
      optimizer=functools.partial(optim.make_optimizer, weight_decay=0.01),
      log_every=1, checkpoint_every=2, keep_checkpoints=None, tensorboard=False,
      compiler_options=tiny_train.FAST_COMPILE)
  kwargs.update(overrides)
  return trainer_lib.train(**kwargs)


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
  straight = _train(tmp_path / "straight", 6)
  first = _train(tmp_path / "resumed", 6, stop_after_steps=3)
  assert first.stopped_early and first.step == 3
  # A step-3 checkpoint was forced although 3 is not a multiple of 2.
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2", "3"]
  # Lines the resumed run will redo are removed first (here: none after 3).
  resumed = _train(tmp_path / "resumed", 6)
  assert resumed.step == 6 and not resumed.stopped_early

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(resumed.state.params), jax.device_get(straight.state.params))
  lines = tiny_train.read_metrics(tmp_path / "resumed")
  reference = tiny_train.read_metrics(tmp_path / "straight")
  assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
  for name in ("loss", "learning_rate", "grad_norm"):
    np.testing.assert_allclose([line[name] for line in lines],
                               [line[name] for line in reference], rtol=1e-6, err_msg=name)
  for key in ("step", "loss", "ce_text", "ce_speech", "kl_speech", "accuracy_text",
              "accuracy_speech", "learning_rate", "grad_norm", "tokens_per_second",
              "step_time"):
    assert key in lines[-1], key
  assert os.path.exists(tmp_path / "resumed" / "config.gin")


def test_resume_after_kill_9(tmp_path):
  env = tiny_train.subprocess_env(8)
  steps = 10
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  tiny_train.run(tiny_train.train_command(straight, steps), env)

  # The same run, but it would go on for 1000 steps: kill -9 it once it has
  # written the step-4 checkpoint (orbax renames a finished step into place).
  process = subprocess.Popen(tiny_train.train_command(killed, 1000), cwd=tiny_train.REPO_ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  checkpoints = os.path.join(killed, "checkpoints")
  deadline = time.time() + 240
  while not os.path.isdir(os.path.join(checkpoints, "4")):
    assert process.poll() is None, f"training exited early:\n{process.stderr.read()[-4000:]}"
    assert time.time() < deadline, "no step-4 checkpoint within 240 s"
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=30)
  process.stderr.close()
  assert process.returncode == -signal.SIGKILL
  written = [int(name) for name in os.listdir(checkpoints) if name.isdigit()]
  assert 4 <= max(written) < steps, written

  tiny_train.run(tiny_train.train_command(killed, steps), env)
  for a, b in zip(jax.tree.leaves(tiny_train.checkpointed_params(killed, steps)),
                  jax.tree.leaves(tiny_train.checkpointed_params(straight, steps))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  lines, reference = tiny_train.read_metrics(killed), tiny_train.read_metrics(straight)
  assert [line["step"] for line in lines] == [line["step"] for line in reference]
  np.testing.assert_allclose([line["loss"] for line in lines],
                             [line["loss"] for line in reference], rtol=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # An infinite learning rate from step 3 on: the update of step 3 makes the
  # parameters non-finite, so the state after step 3 must never be saved.
  def exploding(total_steps):
    return lambda step: jax.numpy.where(step >= 2, jax.numpy.inf, 1e-3)

  with pytest.raises(trainer_lib.NonFiniteLossError, match=r"at step 3.*last good checkpoint "
                     r"is step 2"):
    _train(tmp_path, 6, learning_rate=exploding, checkpoint_every=1)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  params = tiny_train.checkpointed_params(str(tmp_path), 2)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


def test_sigterm_requests_a_checkpoint_and_stop():
  previous = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionHandler() as handler:
    assert not handler.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not handler.should_stop():
      assert time.time() < deadline
      time.sleep(0.01)
    assert handler.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is previous
