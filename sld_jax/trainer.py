"""Sharded training: state from an abstract init, a jitted step, the loop.

``Trainer`` holds what is compiled once per run (MaxText style):

  abstract state  ``jax.eval_shape`` of the boxed init -> logical axes
                  -> ``NamedSharding``s (``sld_jax.partitioning``)
  state           initialised straight into those shardings, or restored
                  into them from a checkpoint (any mesh shape)
  train step      ``jax.jit(step, in_shardings=(state, batch),
                  out_shardings=(state, replicated), donate_argnums=0)``

``train`` is the gin-configured loop around it: step-indexed data, logging
(``MODEL_DIR/metrics.jsonl``, TensorBoard, a console line with ETA),
periodic evaluation through ``evaluators``, asynchronous checkpoints, a save
on SIGTERM/SIGINT, and a stop on a non-finite or diverging loss
(``DivergenceMonitor``) that keeps the last good checkpoint. The run
directory is locked for the run's lifetime (``sld_jax.run_lock``), and a
resumed checkpoint is verified against its checksums and the model's shapes
before anything is read (``sld_jax.checkpointing``).

Randomness is a function of the step: the step's key is
``fold_in(train_key, step)``, microbatch ``a`` uses ``fold_in(step_key, a)``,
and ``SpeechTextLM.loss_fn`` folds dropout and time-masking keys from that.
A resumed run therefore repeats the original run's randomness exactly.

Gradient accumulation scans over microbatches inside the step (only one
microbatch's activations are live at a time, unlike ``optax.MultiSteps``,
which would need a step per microbatch and keep a copy of the gradients in
the optimizer state). The batch of ``B`` rows becomes ``A`` microbatches of
``B/A`` rows, microbatch ``a`` taking rows ``a, a + A, a + 2A, ...`` so each
device keeps working on its own rows::

  rows       0 1 2 3 4 5 6 7       (B=8, A=2, 2 batch shards: rows 0-3 | 4-7)
  micro 0    0   2   4   6         shard 0 has 0 2 | shard 1 has 4 6
  micro 1      1   3   5   7       shard 0 has 1 3 | shard 1 has 5 7
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from absl import logging
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax

from sld_jax import checkpointing
from sld_jax.divergence import DivergenceError, DivergenceMonitor, NonFiniteLossError
from sld_jax import gin_utils
from sld_jax import input_pipeline
from sld_jax import metrics_writer
from sld_jax import optim
from sld_jax import partitioning
from sld_jax import run_assets
from sld_jax import run_lock
from sld_jax.lm import SpeechTextLM
from sld_jax.train_state import TrainState, param_count

# ``trainer.train.evaluators``: factories called once with the Trainer, each
# returning evaluator(state, step) -> {name: scalar} (``sld_jax.evaluators``).
Evaluator = Callable[[TrainState, int], Mapping[str, Any]]
EvaluatorFactory = Callable[["Trainer"], Evaluator]


def split_microbatches(x: jax.Array, count: int) -> jax.Array:
  """``[B, ...] -> [count, B / count, ...]``; microbatch ``a`` = rows ``a::count``."""
  rows = x.shape[0]
  if rows % count:
    raise ValueError(f"batch of {rows} rows does not split into {count} microbatches")
  return x.reshape((rows // count, count) + x.shape[1:]).swapaxes(0, 1)


class Trainer:
  """Sharded state and compiled steps for one model, optimizer and mesh."""

  def __init__(self, model: SpeechTextLM, optimizer: optax.GradientTransformation,
               learning_rate: optim.Schedule, mesh: jax.sharding.Mesh,
               rules: partitioning.LogicalRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
               seed: int = 0, gradient_accumulation_steps: int = 1,
               compiler_options: Optional[Mapping[str, Any]] = None):
    """See ``train`` for the arguments; ``compiler_options`` go to every ``jax.jit``."""
    if gradient_accumulation_steps < 1:
      raise ValueError(
          f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    self.model = model
    self.optimizer = optimizer
    self.learning_rate = learning_rate
    self.mesh = mesh
    self.rules = tuple(rules)
    self.seed = seed
    self.gradient_accumulation_steps = gradient_accumulation_steps
    self.init_key, self.train_key = jax.random.split(jax.random.key(seed))
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.batch_sharding = partitioning.data_sharding(mesh)

    self.abstract_state, self.state_shardings = partitioning.abstract_state(
        self._init_boxed, self.init_key, mesh=mesh, rules=self.rules)
    self.num_params = param_count(self.abstract_state.params)

    jit = functools.partial(jax.jit, compiler_options=compiler_options)
    self._init = jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)),
                     out_shardings=self.state_shardings)
    self._train_step = jit(
        self._step, in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
    self._eval_step = jit(
        self._eval_sums, in_shardings=(self.state_shardings.params, self.batch_sharding),
        out_shardings=self.replicated)

  def context(self):
    """The mesh and logical axis rules; programs are traced and run inside it."""
    return partitioning.sharding_context(self.mesh, self.rules)

  # -- state -----------------------------------------------------------------

  def _init_boxed(self, rng: jax.Array) -> TrainState:
    return TrainState.create(self.model.init_params(rng), self.optimizer)

  def init_state(self) -> TrainState:
    """A fresh state, each device allocating only its shards.

    (One jit into the shardings ``partitioning.abstract_state`` derived in
    ``__init__``.)
    """
    with self.context():
      return self._init(self.init_key)

  def init_state_from_params(self, params: Any) -> TrainState:
    """A fresh optimizer state around given (e.g. pretrained) ``params``."""
    with self.context():
      create = jax.jit(lambda p: TrainState.create(p, self.optimizer),
                       in_shardings=(self.state_shardings.params,),
                       out_shardings=self.state_shardings)
      return create(params)

  # -- steps -----------------------------------------------------------------

  def shard_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows (with the model's ``host_features``) -> global
    arrays split over ('data', 'fsdp')."""
    return partitioning.shard_host_batch(self.model.host_features(host_batch), self.mesh)

  def _gradients(self, params: Any, batch: Mapping[str, jax.Array], step_key: jax.Array):
    """Gradients and metric sums of the whole batch, over its microbatches."""
    totals = self.model.target_counts(batch)
    grad_fn = jax.grad(self.model.microbatch_objective, has_aux=True)
    count = self.gradient_accumulation_steps
    if count == 1:
      return grad_fn(params, batch, jax.random.fold_in(step_key, 0), totals)

    micro_sharding = NamedSharding(self.mesh, PartitionSpec(None, *self.batch_sharding.spec))
    microbatches = {
        name: jax.lax.with_sharding_constraint(split_microbatches(x, count), micro_sharding)
        for name, x in batch.items()}

    def accumulate(carry, xs):
      index, microbatch = xs
      out = grad_fn(params, microbatch, jax.random.fold_in(step_key, index), totals)
      return jax.tree.map(jnp.add, carry, out), None

    first = jax.tree.map(lambda x: x[0], microbatches)
    zero_grads, zero_sums = jax.tree.map(
        jnp.zeros_like, jax.eval_shape(grad_fn, params, first, step_key, totals))
    zero_grads = jax.lax.with_sharding_constraint(zero_grads, self.state_shardings.params)
    (grads, sums), _ = jax.lax.scan(
        accumulate, (zero_grads, zero_sums), (jnp.arange(count), microbatches))
    return grads, sums

  def _step(self, state: TrainState, batch: Mapping[str, jax.Array]):
    step_key = jax.random.fold_in(self.train_key, state.step)
    grads, sums = self._gradients(state.params, batch, step_key)
    metrics = self.model.from_sums(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = jnp.asarray(self.learning_rate(state.step), jnp.float32)
    state = state.apply_gradients(grads, self.optimizer)
    metrics["param_norm"] = optax.tree.norm(state.params)
    return state, metrics

  def _eval_sums(self, params, batch):
    _, aux = self.model.loss_fn(params, batch)
    return self.model.to_sums(aux)

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update (``state`` is donated: do not reuse it)."""
    with self.context():
      return self._train_step(state, batch)

  def lower_train_step(self, batch: Mapping[str, Any]) -> jax.stages.Lowered:
    """The jitted step lowered for ``abstract_state`` and ``batch``'s shapes.

    Ahead-of-time compilation as MaxText's ``train_compile`` does it: nothing
    is allocated; ``.compile()`` gives the executable whose
    ``memory_analysis()``, ``cost_analysis()`` and ``as_text()`` describe the
    step that ``train_step`` runs. ``batch`` may hold arrays (the model's
    ``host_features`` are added) or ``jax.ShapeDtypeStruct``s of the global
    batch.
    """
    batch = self.model.host_features(batch)
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_sharding), batch)
    with self.context():
      return self._train_step.lower(self.abstract_state, abstract_batch)

  def evaluate(self, params: Any, host_batches: Iterable[Mapping[str, np.ndarray]]
               ) -> dict[str, float]:
    """Teacher-forced metrics over batches (no dropout, no time masking)."""
    total = None
    with self.context():
      for host_batch in host_batches:
        sums = self._eval_step(params, self.shard_batch(host_batch))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
      raise ValueError("evaluate: no batches")
    return {k: float(v) for k, v in jax.device_get(self.model.from_sums(total)).items()}


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int
  last_metrics: dict[str, Any]
  stopped_early: bool


def _fetch_and_check(pending: list[tuple[int, Any]],
                     checkpointer: checkpointing.Checkpointer,
                     monitor: Optional[DivergenceMonitor] = None) -> list[tuple[int, dict]]:
  """Brings pending ``(step, metrics)`` to the host; raises on a non-finite or
  diverging value."""
  fetched = jax.device_get(pending)

  def stop(error_type, what):
    checkpointer.wait_until_finished()  # saves in flight hold earlier, good states
    last = checkpointer.latest_step()
    raise error_type(
        f"{what}: training stopped. Nothing was saved after it; the last good checkpoint is "
        f"{'none' if last is None else f'step {last}'} in {checkpointer.directory}. "
        "Lower the learning rate, enable clipping (make_optimizer.clip_grad_norm) or "
        "check the data.")

  for step, metrics in fetched:
    for name in ("loss", "grad_norm", "param_norm"):
      value = float(metrics[name])
      if not math.isfinite(value):
        stop(NonFiniteLossError, f"non-finite {name} ({value}) at step {step}")
    problem = monitor.check(step, metrics) if monitor is not None else None
    if problem:
      stop(DivergenceError, f"training diverged: {problem}")
  return fetched


@gin.configurable
def train(model_dir: str = gin.REQUIRED,
          total_steps: int = gin.REQUIRED,
          train_data: input_pipeline.BatchSource = gin.REQUIRED,
          model: Callable[..., SpeechTextLM] = SpeechTextLM,
          learning_rate: Callable[..., optim.Schedule] = optim.learning_rate_schedule,
          optimizer: Callable[..., optax.GradientTransformation] = optim.make_optimizer,
          mesh: Optional[jax.sharding.Mesh] = None,
          logical_axis_rules: Optional[partitioning.LogicalRules] = None,
          seed: int = 0,
          gradient_accumulation_steps: int = 1,
          log_every: int = 10,
          checkpoint_every: int = 1000,
          keep_checkpoints: Optional[int] = 3,
          async_checkpointing: bool = True,
          eval_every: int = 0,
          evaluators: Sequence[EvaluatorFactory] = (),
          stop_after_steps: Optional[int] = None,
          tensorboard: bool = True,
          compiler_options: Optional[Mapping[str, Any]] = None,
          init_from: Optional[str] = None,
          divergence: Optional[Callable[[], DivergenceMonitor]] = DivergenceMonitor,
          corrupt_checkpoint: str = "refuse") -> TrainResult:
  """Trains to ``total_steps`` optimizer steps, resuming from ``model_dir``.

  Args:
    model_dir: checkpoints, metrics and the operative config go here. If it
      holds a checkpoint, training resumes from the latest one.
    total_steps: the run's total number of steps (the schedule spans them);
      a resumed run continues up to it.
    train_data: step-indexed training batches (``input_pipeline``).
    model: ``model(layout) -> SpeechTextLM`` (gin-configured class).
    learning_rate: ``learning_rate(total_steps=...) -> schedule``.
    optimizer: ``optimizer(learning_rate=schedule) -> GradientTransformation``.
    mesh: the device mesh; default ``partitioning.make_mesh()`` (gin).
    logical_axis_rules: default ``partitioning.logical_axis_rules()`` (gin).
    seed: parameter init and the per-step dropout / time-masking keys.
    gradient_accumulation_steps: microbatches per step (scanned).
    log_every: steps between metric lines (and host-side NaN checks).
    checkpoint_every: steps between checkpoints (also saved at the end and
      on SIGTERM/SIGINT).
    keep_checkpoints: how many of the newest to keep (None = all); the one
      with the lowest recent median loss is kept besides them.
    async_checkpointing: write checkpoints in the background.
    eval_every: steps between evaluations (0 = only at the end, if any
      evaluators are configured).
    evaluators: factories called once with the ``Trainer``; each returns
      ``evaluator(state, step) -> {name: scalar}``.
    stop_after_steps: stop (with a checkpoint) after this many steps of this
      invocation, e.g. to fit a job time limit; the run is then resumable.
    tensorboard: also write TensorBoard event files.
    compiler_options: XLA options for every compiled program (``jax.jit``'s
      ``compiler_options``), e.g. ``{"xla_gpu_enable_latency_hiding_scheduler":
      True}``; the tests use ``{"xla_backend_optimization_level": 0}`` on CPU.
    init_from: start a fresh run (not a resumed one) from pretrained
      parameters: a Hugging Face GPT-2 directory or a params checkpoint from
      ``scripts/convert_gpt2.py`` (``sld_jax.hf_gpt2.init_params_from``).
    divergence: ``divergence() -> DivergenceMonitor`` (gin-configured), or
      None to stop only on NaN/Inf.
    corrupt_checkpoint: what resuming does when the latest checkpoint fails
      its checksums: "refuse" (default: stop, naming the file and the newest
      good step) or "use_previous" (move the corrupt steps to
      ``MODEL_DIR/checkpoints_corrupt/`` and resume from the newest good one).

  Returns:
    A ``TrainResult`` with the final state and the last logged metrics.

  Raises:
    NonFiniteLossError: the loss, gradient norm or parameter norm became NaN/Inf.
    DivergenceError: the loss or gradient norm diverged (``DivergenceMonitor``).
    run_lock.RunDirectoryLocked: another live trainer holds ``model_dir``.
    checkpointing.CheckpointError: the checkpoint to resume from is corrupt or
      does not fit the model; a save failed for lack of disk space.
  """
  if corrupt_checkpoint not in ("refuse", "use_previous"):
    raise ValueError(f"train.corrupt_checkpoint must be \"refuse\" or \"use_previous\", "
                     f"got {corrupt_checkpoint!r}")
  if total_steps <= 0:
    raise ValueError(f"train.total_steps must be > 0, got {total_steps}")
  for name, value in (("log_every", log_every), ("checkpoint_every", checkpoint_every)):
    if value <= 0:
      raise ValueError(f"train.{name} must be > 0, got {value}")
  is_primary = jax.process_index() == 0
  with run_lock.RunLock(model_dir, is_primary=is_primary):
    return _train_locked(
        model_dir, total_steps, train_data, model, learning_rate, optimizer, mesh,
        logical_axis_rules, seed, gradient_accumulation_steps, compiler_options, init_from,
        checkpointer_options=dict(save_interval_steps=checkpoint_every,
                                  max_to_keep=keep_checkpoints,
                                  async_save=async_checkpointing),
        tensorboard=tensorboard, evaluators=evaluators, corrupt_checkpoint=corrupt_checkpoint,
        monitor=divergence() if divergence is not None else None,
        loop_options=dict(log_every=log_every, eval_every=eval_every,
                          stop_after_steps=stop_after_steps))


def _resume(checkpointer: checkpointing.Checkpointer, trainer: Trainer, model_info: str,
            corrupt_checkpoint: str) -> tuple[TrainState, dict[str, Any]]:
  """The latest good checkpoint's state; corrupt ones refused or set aside."""
  while True:
    step = checkpointer.latest_step()
    try:
      return checkpointer.restore(trainer.abstract_state, step, model_info=model_info)
    except checkpointing.CorruptCheckpointError as e:
      previous = checkpointer.last_good_step(before=step)
      if corrupt_checkpoint != "use_previous":
        offer = ("There is no earlier good checkpoint: start a new MODEL_DIR." if previous
                 is None else f"The newest good checkpoint is step {previous}: to resume from "
                 "it, rerun with --gin.trainer.train.corrupt_checkpoint=\"use_previous\" (the "
                 f"corrupt steps are then moved to {checkpointing.CORRUPT_SUBDIR}/).")
        raise checkpointing.CorruptCheckpointError(f"{e}. {offer}", e.step, e.path) from None
      if previous is None:
        raise
      logging.warning("%s; resuming from step %d instead", e, previous)
      for bad in [s for s in checkpointer.all_steps() if s > previous]:
        checkpointer.set_aside(bad)


def _train_locked(model_dir, total_steps, train_data, model, learning_rate, optimizer, mesh,
                  logical_axis_rules, seed, gradient_accumulation_steps, compiler_options,
                  init_from, *, checkpointer_options, tensorboard, evaluators,
                  corrupt_checkpoint, monitor, loop_options) -> TrainResult:
  """``train`` once the run directory is locked."""
  is_primary = jax.process_index() == 0
  mesh = partitioning.make_mesh() if mesh is None else mesh
  rules = partitioning.logical_axis_rules() if logical_axis_rules is None else logical_axis_rules
  lm = model(train_data.layout)
  run_assets.record(model_dir, train_data, lm.config, is_primary)  # refuses other assets
  schedule = learning_rate(total_steps=total_steps)
  trainer = Trainer(lm, optimizer(learning_rate=schedule), schedule, mesh, rules, seed=seed,
                    gradient_accumulation_steps=gradient_accumulation_steps,
                    compiler_options=compiler_options)
  logging.info("Model: %s; %.2fM parameters; mesh %s; %d processes", lm.config,
               trainer.num_params / 1e6, dict(mesh.shape), jax.process_count())

  checkpointer = checkpointing.Checkpointer(
      os.path.join(model_dir, checkpointing.CHECKPOINT_SUBDIR), **checkpointer_options)
  train_writer = metrics_writer.MetricsWriter(
      os.path.join(model_dir, "metrics.jsonl"),
      os.path.join(model_dir, "tensorboard", "train") if tensorboard else None, is_primary)
  eval_writer = metrics_writer.MetricsWriter(
      os.path.join(model_dir, "eval_metrics.jsonl"),
      os.path.join(model_dir, "tensorboard", "eval") if tensorboard else None, is_primary)
  preemption = checkpointing.PreemptionHandler()

  try:
    if checkpointer.latest_step() is not None:
      state, position = _resume(checkpointer, trainer,
                                f"{lm.config}, vocabulary {train_data.layout}",
                                corrupt_checkpoint)
      start_step = int(jax.device_get(state.step))
      train_data.check_resume(position, start_step)
      logging.info("Resuming from step %d", start_step)
    elif init_from:
      from sld_jax import hf_gpt2  # pylint: disable=g-import-not-at-top
      logging.info("Initialising parameters from %s", init_from)
      params = hf_gpt2.init_params_from(init_from, lm.config, train_data.layout,
                                        shardings=trainer.state_shardings.params)
      state, start_step = trainer.init_state_from_params(params), 0
    else:
      state, start_step = trainer.init_state(), 0
    train_writer.truncate_after(start_step)
    eval_writer.truncate_after(start_step)
    built_evaluators = [factory(trainer) for factory in evaluators]
    gin_utils.write_operative_config(model_dir, is_primary=is_primary)

    result = _loop(trainer, state, start_step, total_steps, train_data, checkpointer,
                   train_writer, eval_writer, preemption, built_evaluators, monitor,
                   **loop_options)
    gin_utils.write_operative_config(model_dir, is_primary=is_primary)
  except BaseException:
    for close in (checkpointer.close, train_writer.close, eval_writer.close):
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("while stopping: %s", str(e).splitlines()[0] if str(e) else repr(e))
    raise
  checkpointer.close()
  train_writer.close()
  eval_writer.close()
  return result


def _loop(trainer: Trainer, state: TrainState, start_step: int, total_steps: int,
          data: input_pipeline.BatchSource, checkpointer: checkpointing.Checkpointer,
          train_writer: metrics_writer.MetricsWriter, eval_writer: metrics_writer.MetricsWriter,
          preemption: checkpointing.PreemptionHandler, evaluators: list[Evaluator],
          monitor: Optional[DivergenceMonitor], *, log_every: int, eval_every: int,
          stop_after_steps: Optional[int]) -> TrainResult:
  """Steps from ``start_step`` to ``total_steps`` (or the stop step)."""
  batches = data.batches(start_step, jax.process_index(), jax.process_count())
  stop_step = total_steps if stop_after_steps is None else min(
      total_steps, start_step + stop_after_steps)
  if start_step >= stop_step:
    logging.warning("Already at step %d (total_steps=%d): no training to do", start_step,
                    total_steps)
  pending: list[tuple[int, Any]] = []   # (step, device metrics) not yet on the host
  last_record: dict[str, Any] = {}
  # Throughput is measured from ``timed_from`` (after the compiling first step
  # and after evaluations) to the next log line.
  timed_from, timed_since, seconds_per_step = None, 0.0, 0.0
  step = start_step

  def save(force=False) -> bool:
    if not (force or checkpointer.is_save_step(step)):
      return False
    _fetch_and_check(pending, checkpointer, monitor)  # never save a diverged state
    median = monitor.loss_median() if monitor is not None else None
    return checkpointer.save(step, state, data.position(step), force=True,
                             metrics=None if median is None else {
                                 checkpointing.BEST_METRIC: median})

  def run_evaluators():
    record = {}
    for evaluator in evaluators:
      record.update(evaluator(state, step))
    if record:
      eval_writer.write(step, record)
      logging.info("eval at step %d: %s", step, " ".join(
          f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)))

  with preemption:
    while step < stop_step:
      host_batch = next(batches)
      trainer.model.check_batch(host_batch, data.sequence_length, where=f"batch of step {step}")
      state, metrics = trainer.train_step(state, trainer.shard_batch(host_batch))
      step += 1
      pending.append((step, metrics))
      if timed_from is None:
        jax.block_until_ready(metrics)
        timed_from, timed_since = step, time.perf_counter()

      if step % log_every == 0 or step == stop_step:
        fetched = _fetch_and_check(pending, checkpointer, monitor)
        pending = []
        elapsed = time.perf_counter() - timed_since
        timed_steps = step - timed_from
        if timed_steps:
          seconds_per_step = elapsed / timed_steps
        tokens = sum(int(m["num_target_tokens"]) for s, m in fetched if s > timed_from)
        record = dict(fetched[-1][1])
        record["step_time"] = seconds_per_step
        record["tokens_per_second"] = tokens / elapsed if timed_steps else 0.0
        last_record = train_writer.write(step, record)
        if jax.process_index() == 0:
          logging.info("%s", metrics_writer.format_progress(
              step, total_steps, last_record, seconds_per_step))
        timed_from, timed_since = step, time.perf_counter()

      evaluated = eval_every and step % eval_every == 0 and step < total_steps
      if evaluated:
        run_evaluators()
      if save() or evaluated:  # keep their time out of step_time
        timed_from, timed_since = step, time.perf_counter()
      sync_point = step % log_every == 0 or checkpointer.is_save_step(step)
      if preemption.should_stop(collective=sync_point):
        logging.warning("Stopping at step %d after %s; saving a checkpoint", step,
                        preemption.signal_name or "a stop request")
        break

    save(force=True)
    if step == total_steps and evaluators:
      run_evaluators()
  checkpointer.wait_until_finished()
  train_writer.flush()
  eval_writer.flush()
  return TrainResult(state=state, step=step, last_metrics=last_record,
                     stopped_early=step < total_steps)
