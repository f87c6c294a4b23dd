"""Training's periodic dev evaluation: the factories ``trainer.train`` calls.

Each entry of ``trainer.train.evaluators`` is a factory called once with the
``Trainer``; the evaluator it returns is called as ``evaluator(state, step)``
every ``eval_every`` steps (and at the end) and returns numbers only, which
go to ``MODEL_DIR/eval_metrics.jsonl`` and TensorBoard::

  trainer.train.evaluators = [@evaluators.DecodingEvaluator]
  evaluators.DecodingEvaluator.data = @dev_data/input_pipeline.SeqioSource()
  -> {"dev/wer": 12.5, "dev/cer": 6.1, "dev/ce_text": 0.41, ...}

``DecodingEvaluator`` decodes and scores the dev split with the code of
``python -m sld_jax.eval`` (``sld_jax.scoring``); ``TeacherForcedEvaluator``
reports the losses and accuracies only, without decoding. Both read the dev
batches once and keep them in host memory.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

from absl import logging
import gin
import jax

from sld_jax import eval_batches
from sld_jax import input_pipeline
from sld_jax import scoring

if TYPE_CHECKING:
  from sld_jax import trainer as trainer_lib


@gin.configurable
class DecodingEvaluator:
  """Dev WER/CER (and teacher-forced losses) during training.

  Gin: ``trainer.train.evaluators = [..., @evaluators.DecodingEvaluator]`` with
  ``evaluators.DecodingEvaluator.data = @dev_data/input_pipeline.SeqioSource()``.
  The trainer calls ``DecodingEvaluator(trainer)`` once, then
  ``evaluator(state_or_params, step)``; the result holds numbers only, e.g.
  ``{"dev/wer": 12.5, "dev/cer": 6.1, "dev/ce_text": 0.41, ...}``.
  """

  REPORTED = ("wer", "cer", "num_utterances", "num_unended", "utterances_per_second",
              "tokens_per_second", "loss", "ce_text", "ce_speech", "ppl_text", "ppl_speech",
              "accuracy_text", "accuracy_speech")

  def __init__(self, trainer: trainer_lib.Trainer,
               data: input_pipeline.BatchSource = gin.REQUIRED,
               max_batches: Optional[int] = None, prefix: str = "dev/",
               decoding_config: Optional[scoring.DecodingConfig] = None,
               output_dir: Optional[str] = None, teacher_forced: bool = True,
               lowercase: bool = True, progress: bool = False):
    """Reads the dev batches once and keeps them in host memory.

    Args:
      trainer: a ``sld_jax.trainer.Trainer`` (model, mesh, rules, shardings).
      data: the dev source; its layout must be the model's.
      max_batches: evaluate only the first batches (None: the whole split).
      prefix: prepended to the metric names.
      decoding_config: default ``DecodingConfig()`` (gin-configured).
      output_dir: if set, predictions and metrics of each evaluation go to
        ``output_dir/step_<step>/<name>/``.
      teacher_forced: also report teacher-forced losses.
      lowercase: lower-case before computing WER/CER.
      progress: show a progress bar.
    """
    if data.layout != trainer.model.layout:
      raise ValueError(f"DecodingEvaluator: dev data layout {data.layout} differs from the "
                       f"model's {trainer.model.layout}")
    self.scorer = scoring.Scorer(trainer.model, trainer.mesh, trainer.rules,
                                 trainer.state_shardings.params, decoding_config)
    self.batches, self.detokenize, self.name = eval_batches.read_source(data, max_batches)
    self.prefix = prefix
    self.output_dir = output_dir
    self.teacher_forced = teacher_forced
    self.lowercase = lowercase
    self.progress = progress

  def __call__(self, state_or_params: Any, step: int) -> dict[str, float]:
    params = getattr(state_or_params, "params", state_or_params)
    score = scoring.score_batches(
        self.scorer, params, self.batches, self.detokenize, name=self.name,
        lowercase=self.lowercase, teacher_forced=self.teacher_forced, progress=self.progress)
    if self.output_dir:
      scoring.write_split(os.path.join(self.output_dir, f"step_{int(step)}", self.name), score,
                          {"step": int(step), "name": self.name,
                           **self.scorer.decoding.describe()})
    logging.info("dev decoding at step %d: %s", step, scoring.summary_table(
        [{"step": int(step), "task": self.name, "split": "-", **score.metrics}]))
    return {self.prefix + k: float(score.metrics[k]) for k in self.REPORTED
            if k in score.metrics}


@gin.configurable
class TeacherForcedEvaluator:
  """Dev-split losses and accuracies with teacher forcing.

  Gin: ``trainer.train.evaluators = [@evaluators.TeacherForcedEvaluator]``; the
  trainer calls ``TeacherForcedEvaluator(trainer)`` once, then
  ``evaluator(state, step)``. The dev batches are read once and kept in host
  memory.
  """

  def __init__(self, trainer: trainer_lib.Trainer,
               data: input_pipeline.BatchSource = gin.REQUIRED,
               max_batches: Optional[int] = None, prefix: str = "dev/"):
    self.trainer = trainer
    self.prefix = prefix
    if data.layout != trainer.model.layout:
      raise ValueError(
          f"TeacherForcedEvaluator: dev data layout {data.layout} differs from the "
          f"model's {trainer.model.layout}")
    self.batches = data.eval_batches(jax.process_index(), jax.process_count(), max_batches)
    for index, batch in enumerate(self.batches):
      trainer.model.check_batch(batch, where=f"dev batch {index}")

  def __call__(self, state: Any, step: int) -> dict[str, float]:
    del step
    metrics = self.trainer.evaluate(state.params, self.batches)
    return {self.prefix + name: value for name, value in metrics.items()}
