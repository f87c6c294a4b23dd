"""Orbax checkpoints of the train state and the data position, plus preemption.

A checkpoint directory ``MODEL_DIR/checkpoints/<step>/`` holds two items:

  state  the ``TrainState`` (step, params, opt_state), written by every
         process for the shards it owns (``ocp.args.StandardSave``);
  data   a small JSON dict saying where the input pipeline stands, e.g.
         ``{"step": 120, "examples": 7680, "seed": 0, ...}``.

Restoring reads the state into an *abstract* state whose leaves are
``jax.ShapeDtypeStruct``s carrying the target sharding, so a checkpoint
written on one mesh shape loads onto another.

Orbax writes each step into a temporary directory and renames it when
complete, so a process killed mid-save (even ``kill -9``) leaves the previous
checkpoint as the latest one; the temporary leftovers are cleaned up on the
next start. Saves are asynchronous: the training loop continues while the
arrays are written; ``wait_until_finished`` blocks until they are on disk.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


class Checkpointer:
  """Saves and restores ``(state, data_position)`` pairs under a directory.

  Attributes:
    directory: where step directories live (created if missing).
    save_interval_steps: ``save`` writes only at multiples of this (unless
      forced).
    max_to_keep: keep the newest N checkpoints (None = all).
    async_save: write in the background (``enable_async_checkpointing``).
  """

  def __init__(self, directory: str, save_interval_steps: int = 1000,
               max_to_keep: Optional[int] = 3, async_save: bool = True):
    if save_interval_steps <= 0:
      raise ValueError(f"Checkpointer.save_interval_steps must be > 0, got {save_interval_steps}")
    self.directory = os.path.abspath(directory)
    self.save_interval_steps = save_interval_steps
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def is_save_step(self, step: int) -> bool:
    return step > 0 and step % self.save_interval_steps == 0

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_position: dict[str, Any],
           force: bool = False) -> bool:
    """Starts writing a checkpoint for ``step``; returns whether one was started.

    Without ``force`` only steps that are multiples of ``save_interval_steps``
    are written. A step that already has a checkpoint is never rewritten.
    The caller must not pass a state with non-finite values (the trainer
    checks the loss first), so the newest checkpoint is always a good one.
    """
    step = int(step)
    if not (force or self.is_save_step(step)) or step in self._manager.all_steps():
      return False
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data_position))),
        force=force)
    if saved:
      logging.info("Saving checkpoint for step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, step: Optional[int] = None
              ) -> tuple[Any, dict[str, Any]]:
    """Reads ``(state, data_position)`` of ``step`` (default: the latest).

    Args:
      abstract_state: a pytree like the saved state whose leaves are
        ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``; the restored
        arrays get those shardings (any mesh shape).
      step: which checkpoint; None for the latest.

    Raises:
      FileNotFoundError: there is no checkpoint (for ``step``).
    """
    if step is None:
      step = self.latest_step()
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory} "
          f"(have steps {self.all_steps()})")
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
    logging.info("Restored checkpoint of step %d from %s", step, self.directory)
    return restored.state, dict(restored.data)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionHandler:
  """Turns SIGTERM / SIGINT into a request to checkpoint and stop.

  The first signal sets a flag the training loop polls (``should_stop``);
  the loop then saves and exits cleanly. A second SIGINT interrupts at once
  (the default handler is put back after the first). With several processes
  the flag is OR-ed over all of them at the loop's sync points (log and
  checkpoint steps), so every process stops at the same step (saving is
  collective).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    self.signal_name: Optional[str] = None

  def install(self) -> "PreemptionHandler":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Not in the main thread: SIGTERM/SIGINT will not checkpoint")
      return self
    for sig in self.SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    logging.warning("Received %s: will checkpoint and stop after this step", self.signal_name)
    self._event.set()
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

  def request_stop(self) -> None:
    self._event.set()

  def should_stop(self, collective: bool = True) -> bool:
    """Whether a process received a signal.

    With several processes the answer must be the same everywhere, so the
    flags are OR-ed with an all-gather (a host synchronisation); with
    ``collective=False`` (steps between sync points) it answers False there.
    """
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    if not collective:
      return False
    flags = multihost_utils.process_allgather(np.array(local, np.int32))
    return bool(np.any(flags))

  def __enter__(self) -> "PreemptionHandler":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()
