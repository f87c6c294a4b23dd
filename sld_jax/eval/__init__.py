r"""Scores checkpoints on every eval split: ``python -m sld_jax.eval``.

  python -m sld_jax.eval \
    --gin_file=gin_configs/experiments/smoke.gin \
    --gin.CHECKPOINT_PATH=\"/tmp/sld_smoke\" \
    --gin.EVAL_OUTPUT_DIR=\"/tmp/sld_smoke/eval\" \
    [--gin.evaluate.steps=\"all\"] [--gin.DecodingConfig.method=\"beam\"] \
    [--gin.DecodingConfig.beam_size=8] [--gin.evaluate.splits=[\"test\"]]

The configuration is the experiment's gin file(s), then the eval command's
run file ``gin_configs/runs/eval.gin`` (``EVAL_GIN``, t5x style), then the
``--gin`` bindings. The experiment gives the model, the task (``TASK``), the
mesh and the batch shape (``BATCH_SIZE`` rows of ``SEQUENCE_LENGTH``
tokens), exactly as in training; eval.gin binds them to ``evaluate`` and
requires ``CHECKPOINT_PATH`` and ``EVAL_OUTPUT_DIR``. ``CHECKPOINT_PATH``
is a MODEL_DIR (with ``checkpoints/<step>/``), its ``checkpoints`` directory,
or one step directory. ``evaluate.steps`` picks "latest" (default), "all",
or given steps; a step directory pins its step. Only the parameters are
read (no optimizer state), straight into the training shardings. The
vocabulary layout is the one recorded in ``MODEL_DIR/assets/``
(``sld_jax.run_assets``), and an eval task whose data is discretised
otherwise (another codebook, text model or extractor setting) is refused
(``sld_jax.trained_run`` reads the run).

Outputs (``EVAL_OUTPUT_DIR``)::

  config.gin                              the gin config of this run
  step_<N>/<task>/<split>/predictions.jsonl   one line per utterance
  step_<N>/<task>/<split>/metrics.json        corpus WER/CER (%), S/D/I, losses, speed
  metrics.jsonl                           one line per scored (step, task, split)

A split already scored with the same decoding settings is skipped (and
reported from its metrics.json), so rerunning with ``steps="all"`` scores
only new checkpoints. A summary table goes to the console.

(A package so that ``python -m sld_jax.eval`` runs ``__main__.py`` against
this module as imported: gin then registers ``evaluate`` once, whether
eval.gin's ``import sld_jax.eval`` or the command line comes first.)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import jax

from sld_jax import atomic_files
from sld_jax import cli
from sld_jax import eval_batches
from sld_jax import gin_utils
from sld_jax import partitioning
from sld_jax import scoring
from sld_jax import trained_run
from sld_jax.lm import SpeechTextLM

# ----------------------------------------------------------------------------
# The evaluation run.
# ----------------------------------------------------------------------------


def _split_settings(decoding_config: scoring.DecodingConfig, **extra) -> dict[str, Any]:
  return {**decoding_config.describe(), **extra}


def _already_scored(directory: str, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
  path = os.path.join(directory, scoring.METRICS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    metrics = json.load(f)
  same = all(metrics.get(k) == v for k, v in settings.items())
  return metrics if same else None


@gin.configurable
def evaluate(checkpoint_path: str = gin.REQUIRED, output_dir: str = gin.REQUIRED, *,
             task_names: Sequence[str] = gin.REQUIRED,
             splits: Optional[Sequence[str]] = None,
             steps: trained_run.Steps = "latest",
             batch_size: int = gin.REQUIRED,
             sequence_length: int = gin.REQUIRED,
             decoding_config: Optional[scoring.DecodingConfig] = None,
             model: Callable[..., SpeechTextLM] = SpeechTextLM,
             mesh: Optional[jax.sharding.Mesh] = None,
             logical_axis_rules: Optional[partitioning.LogicalRules] = None,
             max_batches: Optional[int] = None,
             lowercase: bool = True,
             teacher_forced: bool = True,
             rescore: bool = False,
             progress: bool = True) -> list[dict[str, Any]]:
  """Scores checkpoint steps on eval splits; returns one metrics row per split.

  Gin (``gin_configs/runs/eval.gin``) binds the arguments from the macros
  ``CHECKPOINT_PATH``, ``EVAL_OUTPUT_DIR``, ``TASK``, ``BATCH_SIZE`` and
  ``SEQUENCE_LENGTH`` and the experiment's model and mesh.

  Args:
    checkpoint_path: MODEL_DIR, its checkpoints dir, or a step dir.
    output_dir: where results go (module docstring).
    task_names: the seqio tasks whose splits are scored.
    splits: default: every split of each task but "train".
    steps: "latest", "all", a step or a list of steps.
    batch_size: global rows per batch.
    sequence_length: longest example in tokens.
    decoding_config: default ``DecodingConfig()`` (gin-configured).
    model: ``model(layout) -> SpeechTextLM`` (gin-configured, as in training).
    mesh / logical_axis_rules: default ``partitioning.make_mesh()`` /
      ``partitioning.logical_axis_rules()`` (gin-configured, as in training).
    max_batches: score only the first batches of each split.
    lowercase: lower-case texts before WER/CER.
    teacher_forced: also compute teacher-forced losses.
    rescore: score splits even if already scored with the same settings.
    progress: show progress bars.
  """
  location = trained_run.locate_checkpoints(checkpoint_path)
  step_list = trained_run.select_steps(location, steps)
  task_names = list(task_names)
  decoding_config = decoding_config or scoring.DecodingConfig()
  mesh = partitioning.make_mesh() if mesh is None else mesh
  rules = partitioning.logical_axis_rules() if logical_axis_rules is None else logical_axis_rules

  layout = trained_run.run_layout(location, task_names)
  lm = model(layout)
  model_info = f"{lm.config}, vocabulary {layout} of task(s) {task_names}"
  abstract, shardings = partitioning.abstract_state(
      lm.init_params, jax.random.key(0), mesh=mesh, rules=rules)
  scorer = scoring.Scorer(lm, mesh, rules, shardings, decoding_config)

  pairs = [(name, split) for name in task_names
           for split in (splits or eval_batches.eval_splits(name))]
  for name, split in pairs:
    eval_batches.check_split(name, split)
  data = {}

  def split_data(name: str, split: str):
    """The split's batches and detokenizer, read once on first use."""
    if (name, split) not in data:
      data[(name, split)] = (eval_batches.read_task_split(
          name, split, sequence_length=sequence_length, batch_size=batch_size,
          process_index=jax.process_index(), process_count=jax.process_count(),
          max_batches=max_batches), eval_batches.task_detokenizer(name))
    return data[(name, split)]

  is_primary = jax.process_index() == 0
  if is_primary:
    atomic_files.write_text(os.path.join(output_dir, gin_utils.CONFIG_FILENAME),
                            gin.config_str())
  rows = []
  for step in step_list:
    settings = _split_settings(decoding_config, step=step, max_batches=max_batches,
                               sequence_length=sequence_length, lowercase=lowercase)
    pending = {}
    for name, split in pairs:
      directory = os.path.join(output_dir, f"step_{step}", name, split)
      previous = None if rescore else _already_scored(directory, settings)
      if previous is not None:
        logging.info("step %d %s/%s already scored in %s; skipping", step, name, split,
                     directory)
        rows.append(previous)
      else:
        pending[(name, split)] = directory
    if not pending:
      continue
    params = trained_run.restore_params(location, step, abstract, layout, model_info,
                                        task_names)
    for (name, split), directory in pending.items():
      batches, detokenize = split_data(name, split)
      score = scoring.score_batches(
          scorer, params, batches, detokenize, name=f"step {step} {name}/{split}",
          lowercase=lowercase, teacher_forced=teacher_forced, progress=progress)
      extra = {**settings, "task": name, "split": split,
               "checkpoint": os.path.join(location.directory, str(step))}
      scoring.write_split(directory, score, extra)
      row = {**extra, **score.metrics}
      rows.append(row)
      if is_primary:
        with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
          f.write(json.dumps(row, default=float) + "\n")
    del params
  if is_primary:
    print(scoring.summary_table(rows), flush=True)
  return rows


