"""A trained run directory, read for inference: checkpoints, steps, parameters, layout.

``python -m sld_jax.eval`` and ``sld_jax.transcribe`` read a run that
``python -m sld_jax.train`` wrote::

  MODEL_DIR/checkpoints/<step>/   orbax steps (``sld_jax.checkpointing``)
  MODEL_DIR/assets/               the vocabulary layout and text model
                                  (``sld_jax.run_assets``)

``locate_checkpoints`` takes a MODEL_DIR, its checkpoints directory or one
step directory (which pins the step); ``select_steps`` picks "latest", "all"
or given steps; ``restore_params`` reads only ``state.params`` of a step,
straight into the shardings of an abstract tree, after checking checksums,
shapes and the vocabulary the step was trained with; ``run_layout`` is the
layout recorded in the run, checked against the eval tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Optional, Sequence, Union

from absl import logging

from sld_jax import checkpointing
from sld_jax import run_assets
from sld_jax.vocab import VocabLayout

Steps = Union[str, int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
  """``directory`` holds step directories; ``step`` is set for a step dir."""

  directory: str
  step: Optional[int] = None


def locate_checkpoints(path: str) -> CheckpointLocation:
  """MODEL_DIR, MODEL_DIR/checkpoints or MODEL_DIR/checkpoints/<step>.

  Raises:
    FileNotFoundError: the path is missing or holds no checkpoint.
  """
  path = os.path.abspath(os.path.expanduser(path))
  expected = (f"expected a MODEL_DIR holding {checkpointing.CHECKPOINT_SUBDIR}/<step>/ "
              "(written by sld_jax.train), its checkpoints directory, or a step directory")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"CHECKPOINT_PATH {path} does not exist or is not a directory; "
                            f"{expected}")
  location = CheckpointLocation(path)
  if os.path.isdir(os.path.join(path, checkpointing.CHECKPOINT_SUBDIR)):
    location = CheckpointLocation(os.path.join(path, checkpointing.CHECKPOINT_SUBDIR))
  elif os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    location = CheckpointLocation(os.path.dirname(path), int(os.path.basename(path)))
  with contextlib.closing(_reader(location.directory)) as reader:
    steps = reader.all_steps()
  if not steps:
    found = sorted(os.listdir(location.directory))[:10]
    raise FileNotFoundError(f"no checkpoints in {location.directory} (found {found}); "
                            f"{expected}")
  if location.step is not None and location.step not in steps:
    raise FileNotFoundError(f"{path} is not a complete checkpoint; complete steps in "
                            f"{location.directory}: {sorted(steps)}")
  return location


def _reader(directory: str) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(directory, read_only=True)


def select_steps(location: CheckpointLocation, steps: Steps = "latest") -> list[int]:
  """The steps to score: "latest", "all", a step or a list of steps."""
  with contextlib.closing(_reader(location.directory)) as reader:
    available = reader.all_steps()
  if location.step is not None:
    return [location.step]
  if steps == "latest":
    return available[-1:]
  if steps == "all":
    return available
  wanted = [steps] if isinstance(steps, int) else list(steps)
  missing = [s for s in wanted if s not in available]
  if missing or not wanted or not all(isinstance(s, int) for s in wanted):
    raise ValueError(f"evaluate.steps={steps!r}: want \"latest\", \"all\" or steps among "
                     f"{available} in {location.directory}")
  return sorted(wanted)


def _training_layout(source: Any) -> Optional[VocabLayout]:
  """The layout of the data a checkpoint was trained on, if it can be known cheaply."""
  if not isinstance(source, dict):
    return None
  if source.get("kind") == "synthetic":
    return VocabLayout(source["text_size"], source["speech_size"])
  if source.get("kind") == "seqio":
    import tasks  # pylint: disable=g-import-not-at-top
    from sld_jax.speech import prepare  # pylint: disable=g-import-not-at-top
    try:
      directory = tasks.prepared_dir(source["task"])
    except ValueError:
      return None
    if prepare.is_prepared(directory):   # never prepares data just for this check
      metadata = prepare.load_metadata(directory)
      return VocabLayout(metadata["text_size"], metadata["speech_size"])
  return None


def restore_params(location: CheckpointLocation, step: int, abstract: Any, layout: VocabLayout,
                   model_info: str, eval_tasks: Sequence[str]) -> Any:
  """Reads only ``state.params`` of ``step`` into the shardings of ``abstract``.

  Through ``checkpointing.Checkpointer.restore_params``: the step's
  checksums and parameter shapes are checked before any array is read.

  Raises:
    checkpointing.CorruptCheckpointError: a file differs from its checksum.
    checkpointing.CheckpointMismatchError: the parameter tree differs from
      the model's.
    ValueError: the checkpoint was trained on data with another vocabulary
      layout.
  """
  where = os.path.join(location.directory, str(step))
  with contextlib.closing(_reader(location.directory)) as reader:
    reader.verify(step)
    reader.check_fits(step, abstract, model_info)
    source = reader.data_position(step).get("source")
    trained = _training_layout(source)
    if trained is not None and trained != layout:
      raise ValueError(
          f"checkpoint {where} was trained on {source} with vocabulary {trained}, but the "
          f"eval task(s) {list(eval_tasks)} use {layout}: hypotheses would be decoded with the "
          "wrong vocabulary")
    if isinstance(source, dict) and source.get("kind") == "seqio" and (
        source.get("task") not in eval_tasks):
      logging.warning("checkpoint %s was trained on task %s; evaluating on %s", where,
                      source.get("task"), list(eval_tasks))
    return reader.restore_params(abstract, step, model_info)


def run_layout(location: CheckpointLocation, task_names: Sequence[str]) -> VocabLayout:
  """The vocabulary layout recorded in the run directory (``sld_jax.run_assets``).

  Each eval task must discretise as the run's training data did (same
  layout, text model, codebook, extractor settings): otherwise
  ``run_assets.AssetsMismatchError``. A run directory from before assets
  were recorded falls back to the tasks' layouts (with a warning).
  """
  model_dir = location.directory
  if os.path.basename(model_dir) == checkpointing.CHECKPOINT_SUBDIR:
    model_dir = os.path.dirname(model_dir)
  assets = run_assets.load_if_present(model_dir)
  if assets is not None:
    for name in task_names:
      run_assets.check_task(assets, name)
    return assets.layout
  logging.warning("%s has no recorded assets (%s/%s); taking the layout from the eval tasks",
                  model_dir, run_assets.ASSETS_SUBDIR, run_assets.MANIFEST)
  import tasks  # pylint: disable=g-import-not-at-top  (registers the tasks; TensorFlow)
  layouts = {name: tasks.get_layout(name) for name in task_names}
  if len(set(layouts.values())) != 1:
    raise ValueError(f"the eval tasks have different vocabulary layouts {layouts}; one model "
                     "reads one layout: evaluate them separately")
  return layouts[task_names[0]]
