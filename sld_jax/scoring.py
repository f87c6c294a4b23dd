"""Scoring a model on eval utterances: decoding + WER/CER and teacher forcing.

The shared core of ``python -m sld_jax.eval``, of training's periodic dev
evaluation (``sld_jax.evaluators.DecodingEvaluator``) and of transcription.
``score_batches``: for every fixed-shape batch of utterances
(``sld_jax.eval_batches``) it decodes the transcripts (greedy or beam search
from the prompt ``0 units <speech_end>``, ``sld_jax.decoding``), scores the
references with teacher forcing, and aligns hypotheses with references
(``sld_jax.wer``, counting as jiwer 4.0).

``Scorer`` holds the jitted functions under the training mesh and parameter
shardings. Decoding compiles once per prompt bucket ``P``; the KV cache
holds ``min(max_length, P + max_decode_length)`` positions and row ``b`` may
emit ``min(max_decode_length, cache - prompt_length[b])`` tokens, so a row's
hypothesis never depends on the other rows of its batch. Compilation is
done before the timed loop (``compile_seconds``), so ``utterances_per_second``
and ``tokens_per_second`` measure decoding alone (host transfers included).

Per split, ``write_split`` writes ``predictions.jsonl``, e.g.::

  {"id": "dev-3", "reference": "four oh seven", "hypothesis": "four oh seven one",
   "word_errors": 1, "word_count": 3, "substitutions": 0, "deletions": 0,
   "insertions": 1, "char_errors": 4, "char_count": 13, "ended": true,
   "hypothesis_tokens": 4, "decode_score": -0.8, "transcript_logprob": -0.5,
   "transcript_tokens": 4}

and ``metrics.json`` with corpus ``wer``/``cer`` in percent, the S/D/I
counts, ``num_utterances``, teacher-forced ``ce_text``/``ce_speech`` (and
``ppl_*``, ``accuracy_*``, ``loss``), and the decoding speed. Hypotheses and
references are lower-cased before alignment (the paper scores lower-cased
text); the file holds the strings as scored, so ``jiwer.wer`` over its
pairs equals ``wer / 100``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from sld_jax import atomic_files
from sld_jax import cross_process
from sld_jax import decoding
from sld_jax import eval_batches
from sld_jax import model_inputs
from sld_jax import partitioning
from sld_jax import wer as wer_lib
from sld_jax.lm import SpeechTextLM
from sld_jax.model import decoder as decoder_lib
from sld_jax.vocab import VocabLayout

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """How transcripts are decoded.

  Attributes:
    method: "greedy" (the paper's setting) or "beam".
    beam_size: beams per utterance (beam search).
    length_penalty: GNMT alpha of the beam score ``log p / ((5 + len) / 6) ** alpha``.
    max_decode_length: text budget in tokens, <text_end> included (the
      released setup keeps transcripts to 150 text tokens).
  """

  method: str = "greedy"
  beam_size: int = 4
  length_penalty: float = 0.0
  max_decode_length: int = 150

  def __post_init__(self):
    if self.method not in decoding.METHODS:
      raise ValueError(f"DecodingConfig.method must be one of {decoding.METHODS}, "
                       f"got {self.method!r}")
    if self.beam_size < 1 or self.max_decode_length < 1:
      raise ValueError(f"DecodingConfig: beam_size ({self.beam_size}) and max_decode_length "
                       f"({self.max_decode_length}) must be >= 1")

  def describe(self) -> dict[str, Any]:
    out = {"method": self.method, "max_decode_length": self.max_decode_length}
    if self.method == "beam":
      out.update(beam_size=self.beam_size, length_penalty=self.length_penalty)
    return out


# ----------------------------------------------------------------------------
# Compiled decoding and teacher-forced scoring.
# ----------------------------------------------------------------------------


class Scorer:
  """Jitted decoding and teacher-forced scoring of fixed-shape batches.

  Functions are compiled ahead of time per input shape (one per prompt
  bucket for decoding, one for scoring) and kept; ``compile_seconds`` adds
  up the time spent compiling.
  """

  def __init__(self, model: SpeechTextLM, mesh: jax.sharding.Mesh,
               rules: partitioning.LogicalRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
               param_shardings: Any = None, decoding_config: Optional[DecodingConfig] = None):
    self.model = model
    self.layout = model.layout
    self.mesh = mesh
    self.rules = tuple(rules)
    self.decoding = decoding_config or DecodingConfig()
    if param_shardings is None:
      _, param_shardings = partitioning.abstract_state(model.init_params, jax.random.key(0),
                                                       mesh=mesh, rules=self.rules)
    self.param_shardings = param_shardings
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.compile_seconds = 0.0
    self._compiled: dict[tuple, Any] = {}
    self._decode_jit = jax.jit(
        self._decode, in_shardings=(param_shardings, partitioning.data_sharding(mesh, 2),
                                    partitioning.data_sharding(mesh, 1)),
        out_shardings=self.replicated)
    self._score_jit = jax.jit(
        self._score, in_shardings=(param_shardings, partitioning.data_sharding(mesh, 2)),
        out_shardings=self.replicated)

  def _decode(self, params, prompt_tokens, lengths) -> decoding.DecodeResult:
    with nn.logical_axis_rules(self.rules):
      def constrain_cache(cache, batch, cache_length):
        boxed = decoder_lib.abstract_cache(self.model.module, batch, cache_length)
        return jax.lax.with_sharding_constraint(
            cache, partitioning.logical_shardings(boxed, self.mesh, self.rules))
      return self.model.predict_batch(
          params, prompt_tokens, lengths, max_decode_length=self.decoding.max_decode_length,
          method=self.decoding.method, beam_size=self.decoding.beam_size,
          length_penalty=self.decoding.length_penalty, constrain_cache=constrain_cache)

  def _score(self, params, batch):
    with nn.logical_axis_rules(self.rules):
      return self.model.score_batch(params, batch)

  @property
  def num_compiled(self) -> int:
    """How many programs were compiled (one per decoding shape, one for scoring)."""
    return len(self._compiled)

  def _compile(self, name: str, jitted, params, *inputs):
    key = (name, jax.tree.structure(inputs),
           tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(inputs)))
    if key not in self._compiled:
      start = time.perf_counter()
      with jax.set_mesh(self.mesh):
        self._compiled[key] = jitted.lower(params, *inputs).compile()
      self.compile_seconds += time.perf_counter() - start
    return self._compiled[key]

  def _shard_prompts(self, prompts: np.ndarray, lengths: np.ndarray) -> dict[str, jax.Array]:
    return partitioning.shard_host_batch(
        {"prompt_tokens": prompts, "prompt_lengths": lengths}, self.mesh)

  def _shard_features(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return partitioning.shard_host_batch(
        {k: np.asarray(batch[k], np.int32) for k in model_inputs.FEATURES if k in batch},
        self.mesh)

  def warm_up(self, params, batch: Mapping[str, np.ndarray], prompt_widths: Iterable[int],
              teacher_forced: bool = True) -> None:
    """Compiles decoding (per prompt width) and scoring for ``batch``'s shape."""
    rows = batch["decoder_target_tokens"].shape[0]
    for width in sorted(set(prompt_widths)):
      sharded = self._shard_prompts(np.zeros((rows, width), np.int32), np.ones(rows, np.int32))
      self._compile("decode", self._decode_jit, params, sharded["prompt_tokens"],
                    sharded["prompt_lengths"])
    if teacher_forced:
      self._compile("score", self._score_jit, params, self._shard_features(batch))

  def decode(self, params, prompts: np.ndarray, lengths: np.ndarray) -> decoding.DecodeResult:
    """This process's prompt rows -> this process's decoded rows (numpy)."""
    sharded = self._shard_prompts(prompts, lengths)
    inputs = (sharded["prompt_tokens"], sharded["prompt_lengths"])
    compiled = self._compile("decode", self._decode_jit, params, *inputs)
    with jax.set_mesh(self.mesh):
      result = jax.device_get(compiled(params, *inputs))
    rows = _local_rows(sharded["prompt_lengths"])
    return decoding.DecodeResult(*(np.asarray(x)[rows] for x in result))

  def score(self, params, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Global teacher-forced sums and this process's per-row transcript log p."""
    sharded = self._shard_features(batch)
    compiled = self._compile("score", self._score_jit, params, sharded)
    with jax.set_mesh(self.mesh):
      out = jax.device_get(compiled(params, sharded))
    rows = _local_rows(sharded["decoder_target_tokens"])
    return {"sums": out["sums"], "transcript_logprob": out["transcript_logprob"][rows],
            "transcript_tokens": out["transcript_tokens"][rows]}


def _local_rows(global_array: jax.Array) -> slice:
  """The rows of a batch-sharded global array that this process provided."""
  starts = [s.index[0].start or 0 for s in global_array.addressable_shards]
  stops = [s.index[0].stop or global_array.shape[0] for s in global_array.addressable_shards]
  return slice(min(starts), max(stops))


# ----------------------------------------------------------------------------
# Scoring a split.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class SplitScore:
  """Per-utterance records (this process's) and corpus metrics (all processes)."""

  predictions: list[dict[str, Any]]
  metrics: dict[str, Any]


def _agreed_buckets(batches: Sequence[Mapping[str, np.ndarray]], layout: VocabLayout,
                    limit: int, name: str) -> list[int]:
  longest = []
  for index, batch in enumerate(batches):
    lengths = eval_batches.prompt_lengths(batch, layout, f"{name} batch {index}")
    top = int(lengths.max()) if lengths.size else 1
    if top > limit:
      row = int(np.argmax(lengths))
      raise ValueError(
          f"{name} batch {index}: row {row} ({eval_batches.row_name(batch, row)}) has a "
          f"{top}-token prompt; the model holds at most {limit} positions "
          "(DecoderConfig.max_length)")
    longest.append(top)
  longest = cross_process.all_max(np.asarray(longest, np.int64))
  return [eval_batches.prompt_bucket(n, limit) for n in longest]


def score_batches(scorer: Scorer, params: Any, batches: Sequence[Mapping[str, np.ndarray]],
                  detokenize: eval_batches.Detokenizer, *, name: str = "eval",
                  lowercase: bool = True, teacher_forced: bool = True,
                  progress: bool = True) -> SplitScore:
  """Decodes and scores every real row of ``batches``.

  Args:
    scorer: the compiled functions.
    params: parameters placed in ``scorer.param_shardings``.
    batches: this process's rows (``sld_jax.eval_batches``); every process
      passes the same number of batches of the same size.
    detokenize: text ids -> string (the task's vocabulary).
    name: shown on the progress bar, in ids and in error messages.
    lowercase: lower-case hypotheses and references before alignment.
    teacher_forced: also compute the teacher-forced losses.
    progress: show a tqdm progress bar (primary process only).
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  if not batches:
    raise ValueError(f"{name}: no eval batches")
  layout = scorer.layout
  buckets = _agreed_buckets(batches, layout, scorer.model.config.max_length, name)
  compile_start = scorer.compile_seconds
  scorer.warm_up(params, batches[0], buckets, teacher_forced)   # not timed as decoding
  normalize = (lambda s: s.lower()) if lowercase else (lambda s: s)
  bar = tqdm.tqdm(total=sum(int(eval_batches.real_rows(b).sum()) for b in batches), desc=name,
                  unit="utt", disable=not progress or jax.process_index() != 0,
                  dynamic_ncols=True)
  predictions, sums = [], None
  words, chars = wer_lib.ErrorCounts(), wer_lib.ErrorCounts()
  decode_seconds, generated = 0.0, 0
  for index, (batch, width) in enumerate(zip(batches, buckets)):
    real = eval_batches.real_rows(batch)
    lengths = eval_batches.prompt_lengths(batch, layout, f"{name} batch {index}")
    prompts = eval_batches.make_prompts(batch, lengths, width, layout)
    start = time.perf_counter()
    result = scorer.decode(params, prompts, lengths)
    decode_seconds += time.perf_counter() - start
    scores = scorer.score(params, batch) if teacher_forced else None
    if scores is not None:
      batch_sums = jax.tree.map(lambda x: np.asarray(x, np.float64), scores["sums"])
      sums = batch_sums if sums is None else jax.tree.map(np.add, sums, batch_sums)
    targets = np.asarray(batch["decoder_target_tokens"])
    for row in np.flatnonzero(real):
      hyp_ids = decoding_text_ids(result.tokens[row], result.lengths[row], layout)
      if "text" in batch:
        reference = eval_batches.as_str(batch["text"][row])
      else:
        reference = detokenize(eval_batches.reference_ids(targets[row], lengths[row], layout))
      reference, hypothesis = normalize(reference), normalize(detokenize(hyp_ids))
      word = wer_lib.word_errors(reference, hypothesis)
      char = wer_lib.char_errors(reference, hypothesis)
      words, chars = words + word, chars + char
      generated += int(result.lengths[row])
      utterance_id = (eval_batches.as_str(batch["id"][row]) if "id" in batch
                      else f"{name}/{len(predictions)}")
      record = {
          "id": utterance_id, "reference": reference, "hypothesis": hypothesis,
          "word_errors": word.errors, "word_count": word.reference_length,
          "substitutions": word.substitutions, "deletions": word.deletions,
          "insertions": word.insertions, "char_errors": char.errors,
          "char_count": char.reference_length, "ended": bool(result.ended[row]),
          "hypothesis_tokens": len(hyp_ids), "decode_score": float(result.scores[row]),
      }
      if "truncated_units" in batch:
        record["truncated_units"] = int(batch["truncated_units"][row])
      if scores is not None:
        record["transcript_logprob"] = float(scores["transcript_logprob"][row])
        record["transcript_tokens"] = int(scores["transcript_tokens"][row])
      predictions.append(record)
    bar.update(int(real.sum()))
    bar.set_postfix(wer=f"{100 * words.rate:.2f}")
  bar.close()
  metrics = _corpus_metrics(scorer, predictions, words, chars, generated, sums)
  metrics.update(_speed(metrics, decode_seconds, scorer.compile_seconds - compile_start))
  truncations = cross_process.all_sum(eval_batches.truncation_counts(batches))
  metrics.update(zip(eval_batches.TRUNCATION_METRICS, (int(x) for x in truncations)))
  return SplitScore(predictions, metrics)


def _speed(metrics: Mapping[str, Any], decode_seconds: float, compile_seconds: float
           ) -> dict[str, float]:
  count, generated = metrics["num_utterances"], metrics["generated_tokens"]
  return {"decode_seconds": decode_seconds, "compile_seconds": compile_seconds,
          "utterances_per_second": count / decode_seconds if decode_seconds else 0.0,
          "tokens_per_second": generated / decode_seconds if decode_seconds else 0.0}


def decoding_text_ids(tokens: np.ndarray, length: int, layout: VocabLayout) -> list[int]:
  """The emitted text ids of one decoded row, without <text_end>."""
  ids = np.asarray(tokens)[:int(length)]
  return ids[ids != layout.eos_id].tolist()


def _corpus_metrics(scorer: Scorer, predictions, words, chars, generated, sums
                    ) -> dict[str, Any]:
  """Corpus metrics summed over processes (teacher-forced sums are global already)."""
  local = np.array([len(predictions), sum(p["ended"] for p in predictions), generated,
                    words.hits, words.substitutions, words.deletions, words.insertions,
                    chars.hits, chars.substitutions, chars.deletions, chars.insertions,
                    sum(p.get("transcript_logprob", 0.0) for p in predictions)], np.float64)
  total = cross_process.all_sum(local)
  count, ended, generated = (int(x) for x in total[:3])
  words = wer_lib.ErrorCounts(*(int(x) for x in total[3:7]))
  chars = wer_lib.ErrorCounts(*(int(x) for x in total[7:11]))
  metrics = {
      "wer": 100.0 * words.rate, "cer": 100.0 * chars.rate,
      "substitutions": words.substitutions, "deletions": words.deletions,
      "insertions": words.insertions, "word_errors": words.errors,
      "reference_words": words.reference_length, "char_errors": chars.errors,
      "reference_chars": chars.reference_length, "num_utterances": count,
      "num_ended": ended, "num_unended": count - ended, "generated_tokens": generated,
  }
  if sums is not None:
    means = {k: float(v) for k, v in scorer.model.from_sums(sums).items()}
    for name in ("loss", "ce_text", "ce_speech", "kl_speech", "accuracy_text",
                 "accuracy_speech"):
      metrics[name] = means[name]
    metrics["ppl_text"] = _safe_exp(means["ce_text"])
    metrics["ppl_speech"] = _safe_exp(means["ce_speech"])
    metrics["num_text_tokens"] = int(means["num_text_tokens"])
    metrics["num_speech_tokens"] = int(means["num_speech_tokens"])
    metrics["mean_transcript_logprob"] = float(total[11] / count) if count else 0.0
  return metrics


def _safe_exp(x: float) -> float:
  return math.exp(x) if x < 700 else math.inf


# ----------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------


def predictions_filename() -> str:
  if jax.process_count() == 1:
    return PREDICTIONS_FILE
  return f"predictions-{jax.process_index():05d}-of-{jax.process_count():05d}.jsonl"


def write_split(directory: str, score: SplitScore, extra: Optional[Mapping[str, Any]] = None
                ) -> None:
  """``directory/predictions.jsonl`` (this process's rows) and ``metrics.json``.

  With several processes each writes ``predictions-<i>-of-<n>.jsonl``;
  the primary process writes ``metrics.json`` last, so its presence means
  the split is complete.
  """
  atomic_files.write_text(
      os.path.join(directory, predictions_filename()),
      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in score.predictions))
  if jax.process_index() == 0:
    metrics = {**(extra or {}), **score.metrics}
    atomic_files.write_text(
        os.path.join(directory, METRICS_FILE),
        json.dumps(metrics, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value):
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


SUMMARY_COLUMNS = (("step", "step", "{}"), ("task", "task", "{}"), ("split", "split", "{}"),
                   ("utts", "num_utterances", "{}"), ("WER %", "wer", "{:.2f}"),
                   ("CER %", "cer", "{:.2f}"), ("S/D/I", None, None),
                   ("ce_text", "ce_text", "{:.3f}"), ("ppl_text", "ppl_text", "{:.2f}"),
                   ("ce_speech", "ce_speech", "{:.3f}"),
                   ("utt/s", "utterances_per_second", "{:.1f}"),
                   ("tok/s", "tokens_per_second", "{:.0f}"))


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A markdown table of metrics rows (``step``, ``task``, ``split`` + metrics)."""
  lines = ["| " + " | ".join(c[0] for c in SUMMARY_COLUMNS) + " |",
           "|" + "|".join("---" for _ in SUMMARY_COLUMNS) + "|"]
  for row in rows:
    cells = []
    for _, key, fmt in SUMMARY_COLUMNS:
      if key is None:
        cells.append(f"{row.get('substitutions', '-')}/{row.get('deletions', '-')}/"
                     f"{row.get('insertions', '-')}")
      else:
        cells.append(fmt.format(row[key]) if key in row else "-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