# ----------------------------------------------------------------------------
# The main.
# ----------------------------------------------------------------------------

FLAGS = flags.FLAGS
EVAL_GIN = "gin_configs/runs/eval.gin"


def configure(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
              search_paths: Sequence[str] = gin_utils.DEFAULT_SEARCH_PATHS) -> None:
  """Parses the experiment's files, then ``EVAL_GIN``, then the bindings.

  ``EVAL_GIN`` is added after the given files unless it is among them
  (``--gin_file=<experiment> --gin_file=gin_configs/runs/eval.gin``, as t5x
  is called, works as well).

  Raises:
    gin_utils.GinConfigError: a required macro is missing or unknown, e.g.
      ``TASK`` for an experiment on generated data (no eval splits).
  """
  files = list(gin_files)
  if not any(os.path.normpath(f).endswith(os.path.normpath(EVAL_GIN)) for f in files):
    files.append(EVAL_GIN)
  try:
    gin_utils.parse_gin_config(files, gin_bindings, search_paths, known_macros=())
  except gin_utils.GinConfigError as e:
    if "'TASK/gin.macro'" not in str(e):
      raise
    raise gin_utils.GinConfigError(
        "sld_jax.eval scores the splits of seqio tasks, and this gin config defines no TASK "
        "macro (generated data has no eval splits; its dev WER comes from training's "
        "evaluators.DecodingEvaluator). Pass --gin.TASK=\\\"task_name\\\" or "
        "--gin.evaluate.task_names=[...]") from None


def main(argv) -> None:
  cli.start(argv)
  configure(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
  evaluate()


def run() -> None:
  cli.define_flags()
  app.run(main, argv=gin_utils.rewrite_gin_args(sys.argv))
