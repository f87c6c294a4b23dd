"""Plants small, plausible bugs in the core modules and reports which the tests catch.

Each mutation replaces one exact code snippet (it must occur exactly once in
its file) and runs only the test files that should catch it, in a throw-away
copy of the checkout (``git ls-files``, so the working tree is never touched).
A mutation is *caught* when some of those tests fail, *survived* when they all
pass. A snippet that is no longer in the file (the code changed) is reported as
``snippet not found`` instead of stopping the run: update or drop that entry.

Not part of CI (it runs the same tests dozens of times). Usage::

  python3 scripts/mutation_test.py                       # every mutation
  python3 scripts/mutation_test.py --only losses,wer     # names containing these
  python3 scripts/mutation_test.py --list
  python3 scripts/mutation_test.py --report docs/mutation_report.md

Exit status: 0 when every found mutation is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str        # "<area>/<what>", e.g. "losses/no_t_squared"
  path: str        # file, relative to the repository root
  old: str         # exact snippet, present once
  new: str         # its replacement
  tests: tuple[str, ...]  # pytest arguments: files, node ids, "-k expr"
  bug: str         # what the planted bug means


M = Mutation
LOSSES = ("tests/test_losses.py",)
FUSED = ("tests/test_fused_paths.py",)
TRITON = ("tests/test_triton_attention.py", *FUSED)
DECODER = ("tests/test_decoder.py",)
DECODING = ("tests/test_decoding.py",)
WER = ("tests/test_wer.py",)
RESUME = ("tests/test_resume.py",)
INPUT = ("tests/test_input_pipeline.py", *RESUME)
CHECKPOINTS = ("tests/test_checkpointing.py", *RESUME)

MUTATIONS: tuple[Mutation, ...] = (
    # --- losses ------------------------------------------------------------
    M("losses/no_t_squared", "sld_jax/losses.py",
      "kl_speech = t * t * _masked_mean(", "kl_speech = _masked_mean(", LOSSES,
      "KL not multiplied by T^2"),
    M("losses/kl_over_speech_end", "sld_jax/losses.py",
      "    return layout.is_unit(targets)\n  return layout.is_text",
      "    return layout.is_speech(targets)\n  return layout.is_text", LOSSES,
      "paper KL also over <speech_end> targets"),
    M("losses/multimodal_without_speech", "sld_jax/losses.py",
      'speech_scale = 0.0 if method == "loss_masking"',
      'speech_scale = 0.0 if method != "sld"', LOSSES,
      "multimodal CE drops the speech term"),
    M("losses/reported_multimodal_without_speech", "sld_jax/losses.py",
      "    return ce_text + ce_speech\n  return", "    return ce_text\n  return",
      ("tests/test_lm.py",), "the reported multimodal CE loss (from summed metrics) drops "
      "the speech term"),
    M("losses/weights_ignored", "sld_jax/losses.py",
      "jnp.where(mask, weights * values, 0.0)", "jnp.where(mask, values, 0.0)", LOSSES,
      "loss weights ignored in the means"),
    M("losses/padded_vocab_in_softmax", "sld_jax/losses.py",
      "logits[..., offset:layout.real_size]", "logits[..., offset:]", (*LOSSES, *FUSED),
      "rounding rows of the vocabulary enter the softmax (counted as speech units)"),
    M("losses/sequences_ignore_segments", "sld_jax/losses.py",
      "return jnp.sum((segments != 0) & (segments != previous))",
      "return jnp.sum(jnp.any(segments != 0, axis=-1))", LOSSES,
      "packed rows count as one sequence (reference KL denominator)"),
    M("losses/paper_target_eps", "sld_jax/losses.py",
      "other = epsilon / num_units\n", "other = epsilon / (num_units - 1)\n", LOSSES,
      "label smoothing spread over K-1 classes"),
    M("losses/reference_kl_per_token", "sld_jax/losses.py",
      'return "num_sequences" if kl_normalization == "sequence"',
      'return "num_kl_positions" if kl_normalization == "sequence"', LOSSES,
      "released-normalisation KL averaged per unit token instead of per sequence"),
    M("losses/kl_other_targets_wrong_class", "sld_jax/losses.py",
      "target_logit, logits[..., offset])",
      "target_logit, logits[..., offset + 1])",
      LOSSES, "reference KL of non-unit targets reads unit class 1, not 0"),
    M("vocab/text_includes_pad", "sld_jax/vocab.py",
      "return (ids > PAD_ID) & (ids < self.text_size)",
      "return (ids >= PAD_ID) & (ids < self.text_size)",
      ("tests/test_vocab.py", *LOSSES), "PAD counted as a text target"),
    # --- masks -------------------------------------------------------------
    M("masks/segments_ignored", "sld_jax/model/masks.py",
      "return mask & segment_mask(segment_ids)", "return mask", DECODER,
      "packed examples attend across segments"),
    M("masks/causal_sees_next", "sld_jax/model/masks.py",
      "(index[:, None] >= index[None, :])", "(index[:, None] + 1 >= index[None, :])",
      DECODER, "each query also sees the next token"),
    M("masks/decode_step_excludes_self", "sld_jax/model/masks.py",
      "(slots[None, :] <= cache_index[:, None])", "(slots[None, :] < cache_index[:, None])",
      (*DECODER, *DECODING), "a decoded token does not attend to itself"),
    M("masks/segment_padding_real", "sld_jax/model/masks.py",
      "real = (segment_ids[:, :, None] > 0) & (segment_ids[:, None, :] > 0)",
      "real = segment_ids[:, :, None] >= 0", DECODER,
      "padding (segment 0) attends to padding"),
    M("masks/prompt_one_longer", "sld_jax/model/masks.py",
      "return jnp.arange(length)[None, :] < lengths[:, None]",
      "return jnp.arange(length)[None, :] <= lengths[:, None]",
      (*DECODER, *DECODING), "prompt mask one position too long"),
    # --- decoding ----------------------------------------------------------
    M("decoding/greedy_ignores_text_end", "sld_jax/decoding.py",
      "done=done | ended | (lengths >= budgets)", "done=done | (lengths >= budgets)",
      DECODING, "greedy does not stop at <text_end>"),
    M("decoding/pad_emittable", "sld_jax/decoding.py",
      "allowed = (ids > layout.pad_id) & (ids < layout.text_size)",
      "allowed = (ids >= layout.pad_id) & (ids < layout.text_size)", DECODING,
      "PAD may be emitted"),
    M("decoding/units_emittable", "sld_jax/decoding.py",
      "allowed = (ids > layout.pad_id) & (ids < layout.text_size)",
      "allowed = (ids > layout.pad_id) & (ids <= layout.text_size)", DECODING,
      "<speech_end> may be emitted as text"),
    M("decoding/first_logits_off_by_one", "sld_jax/model/decoder.py",
      "index = jnp.maximum(jnp.asarray(lengths, jnp.int32) - 1, 0)",
      "index = jnp.maximum(jnp.asarray(lengths, jnp.int32) - 2, 0)",
      (*DECODING, *DECODER), "first token read one prompt position early"),
    M("decoding/length_penalty", "sld_jax/decoding.py",
      "((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha",
      "((6.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha", DECODING,
      "GNMT length penalty with 6 instead of 5"),
    M("decoding/done_rows_keep_emitting", "sld_jax/decoding.py",
      "token = jnp.where(done, layout.pad_id, token)", "token = token", DECODING,
      "finished rows keep writing tokens"),
    # --- wer ---------------------------------------------------------------
    M("wer/tabs_not_collapsed", "sld_jax/wer.py",
      '_MULTIPLE_WHITESPACE.sub(" ", text).strip()', "text.strip()", WER,
      "tab+space separators split into odd tokens"),
    M("wer/empty_reference_rate", "sld_jax/wer.py",
      "return float(self.insertions)", "return 0.0", WER,
      "an all-empty reference corpus gives WER 0"),
    M("wer/deletions_insertions_swapped", "sld_jax/wer.py",
      "output.hits, output.substitutions, output.deletions,\n                     "
      "output.insertions",
      "output.hits, output.substitutions, output.insertions,\n                     "
      "output.deletions", WER, "D and I swapped"),
    M("wer/chars_not_stripped", "sld_jax/wer.py",
      "return list(text.strip())", "return list(text)", WER,
      "CER counts leading/trailing spaces"),
    # --- input pipeline resume ------------------------------------------------
    M("input/seqio_resume_off_by_one", "sld_jax/input_pipeline.py",
      "num_epochs=None).skip(start_step)", "num_epochs=None).skip(start_step + 1)",
      ("tests/test_train_smoke.py",), "seqio batches resume one step late"),
    M("input/synthetic_resume_off_by_one", "sld_jax/input_pipeline.py",
      "    step = start_step\n    while True:", "    step = start_step + 1\n    while True:",
      INPUT, "synthetic batches resume one step late"),
    M("input/position_examples", "sld_jax/input_pipeline.py",
      '"examples": int(step) * self.global_batch_size',
      '"examples": (int(step) + 1) * self.global_batch_size', INPUT,
      "checkpoint data position counts one batch too many"),
    M("trainer/resume_step_off_by_one", "sld_jax/trainer.py",
      "start_step = int(jax.device_get(state.step))",
      "start_step = int(jax.device_get(state.step)) + 1", RESUME,
      "training resumes one step after the checkpoint"),
    # --- checkpointing --------------------------------------------------------
    M("checkpointing/force_ignored", "sld_jax/checkpointing.py",
      "if not (force or self.is_save_step(step))", "if not self.is_save_step(step)",
      CHECKPOINTS, "final/preemption checkpoints off the interval are not written"),
    M("checkpointing/restore_oldest", "sld_jax/checkpointing.py",
      "      step = self.latest_step()\n", "      step = min(self.all_steps(), default=None)\n",
      CHECKPOINTS, "restore reads the oldest checkpoint"),
    M("checkpointing/saves_step_0", "sld_jax/checkpointing.py",
      "return step > 0 and step % self.save_interval_steps == 0",
      "return step % self.save_interval_steps == 0", CHECKPOINTS,
      "a checkpoint of the untrained step 0"),
    # --- the issue-18 mutations ---------------------------------------------
    M("model/bf16_ignored", "sld_jax/model/config.py",
      "    return _DTYPES[self.dtype]\n", '    return _DTYPES["float32"]\n',
      ("tests/test_decoder.py", "-k", "bfloat16"), "compute_dtype always float32"),
    M("features/whisper_chunks_restart", "sld_jax/speech/features.py",
      "self._encode(log_mel[:, i:i + self.MAX_FRAMES])",
      "self._encode(log_mel[:, 0:min(log_mel.shape[1] - i, self.MAX_FRAMES)])",
      ("tests/test_speech_features.py",), "every 30 s chunk re-encodes the start"),
    M("tasks/shuffle_off", "tasks/batches.py",
      "use_cached=False, shuffle=shuffle,", "use_cached=False, shuffle=False,",
      ("tests/test_tasks.py",), "get_dataset never shuffles"),
    M("losses/argmax_ties_to_units", "sld_jax/losses.py",
      "argmax = jnp.where(max_units > max_text,",
      "argmax = jnp.where(max_units >= max_text,", LOSSES,
      "a tie between the text and unit maxima counts the unit as the argmax"),
    M("losses/online_softmax_ties_to_last", "sld_jax/losses.py",
      "jnp.minimum(arg_l, arg_r)", "jnp.maximum(arg_l, arg_r)", LOSSES,
      "the one-pass argmax keeps the last of equal maxima"),
    M("losses/online_softmax_without_rescaling", "sld_jax/losses.py",
      "sum_l * shrink + sum_r)", "sum_l + sum_r)", (*LOSSES, *FUSED),
      "the one-pass logsumexp adds a partial sum at a smaller maximum unscaled"),
    M("fused/kl_gradient_misses_unit_0", "sld_jax/fused_loss.py",
      "is_unit_column = (column >= offset)", "is_unit_column = (column > offset)", FUSED,
      "the in-forward KL gradient skips the first unit's column"),
    M("fused/rounding_columns_in_softmax", "sld_jax/fused_loss.py",
      "is_real_column = column < layout.real_size", "is_real_column = column >= 0", FUSED,
      "the in-forward gradient puts softmax mass on the rounding ids of a whole-table projection"),
    M("decoder/layer_norm_backward_drops_mean", "sld_jax/model/layers.py",
      "dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)",
      "dx = rstd * (g", DECODER,
      "LayerNorm's own backward pass forgets the mean's part of dx"),
    M("decoder/layer_norm_variance_about_zero", "sld_jax/model/layers.py",
      "keepdims=True) - jnp.square(mean), 0.0)", "keepdims=True), 0.0)", DECODER,
      "LayerNorm's one-pass variance forgets to subtract the squared mean"),
    M("decoder/mlp_keeps_its_activation", "sld_jax/model/layers.py",
      "  return jax.checkpoint(function, policy=jax.checkpoint_policies.nothing_saveable)",
      "  return function", DECODER,
      "the MLP keeps tanh(...) and product + bias for the backward pass again"),
    M("attention/triton_without_segments", "sld_jax/model/triton_attention.py",
      "visible = ((query_segments[:, None] == key_segments[None, :])",
      "visible = ((query_segments[:, None] >= 0)", TRITON,
      "the Triton kernel attends across packed segments"),
    M("attention/triton_skips_a_visible_key_block", "sld_jax/model/triton_attention.py",
      "return (lax.div(first_of_block, block_k),",
      "return (lax.div(first_of_block + block_k - 1, block_k),", TRITON,
      "the Triton kernel starts at the block after a segment's start when the "
      "segment does not start on a block edge"),
    M("attention/triton_key_gradients_stop_early", "sld_jax/model/triton_attention.py",
      "lax.div(last_of_block + block_q, block_q)",
      "lax.div(last_of_block + 1, block_q)", TRITON,
      "key gradients leave out the query block holding their segment's end"),
    M("fused/off_unit_targets_class_1", "sld_jax/fused_loss.py",
      "class_column = jnp.where(is_unit_target, targets, offset)",
      "class_column = jnp.where(is_unit_target, targets, offset + 1)", FUSED,
      "the KL gradient of non-unit targets puts p_true on unit 1, not unit 0"),
    M("fused/kl_gradient_without_temperature", "sld_jax/fused_loss.py",
      "kl[..., None] / t * (total * p_units - target)",
      "kl[..., None] * (total * p_units - target)", FUSED,
      "the in-forward KL gradient is not divided by T"),
    M("fused/one_hot_shifted", "sld_jax/fused_loss.py",
      "- ((column == targets[..., None])", "- ((column == targets[..., None] + 1)", FUSED,
      "the in-forward CE gradient subtracts the next id's one-hot"),
    M("packed/slot_multiple_ignored", "sld_jax/lm.py",
      "self.config.segment_slot_multiple)", "0)", ("tests/test_packed_attention.py",),
      "the host declares power-of-two slots whatever segment_slot_multiple says"),
    # --- the objective comparison --------------------------------------------
    M("comparison/segment_from_zero", "sld_jax/comparison/runner.py",
      "      start = latest or 0\n", "      start = 0\n",
      ("tests/test_compare_objectives.py", "-k", "segments"),
      "a resumed run's next segment is measured from step 0, not its latest checkpoint"),
)


def _copy_checkout(destination: str) -> None:
  files = subprocess.run(
      ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
      cwd=REPO_ROOT, check=True, capture_output=True).stdout.decode().split("\0")
  for name in filter(None, files):
    source = os.path.join(REPO_ROOT, name)
    if not os.path.isfile(source):
      continue
    target = os.path.join(destination, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(source, target)


def run_mutation(mutation: Mutation, checkout: str, timeout: float) -> tuple[str, float, str]:
  """Plants one mutation in ``checkout``, runs its tests, restores the file.

  Returns:
    (outcome, seconds, detail): outcome is "caught", "survived", "snippet not
    found", "snippet not unique", "timeout" or "error (pytest exit N)".
  """
  path = os.path.join(checkout, mutation.path)
  if not os.path.exists(path):
    return "snippet not found", 0.0, f"{mutation.path} does not exist"
  with open(path) as f:
    original = f.read()
  count = original.count(mutation.old)
  if count != 1:
    return ("snippet not found" if count == 0 else "snippet not unique"), 0.0, (
        f"{count} occurrences in {mutation.path}")
  with open(path, "w") as f:
    f.write(original.replace(mutation.old, mutation.new))
  start = time.time()
  try:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
         *mutation.tests],
        cwd=checkout, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", time.time() - start, f"over {timeout:.0f} s"
  finally:
    with open(path, "w") as f:
      f.write(original)
  seconds = time.time() - start
  lines = [l for l in result.stdout.splitlines() if l.strip()]
  summary = lines[-1] if lines else ""
  failed = [l.split(" ")[1] for l in lines if l.startswith("FAILED ")]
  if result.returncode == 0:
    return "survived", seconds, summary
  if result.returncode == 1:
    return "caught", seconds, (failed[0] if failed else summary)
  return f"error (pytest exit {result.returncode})", seconds, summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="",
                      help="comma-separated substrings of mutation names to run")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument("--timeout", type=float, default=900,
                      help="seconds per mutation's test run")
  parser.add_argument("--report", help="also write the markdown table to this file")
  args = parser.parse_args(argv)

  wanted = [s for s in args.only.split(",") if s]
  mutations = [m for m in MUTATIONS if not wanted or any(w in m.name for w in wanted)]
  if args.list:
    for m in mutations:
      print(f"{m.name:40s} {m.path:30s} {' '.join(m.tests)}  # {m.bug}")
    return 0

  rows = []
  with tempfile.TemporaryDirectory(prefix="sld_mutants_") as checkout:
    _copy_checkout(checkout)
    for m in mutations:
      outcome, seconds, detail = run_mutation(m, checkout, args.timeout)
      rows.append((m, outcome, seconds, detail))
      print(f"{outcome:22s} {seconds:6.0f}s  {m.name}  ({detail})", flush=True)

  caught = sum(o == "caught" for _, o, _, _ in rows)
  found = sum(not o.startswith("snippet") for _, o, _, _ in rows)
  table = ["| mutation | bug | tests run | outcome | s | first failing test / note |",
           "|---|---|---|---|---|---|"]
  for m, outcome, seconds, detail in rows:
    table.append(f"| `{m.name}` | {m.bug} | {' '.join(m.tests)} | {outcome} | "
                 f"{seconds:.0f} | {detail.replace('|', '/')} |")
  table.append(f"\n{caught} of {found} planted mutations caught "
               f"({len(rows) - found} snippets not found).")
  text = "\n".join(table)
  print("\n" + text)
  if args.report:
    with open(args.report, "w") as f:
      f.write(text + "\n")
  return 0 if caught == found else 1


if __name__ == "__main__":
  sys.exit(main())
