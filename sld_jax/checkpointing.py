"""The one checkpoint reader and writer: training resume, eval, transcription.

A checkpoint directory ``MODEL_DIR/checkpoints/<step>/`` holds two items and
a checksum manifest:

  state                  the ``TrainState`` (step, params, opt_state), written
                         by every process for the shards it owns
                         (``ocp.args.StandardSave``);
  data                   a small JSON dict saying where the input pipeline
                         stands, e.g. ``{"step": 120, "examples": 7680, ...}``;
  sld_jax_checksums.json {"step": 120, "files": {"state/d/9f3a...": "<sha256>",
                         ...}}: every file of the step, hashed by process 0 once
                         orbax has finalised (renamed) the step, written
                         atomically.

Reading (``Checkpointer(directory, read_only=True)`` or the trainer's own):

  verify(step)           recompute the hashes; a changed, missing or unreadable
                         file raises ``CorruptCheckpointError`` naming the step
                         and the file. A step without a manifest (written before
                         manifests existed, or the writer was killed between
                         orbax's rename and the manifest) is read with a warning.
  check_fits(step, ...)  parameter names and shapes against the model, from the
                         checkpoint's metadata, before any array is read
                         (``CheckpointMismatchError``: "checkpoint ... does not
                         fit the configured model ... key/kernel: checkpoint
                         [...], model [...]").
  restore(abstract)      full state + data position (training resume);
  restore_params(...)    ``state.params`` only (eval, transcription, init).

Both read into an *abstract* tree whose leaves are ``jax.ShapeDtypeStruct``s
carrying the target sharding, so a checkpoint written on one mesh shape loads
onto another.

Writing: orbax writes each step into a temporary directory and renames it when
complete, so a process killed mid-save (even ``kill -9``) leaves the previous
checkpoint as the latest one; the temporary leftovers are cleaned up on the
next start. Saves are asynchronous. Rotation (``max_to_keep``) never removes
the best-known-good checkpoint: each save carries the run's recent median
loss as its metric, and an orbax ``BestN`` preservation policy keeps the
lowest next to the newest ``max_to_keep``. A save that fails for lack of disk
space raises ``CheckpointSaveError``, one line naming the step and the last
good checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
from typing import Any, Optional

from absl import logging
from etils import epath
import flax.traverse_util
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from sld_jax import atomic_files
from sld_jax import cross_process
from sld_jax import file_hashes

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "checkpoints_corrupt"
CHECKSUMS_FILE = "sld_jax_checksums.json"
BEST_METRIC = "loss_median"


class CheckpointError(ValueError):
  """A checkpoint cannot be used; the message says which and why."""


class CorruptCheckpointError(CheckpointError):
  """A file of a checkpoint differs from the checksum recorded when it was saved."""

  def __init__(self, message: str, step: int, path: str):
    super().__init__(message)
    self.step = step
    self.path = path


class CheckpointMismatchError(CheckpointError):
  """The checkpoint's parameters do not fit the configured model."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (e.g. the disk is full)."""


# ----------------------------------------------------------------------------
# Checksums.


def _step_files(step_dir: str) -> list[str]:
  found = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), step_dir)
      if relative != CHECKSUMS_FILE and not relative.startswith(CHECKSUMS_FILE + "."):
        found.append(relative)
  return sorted(found)


def write_checksums(step_dir: str, step: int) -> str:
  """Hashes every file of a finished step into ``step_dir/sld_jax_checksums.json``."""
  files = {name: file_hashes.sha256(os.path.join(step_dir, name))
           for name in _step_files(step_dir)}
  path = os.path.join(step_dir, CHECKSUMS_FILE)
  with atomic_files.replacing(path, fsync=True) as tmp, open(tmp, "w") as f:
    json.dump({"step": int(step), "algorithm": "sha256", "files": files}, f, indent=1)
  return path


