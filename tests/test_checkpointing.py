"""Checkpointer on its own: which steps are written, which one is restored.

The end-to-end resume tests (test_resume.py) cannot see a restore of an older
checkpoint or a checkpoint of step 0: replaying deterministic steps from an
older state ends in the same final state. These tests can.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax import checkpointing


def _state(step: int) -> dict:
  return {"step": jnp.asarray(step, jnp.int32),
          "params": {"w": jnp.full((2, 3), float(step), jnp.float32)}}


def _abstract() -> dict:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _state(0))


def _position(step: int) -> dict:
  return {"step": step, "examples": 4 * step}


@pytest.fixture
def checkpointer(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), save_interval_steps=2,
                                    max_to_keep=None, async_save=False)
  yield ckpt
  ckpt.close()


def test_restore_reads_the_newest_checkpoint_or_the_one_asked_for(checkpointer):
  for step in (2, 4, 6):
    assert checkpointer.save(step, _state(step), _position(step))
  checkpointer.wait_until_finished()
  assert checkpointer.all_steps() == [2, 4, 6] and checkpointer.latest_step() == 6
  state, position = checkpointer.restore(_abstract())
  assert int(state["step"]) == 6 and position == _position(6)
  np.testing.assert_array_equal(state["params"]["w"], np.full((2, 3), 6.0))
  state, position = checkpointer.restore(_abstract(), step=4)
  assert int(state["step"]) == 4 and position == _position(4)


def test_only_interval_steps_after_0_unless_forced_and_never_twice(checkpointer):
  assert not checkpointer.is_save_step(0)
  assert not checkpointer.save(0, _state(0), _position(0))  # the untrained state
  assert not checkpointer.save(3, _state(3), _position(3))  # off the interval
  assert checkpointer.save(3, _state(3), _position(3), force=True)  # final/preemption
  assert checkpointer.save(4, _state(4), _position(4))
  checkpointer.wait_until_finished()
  assert not checkpointer.save(4, _state(40), _position(40), force=True)
  checkpointer.wait_until_finished()
  assert checkpointer.all_steps() == [3, 4]
  state, _ = checkpointer.restore(_abstract())
  np.testing.assert_array_equal(state["params"]["w"], np.full((2, 3), 4.0))


def test_missing_checkpoint_names_the_directory(checkpointer):
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*ckpt"):
    checkpointer.restore(_abstract())
  checkpointer.save(2, _state(2), _position(2))
  checkpointer.wait_until_finished()
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 8 .*have steps \[2\]"):
    checkpointer.restore(_abstract(), step=8)