def verify_checksums(step_dir: str, step: int) -> bool:
  """True if the step matches its manifest, False if it has none.

  Raises:
    CorruptCheckpointError: a file changed, vanished or cannot be read.
  """
  path = os.path.join(step_dir, CHECKSUMS_FILE)
  if not os.path.exists(path):
    return False
  where = f"checkpoint step {step} ({step_dir})"
  try:
    with open(path) as f:
      recorded = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    raise CorruptCheckpointError(f"{where} is corrupt: its checksum manifest {path} is "
                                 f"unreadable ({e})", step, path) from None
  for name, digest in sorted(recorded.items()):
    file_path = os.path.join(step_dir, name)
    try:
      actual = file_hashes.sha256(file_path)
    except OSError as e:
      raise CorruptCheckpointError(f"{where} is corrupt: {name} cannot be read ({e})",
                                   step, file_path) from None
    if actual != digest:
      raise CorruptCheckpointError(
          f"{where} is corrupt: {name} has sha256 {actual[:16]}..., but {digest[:16]}... "
          "was recorded when it was saved", step, file_path)
  return True


# ----------------------------------------------------------------------------
# Shapes.


def _listed(lines: list[str], most: int) -> list[str]:
  return lines[:most] + ([f"... and {len(lines) - most} more"] if len(lines) > most else [])


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{"layers_0/mlp/wi/kernel": (128, 512), ...}`` of a nested dict's leaves."""
  shapes = {}
  for name, leaf in flax.traverse_util.flatten_dict(tree, sep="/").items():
    shape = getattr(leaf, "shape", None)
    shapes[name] = tuple(int(size) for size in (np.shape(leaf) if shape is None else shape))
  return shapes


def check_params_match(saved: Any, abstract: Any, where: str, model_info: str, *,
                       saved_name: str = "checkpoint", hint: str = "") -> None:
  """Raises if ``saved``'s parameter names or shapes differ from the model's.

  The one parameter-tree check: checkpoints before any array is read, and
  imported, exported or saved ``hf_gpt2`` trees. ``saved`` and ``abstract``
  are nested dicts whose leaves have a shape (orbax metadata,
  ``jax.ShapeDtypeStruct``s, arrays).

  Raises:
    CheckpointMismatchError: ``"{where} does not fit the configured model
      ({model_info}):"``, then (at most) the first differences, one a line,
      e.g. ``decoder/layers_0/mlp/wi/kernel: checkpoint [128, 512], model
      [256, 512]`` (``saved_name`` names the first side), then ``hint``.
  """
  saved = _shapes(saved)
  wanted = _shapes(abstract)
  vocabulary_first = lambda name: (not name.startswith(("token_embedder", "logits")), name)
  problems = _listed([f"{name}: in the model, not in the {saved_name}"
                     for name in sorted(set(wanted) - set(saved))], 4)
  problems += _listed([f"{name}: in the {saved_name}, not in the model"
                      for name in sorted(set(saved) - set(wanted))], 4)
  problems += _listed([f"{name}: {saved_name} {list(saved[name])}, model {list(wanted[name])}"
                      for name in sorted(set(saved) & set(wanted), key=vocabulary_first)
                      if saved[name] != wanted[name]], 6)
  if problems:
    shown = "\n  ".join(problems)
    raise CheckpointMismatchError(
        f"{where} does not fit the configured model ({model_info}):\n  {shown}{hint}")


def _as_dict(tree: Any) -> Any:
  """A TrainState / struct dataclass -> its nested dict (as orbax saves it)."""
  return flax.serialization.to_state_dict(tree)


def is_out_of_space(error: BaseException) -> bool:
  """Whether an exception (or one it was raised from) says the disk is full."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(error)
    if "No space left on device" in text or "ENOSPC" in text or "Disk quota exceeded" in text:
      return True
    error = error.__cause__ or error.__context__
  return False


# ----------------------------------------------------------------------------
# The checkpointer.


class Checkpointer:
  """Saves and restores ``(state, data_position)`` pairs under a directory.

  Attributes:
    directory: where step directories live (created if missing, unless
      ``read_only``).
    save_interval_steps: ``save`` writes only at multiples of this (unless
      forced).
    max_to_keep: keep the newest N checkpoints (None = all), plus the one
      with the lowest ``metrics[BEST_METRIC]`` (the best-known-good).
    async_save: write in the background (``enable_async_checkpointing``).
    read_only: only read (eval, transcription): nothing is created, cleaned
      or rotated.
  """

  def __init__(self, directory: str, save_interval_steps: int = 1000,
               max_to_keep: Optional[int] = 3, async_save: bool = True,
               read_only: bool = False):
    if save_interval_steps <= 0:
      raise ValueError(f"Checkpointer.save_interval_steps must be > 0, got {save_interval_steps}")
    self.directory = os.path.abspath(directory)
    self.save_interval_steps = save_interval_steps
    self.read_only = read_only
    self._unrecorded: list[int] = []   # saved steps whose checksums are not written yet
    self._verified: set[int] = set()
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0,
                                             enable_async_checkpointing=False)
    else:
      keep = ocp.checkpoint_managers.LatestN(n=max_to_keep)
      if max_to_keep is not None:
        keep = ocp.checkpoint_managers.AnyPreservationPolicy([
            keep, ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[BEST_METRIC], reverse=True, n=1,
                keep_checkpoints_without_metrics=False)])
      # best_fn only makes orbax write and reload the metrics; ``keep`` decides.
      options = ocp.CheckpointManagerOptions(
          save_interval_steps=save_interval_steps, preservation_policy=keep,
          best_fn=lambda metrics: metrics[BEST_METRIC], best_mode="min",
          enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  # -- where things are ---------------------------------------------------------

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def is_save_step(self, step: int) -> bool:
    return step > 0 and step % self.save_interval_steps == 0

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _require(self, step: Optional[int]) -> int:
    if step is None:
      step = self.latest_step()
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory} "
          f"(have steps {self.all_steps()})")
    return int(step)

  # -- checks --------------------------------------------------------------------

  def verify(self, step: int) -> bool:
    """Checks the step's files against its checksums (see ``verify_checksums``)."""
    if step in self._verified:
      return True
    verified = verify_checksums(self.step_dir(step), step)
    if verified:
      self._verified.add(step)
    else:
      logging.warning("checkpoint step %d in %s has no checksum manifest (%s): its files "
                      "cannot be verified", step, self.directory, CHECKSUMS_FILE)
    return verified

  def last_good_step(self, before: Optional[int] = None) -> Optional[int]:
    """The newest step (below ``before``) whose files verify, or None."""
    for step in reversed(self.all_steps()):
      if before is not None and step >= before:
        continue
      try:
        self.verify(step)
      except CorruptCheckpointError:
        continue
      return step
    return None

  def state_metadata(self, step: int) -> Any:
    """The saved state's tree of array metadata (shapes, dtypes), no arrays read."""
    path = epath.Path(self.step_dir(step)) / "state"
    metadata = ocp.PyTreeCheckpointHandler().metadata(path)
    return getattr(metadata, "tree", metadata)

  def check_fits(self, step: int, abstract_params: Any, model_info: str) -> None:
    """Raises ``CheckpointMismatchError`` if the step's params do not fit the model."""
    where = self.step_dir(step)
    saved = self.state_metadata(step)
    if not isinstance(saved, dict) or "params" not in saved:
      raise CheckpointMismatchError(
          f"checkpoint {where} has no state/params (found "
          f"{sorted(saved) if isinstance(saved, dict) else None})")
    check_params_match(
        saved["params"], abstract_params, f"checkpoint {where}", model_info,
        hint="\nUse the gin file (model size, task/vocabulary) the checkpoint was trained "
        "with; MODEL_DIR/config.gin holds its operative config.")

  # -- reading ---------------------------------------------------------------------

  def data_position(self, step: Optional[int] = None) -> dict[str, Any]:
    """The step's small ``data`` item (where the input pipeline stands)."""
    step = self._require(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    return dict(restored.data or {})

  def restore(self, abstract_state: Any, step: Optional[int] = None,
              model_info: str = "") -> tuple[Any, dict[str, Any]]:
    """Reads ``(state, data_position)`` of ``step`` (default: the latest).

    The step's checksums and its parameter shapes are checked first.

    Args:
      abstract_state: a pytree like the saved state whose leaves are
        ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``; the restored
        arrays get those shardings (any mesh shape).
      step: which checkpoint; None for the latest.
      model_info: describes the model in a mismatch message.

    Raises:
      FileNotFoundError: there is no checkpoint (for ``step``).
      CorruptCheckpointError: a file differs from its recorded checksum.
      CheckpointMismatchError: the parameters do not fit ``abstract_state``.
    """
    step = self._require(step)
    self.verify(step)
    self.check_fits(step, _as_dict(abstract_state)["params"], model_info or "the model")
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"checkpoint {self.step_dir(step)} does not fit the configured training state "
          f"(the optimizer, or its settings, differ?): {str(e).splitlines()[0][:300]}"
      ) from e
    logging.info("Restored checkpoint of step %d from %s", step, self.directory)
    return restored.state, dict(restored.data)

  def restore_params(self, abstract_params: Any, step: Optional[int] = None,
                     model_info: str = "") -> Any:
    """Reads only ``state.params`` of ``step`` (default: the latest).

    Checksums and shapes are checked first, as in ``restore``; the optimizer
    state is never read. ``abstract_params`` leaves carry the target shardings.
    """
    step = self._require(step)
    self.verify(step)
    self.check_fits(step, abstract_params, model_info or "the model")
    item = {"params": abstract_params}
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    logging.info("Restored the parameters of step %d from %s", step, self.directory)
    return restored.state["params"]

  def set_aside(self, step: int) -> str:
    """Moves a (corrupt) step out of the checkpoints, to ``../checkpoints_corrupt/``."""
    target = os.path.join(os.path.dirname(self.directory), CORRUPT_SUBDIR, str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if os.path.exists(target):
        shutil.rmtree(target)
      os.replace(self.step_dir(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._manager.reload()
    logging.warning("Moved the corrupt checkpoint of step %d to %s", step, target)
    return target

  # -- writing ---------------------------------------------------------------------

  def save(self, step: int, state: Any, data_position: dict[str, Any],
           force: bool = False, metrics: Optional[dict[str, float]] = None) -> bool:
    """Starts writing a checkpoint for ``step``; returns whether one was started.

    Without ``force`` only steps that are multiples of ``save_interval_steps``
    are written. A step that already has a checkpoint is never rewritten.
    The caller must not pass a state with non-finite values (the trainer
    checks the loss first), so the newest checkpoint is always a good one.
    ``metrics`` (``{BEST_METRIC: value}``) rank checkpoints for keeping the
    best-known-good one.

    Raises:
      CheckpointSaveError: this or the previous save failed for lack of space.
    """
    step = int(step)
    if not (force or self.is_save_step(step)) or step in self._manager.all_steps():
      return False
    self.wait_until_finished()
    try:
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ocp.args.JsonSave(dict(data_position))),
          metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
          force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(step, e)
      raise
    if saved:
      self._unrecorded.append(step)
      logging.info("Saving checkpoint for step %d to %s", step, self.directory)
    return saved

  def _raise_save_error(self, step: int, error: BaseException) -> None:
    if not is_out_of_space(error):
      return
    good = [s for s in self.all_steps() if s != step and os.path.isdir(self.step_dir(s))]
    last = f"step {good[-1]} ({self.step_dir(good[-1])})" if good else "none"
    raise CheckpointSaveError(
        f"the disk is full: checkpoint step {step} could not be written to "
        f"{self.directory}; the last good checkpoint is {last}. Free space and rerun the same "
        "command to resume from it.") from error

  def _record_checksums(self) -> None:
    """Writes the manifests of steps orbax has finished since the last call."""
    steps, self._unrecorded = self._unrecorded, []
    for step in steps:
      if jax.process_index() != 0 or not os.path.isdir(self.step_dir(step)):
        continue
      try:
        write_checksums(self.step_dir(step), step)
      except OSError as e:
        self._raise_save_error(step, e)
        raise
      self._verified.add(step)

  def wait_until_finished(self) -> None:
    """Blocks until saves are on disk and their checksums are written."""
    pending = list(self._unrecorded)
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._unrecorded = []
      self._raise_save_error(pending[-1] if pending else -1, e)
      raise
    self._record_checksums()

  def close(self) -> None:
    try:
      if not self.read_only:
        self.wait_until_finished()
    finally:
      self._manager.close()


def model_dir_checkpoints(path: str) -> Checkpointer:
  """A read-only ``Checkpointer`` for a MODEL_DIR or its checkpoints directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    path = os.path.join(path, CHECKPOINT_SUBDIR)
  return Checkpointer(path, read_only=True)


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
    return cross_process.any_process(local)

  def __enter__(self) -> "PreemptionHandler":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()
