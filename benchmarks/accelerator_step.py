r"""Training step time and model FLOPs utilisation (MFU) on one accelerator.

Times ``Trainer.train_step`` (the jitted, donated step that ``sld_jax.train``
runs) on packed rows of synthetic ``units <speech_end> text <text_end>``
sequences (``U[50, 150]`` units, ``U[5, 20]`` text tokens, the training
throughput benchmark's stream), for each ``--sizes`` x ``--methods``, and
reports

  step time        median over ``--steps`` timed steps (each blocked)
  tokens / s       rows x length / step time (every position is computed,
                   padding included)
  model TFLOP/s    model FLOPs / step time
  MFU              model TFLOP/s / peak, against two peaks: the bf16 matmul
                   rate measured in the same run (an 8192^3 ``jnp.dot``,
                   median of 10) and the datasheet's dense bf16 rate
                   (``--datasheet_tflops``, 989 for H100/H200 SXM)

Model FLOPs follow PaLM (appendix B): per token ``6 N + 12 L d S``, with
``N`` the matmul parameters (every layer's kernels plus the ``V x d`` output
projection; no embedding lookup, norms or biases), ``L`` layers, ``d`` the
model width and ``S`` the row length. Rematerialisation is not counted
(model FLOPs, not hardware FLOPs).

  python benchmarks/accelerator_step.py --sizes gpt2_small gpt2_medium \
      --dtype bfloat16 --rows 16 --length 1024 --out results.json \
      --variants reference cudnn cudnn_fused packed

``--variants`` names implementation choices (``VARIANTS``):

  reference          written-out attention with dropout, ``[B, L, V]``
                     float32 logits, threefry dropout masks (the defaults)
  reference_no_attention_dropout
                     reference without dropout on the attention
                     probabilities (what that dropout costs)
  cudnn              cuDNN flash attention with the dense packed mask (no
                     attention dropout); the rest as reference
  cudnn_fused        + the chunked loss (``loss_chunk_size=256``) with its
                     gradient made in the forward pass
                     (``loss_backward="in_forward"``), the output projection
                     in bfloat16, dropout masks from "rbg"
  packed             cudnn_fused with cuDNN's packed layout: attention inside
                     each segment only (``model/packed_attention.py``)
  packed_no_dropout  packed with residual dropout off as well
  packed_recompute   packed with the chunked loss's logits recomputed in the
                     backward pass (``loss_backward="recompute"``)
  packed_slots_by_4  packed declaring segment slots in multiples of 4
                     (``segment_slot_multiple=4``) instead of powers of two
  packed_triton      packed with the Pallas Triton flash attention
                     (``attention_implementation="triton"``) instead of cuDNN
  packed_triton_blocks_64, packed_triton_backward_32
                     packed_triton with forward blocks of 64 (not 128), or
                     backward blocks of 32 (not 64)

Each configuration runs in its own process (``--in_process`` runs them in
this one), so that the device's ``peak_bytes_in_use`` is that configuration's
own; XLA's compiled footprint (arguments + temporaries) is reported beside it.
``--memory_only`` compiles each step ahead of time
(``Trainer.lower_train_step``) and reports XLA's memory and cost analysis
without running it: the check to make on a CPU before spending accelerator
time ("xla" stands in for the cuDNN implementations off GPUs).
``--check_attention`` compares ``cudnn_packed`` and the Triton kernel (three
block choices) with the float32 reference attention on packed rows (outputs
and gradients at real positions) and times the attention implementations
alone (``--attention NAME ...``: only those); ``--breakdown`` times the step's parts alone
(``breakdown_ms``: forward, forward + backward, the chunked loss pass; the
optimizer and the backward pass by difference), a profile that needs no
profiler; ``--profile DIR`` traces 2 steps of
each configuration and summarises where the device time went
(``profile_summary.py``; lean tracer options). ``--xla_flags``
runs the configurations' processes with those XLA flags added to
``XLA_FLAGS`` (e.g. ``--xla_gpu_enable_triton_gemm=false``), recorded in each
result.

On a CPU (``--sizes tiny --rows 2 --length 256 --steps 2``) it checks the
script; its MFU there is meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "benchmarks")):
  if path not in sys.path:
    sys.path.insert(1, path)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import compile_only_gpu  # pylint: disable=g-import-not-at-top
import hlo_roofline  # pylint: disable=g-import-not-at-top
import train_throughput  # pylint: disable=g-import-not-at-top
from sld_jax import atomic_files  # pylint: disable=g-import-not-at-top
from sld_jax.model.config import DecoderConfig  # pylint: disable=g-import-not-at-top
from sld_jax.vocab import VocabLayout  # pylint: disable=g-import-not-at-top


def median_ms(function, *arguments, repeats: int) -> float:
  """Median wall time of ``function(*arguments)``, blocked, after one call that compiles."""
  jax.block_until_ready(function(*arguments))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(function(*arguments))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def measured_matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
  """Median bf16 ``[size, size] @ [size, size]`` rate on the default device."""
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (size, size), jnp.bfloat16)
  b = jax.random.normal(keys[1], (size, size), jnp.bfloat16)
  return 2 * size**3 / (median_ms(jax.jit(jnp.dot), a, b, repeats=repeats) / 1e3) / 1e12


def model_flops_per_token(params: Any, num_layers: int, embed_dim: int,
                          length: int) -> tuple[float, int]:
  """PaLM's ``6 N + 12 L d S`` and ``N`` (kernels + output projection)."""
  matmul_params = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = "/".join(str(getattr(key, "key", key)) for key in path)
    if leaf.ndim >= 2 and not names.endswith("bias") and "position" not in names:
      matmul_params += int(np.prod(leaf.shape))
  return 6 * matmul_params + 12 * num_layers * embed_dim * length, matmul_params


_FUSED = dict(decoder=dict(attention_implementation="cudnn", attention_dropout_rate=0.0,
                          logits_via_embedding_dtype="bfloat16"),
              loss_chunk_size=256, loss_backward="in_forward", dropout_rng_impl="rbg")
_PACKED = dict(_FUSED, decoder=dict(_FUSED["decoder"], attention_implementation="cudnn_packed"))
# name -> {"decoder": DecoderConfig overrides, SpeechTextLM options...}
VARIANTS: dict[str, dict[str, Any]] = {
    "reference": dict(decoder={}),
    "reference_no_attention_dropout": dict(decoder=dict(attention_dropout_rate=0.0)),
    "cudnn": dict(decoder=dict(attention_implementation="cudnn", attention_dropout_rate=0.0)),
    "cudnn_fused": _FUSED,
    "packed": _PACKED,
    "packed_no_dropout": dict(_PACKED, decoder=dict(_PACKED["decoder"], dropout_rate=0.0)),
    "packed_recompute": dict(_PACKED, loss_backward="recompute"),
    "packed_slots_by_4": dict(_PACKED, decoder=dict(_PACKED["decoder"], segment_slot_multiple=4)),
    "packed_triton": dict(_PACKED, decoder=dict(_PACKED["decoder"],
                                                attention_implementation="triton")),
    "packed_triton_blocks_64": dict(_PACKED, decoder=dict(
        _PACKED["decoder"], attention_implementation="triton", triton_block=64)),
    "packed_triton_backward_32": dict(_PACKED, decoder=dict(
        _PACKED["decoder"], attention_implementation="triton", triton_backward_block=32)),
    "xla_fused": dict(_FUSED, decoder=dict(_FUSED["decoder"], attention_implementation="xla")),
}
# Off GPUs these become "xla" ("triton" would run interpreted, for tests only).
_GPU_ONLY_ATTENTION = ("cudnn", "cudnn_packed", "triton")


def variant_options(name: str, platform: Optional[str] = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(DecoderConfig overrides, SpeechTextLM options)``; cuDNN becomes "xla" off GPUs.

  ``platform``: the platform compiled for (``jax.default_backend()`` by default).
  """
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
  options = dict(VARIANTS[name])
  overrides = dict(options.pop("decoder"))
  if (overrides.get("attention_implementation") in _GPU_ONLY_ATTENTION
      and (platform or jax.default_backend()) != "gpu"):
    overrides["attention_implementation"] = "xla"
  return overrides, options


def _batches(layout: VocabLayout, args) -> list[dict[str, np.ndarray]]:
  count = args.rows * (args.steps + 2) * (args.length // 60 + 2)
  lengths = train_throughput.sequence_lengths(count, seed=0)
  stream = iter(train_throughput.make_sequences(layout, lengths, seed=0))
  pending: list[np.ndarray] = []
  return [train_throughput.packed_batch(stream, args.rows, args.length, pending)[0]
          for _ in range(args.steps + 2)]


def _trainer(size: str, method: str, variant: str, layout: VocabLayout, args,
             device: Optional[jax.Device] = None):
  overrides, options = variant_options(variant, device.platform if device else None)
  return train_throughput.build_sld_jax_trainer(
      size, layout, args.length, method=method, dtype=args.dtype, remat=args.remat,
      remat_policy=args.remat_policy, scan_layers=args.scan_layers,
      devices=[device] if device else None, **options, **overrides)


def _with_host_features(trainer, batches: list[dict[str, np.ndarray]]
                        ) -> list[dict[str, np.ndarray]]:
  """The model's host features with one shape for every batch (one executable):
  ``cudnn_packed``'s segment starts for the most segments of any batch."""
  if "decoder_segment_ids" not in batches[0]:
    return batches
  from sld_jax.model import packed_attention  # pylint: disable=g-import-not-at-top
  slots = packed_attention.slots_for(
      max(packed_attention.host_segment_count(b["decoder_segment_ids"]) for b in batches),
      trainer.model.config.segment_slot_multiple)
  return [dict(trainer.model.host_features(b, slots=slots)) for b in batches]


def compiled_bytes(memory) -> int:
  """XLA's footprint of an executable: arguments + temporaries + outputs - donated."""
  return (memory.argument_size_in_bytes + memory.temp_size_in_bytes
          + memory.output_size_in_bytes - memory.alias_size_in_bytes)


def _step_flops(trainer, args) -> float:
  """Model FLOPs of one step (``model_flops_per_token`` x rows x length)."""
  config = trainer.model.config
  per_token, _ = model_flops_per_token(trainer.abstract_state.params, config.num_layers,
                                       config.embed_dim, args.length)
  return per_token * args.rows * args.length


def analyse_size(size: str, method: str, variant: str, args,
                 device: Optional[jax.Device] = None) -> dict[str, Any]:
  """XLA's memory and cost analysis of the compiled step; nothing is run.

  ``device``: what to compile for (``compile_only_gpu.compile_only_device``
  for ``--target``; this process's first device by default). With
  ``args.hlo_dir`` the optimized program is written there and read by
  ``hlo_roofline`` (the step's roofline time and where its bytes go).
  """
  layout = VocabLayout(args.text_size, args.speech_size)
  trainer = _trainer(size, method, variant, layout, args, device)
  batch = _with_host_features(trainer, _batches(layout, args))[0]
  start = time.perf_counter()
  capability = (compile_only_gpu.cudnn_capability_of(device) if device is not None
                and device.platform == "gpu" else contextlib.nullcontext())
  with capability:
    compiled = trainer.lower_train_step(batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  result = {
      "size": size, "method": method, "variant": variant, "dtype": args.dtype,
      "rows": args.rows, "length": args.length, "vocab": layout.size,
      "device": (device or jax.devices()[0]).device_kind,
      "compile_seconds": time.perf_counter() - start,
      "temp_bytes": memory.temp_size_in_bytes,
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "compiled_bytes": compiled_bytes(memory),
      "hlo_flops": (cost or {}).get("flops"),
  }
  if args.hlo_dir:
    result.update(write_roofline(compiled, _step_flops(trainer, args),
                                 f"{size}_{method}_{variant}", args))
  return result


def write_roofline(compiled, step_flops: float, name: str, args) -> dict[str, Any]:
  """Writes the optimized program (``args.hlo_dir/name.hlo``) and its roofline
  (``name_roofline.md``, ``hlo_roofline``); returns the roofline's figures, the
  MFU bound from the step's model FLOPs ``step_flops``."""
  os.makedirs(args.hlo_dir, exist_ok=True)
  path = os.path.join(args.hlo_dir, f"{name}.hlo")
  text = compiled.as_text()
  atomic_files.write_text(path, text)
  summary = hlo_roofline.summarize(hlo_roofline.kernels(text), args.datasheet_tflops,
                                   args.hbm_tb_s)
  atomic_files.write_text(path[:-len(".hlo")] + "_roofline.md", hlo_roofline.markdown(summary))
  return dict(
      hlo=path, roofline_ms=summary["roofline_ms"], kernels=summary["kernels"],
      roofline_gigabytes=summary["gigabytes"],
      roofline_ms_by_category={k: v["roofline_ms"] for k, v in summary["categories"].items()},
      mfu_bound=step_flops / (summary["roofline_ms"] * 1e-3) / (args.datasheet_tflops * 1e12))


def memory_table(results: Sequence[dict[str, Any]]) -> str:
  """``analyse_size`` results as a markdown table (roofline columns with ``--hlo_dir``)."""
  roofline = all("roofline_ms" in r for r in results)
  lines = ["| size | method | variant | device | compiled GiB | of which temporaries | "
           + ("roofline ms | MFU at the roofline | GB moved | kernels |" if roofline else ""),
           "|---|---|---|---|---|---|" + ("---|---|---|---|" if roofline else "")]
  for r in results:
    line = (f"| {r['size']} | {r['method']} | {r['variant']} | {r['device']} | "
            f"{r['compiled_bytes'] / 2**30:.1f} | {r['temp_bytes'] / 2**30:.1f} |")
    if roofline:
      line += (f" {r['roofline_ms']:.1f} | {100 * r['mfu_bound']:.1f}% | "
               f"{r['roofline_gigabytes']:.1f} | {r['kernels']} |")
    lines.append(line)
  return "\n".join(lines)


def time_size(size: str, method: str, args, variant: str = "reference") -> dict[str, Any]:
  """Compiles the step once (ahead of time), then times ``args.steps`` steps."""
  layout = VocabLayout(args.text_size, args.speech_size)
  trainer = _trainer(size, method, variant, layout, args)
  batches = _with_host_features(trainer, _batches(layout, args))
  start = time.perf_counter()
  step_fn = trainer.lower_train_step(batches[0]).compile()
  compile_seconds = time.perf_counter() - start
  memory = step_fn.memory_analysis()
  state = trainer.init_state()
  config = trainer.model.config
  flops_per_token, matmul_params = model_flops_per_token(
      state.params, config.num_layers, config.embed_dim, args.length)

  def run(state, batch):
    with trainer.context():
      state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    return state, metrics

  device_batches = [trainer.shard_batch(batch) for batch in batches]
  for batch in device_batches[:2]:
    state, metrics = run(state, batch)
  times = []
  for batch in device_batches[2:]:
    start = time.perf_counter()
    state, metrics = run(state, batch)
    times.append(time.perf_counter() - start)
  step = statistics.median(times)
  tokens = args.rows * args.length
  result = {
      "size": size, "method": method, "variant": variant, "dtype": args.dtype,
      "remat": args.remat and args.remat_policy, "rows": args.rows, "length": args.length, "vocab": layout.size,
      "options": VARIANTS[variant], "matmul_params": matmul_params,
      "compile_seconds": compile_seconds,
      "step_seconds": step, "step_seconds_all": times,
      "tokens_per_second": tokens / step,
      "model_tflops_per_second": flops_per_token * tokens / step / 1e12,
      "loss": float(metrics["loss"]),
      "peak_bytes_in_use": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
      "compiled_bytes": compiled_bytes(memory),
  }
  if args.hlo_dir:
    result.update(write_roofline(step_fn, flops_per_token * tokens,
                                 f"{size}_{method}_{variant}", args))
  if args.breakdown:
    result["breakdown_ms"] = breakdown_ms(trainer, state.params, device_batches[2], args.steps,
                                          step_ms=1e3 * step)
  if args.profile:
    trace_dir = os.path.join(args.profile, f"trace_{size}_{method}_{variant}")
    traced = device_batches[2:2 + PROFILED_STEPS]
    with jax.profiler.trace(trace_dir, profiler_options=lean_profile_options()):
      for batch in traced:
        state, metrics = run(state, batch)
    import profile_summary  # pylint: disable=g-import-not-at-top
    plane = "/device:GPU" if jax.default_backend() == "gpu" else "/host:CPU"
    summary = profile_summary.summarize(trace_dir, plane, top=30, steps=len(traced))
    atomic_files.write_json(os.path.join(args.profile, f"profile_{size}_{method}_{variant}.json"),
                            summary, indent=1, sort_keys=False)
    result["profile_categories_ms"] = summary["categories_ms_per_step"]
  return result


def breakdown_ms(trainer, params, batch, repeats: int, step_ms: float) -> dict[str, float]:
  """Where the step's time goes, by timing its parts alone (no profiler).

  ``gradients``: the objective's forward and backward pass (the step without
  the optimizer update and metrics); ``forward``: the objective's forward
  pass; with a chunked loss, ``loss_pass``: the output projection and loss
  from the final hidden states, value and gradients
  (``SpeechTextLM.chunked_loss``; the gradients of the parameters it does
  not read are zeros it writes). Derived: ``optimizer_and_metrics`` = step -
  gradients, ``backward`` = gradients - forward, ``decoder_without_loss`` =
  gradients - loss_pass (``step_ms``: the whole step, timed by the caller).
  Each part compiles once more.
  """
  model = trainer.model
  key = jax.random.key(0)
  totals = model.target_counts(batch)
  parts = {}
  with trainer.context():
    gradients = jax.jit(jax.grad(model.microbatch_objective, has_aux=True))
    parts["gradients"] = median_ms(gradients, params, batch, key, totals, repeats=repeats)
    forward = jax.jit(lambda params, batch, key: model.loss_fn(params, batch, key)[0])
    parts["forward"] = median_ms(forward, params, batch, key, repeats=repeats)
    if model.loss_chunk_size is not None:
      config = model.config
      hidden = jax.random.normal(key, batch["decoder_input_tokens"].shape + (config.embed_dim,),
                                 config.compute_dtype)
      loss_pass = jax.jit(jax.value_and_grad(
          lambda hidden, params: model.chunked_loss(params, hidden, batch, totals)[0],
          argnums=(0, 1)))
      parts["loss_pass"] = median_ms(loss_pass, hidden, params, repeats=repeats)
      parts["decoder_without_loss"] = parts["gradients"] - parts["loss_pass"]
  parts["backward"] = parts["gradients"] - parts["forward"]
  parts["step"] = step_ms
  parts["optimizer_and_metrics"] = step_ms - parts["gradients"]
  return parts


PROFILED_STEPS = 2


def lean_profile_options() -> "jax.profiler.ProfileOptions":
  """Device activity and the host's framework annotations only.

  jax's default options also trace every Python call and dump each module's
  HLO into the trace; on 2026-11-30 a default-options trace of 3 gpt2_medium
  steps did not finish within 400 s on an H200. The kernels' ``hlo_op``
  names come from the annotations of host tracer level 1.
  """
  options = jax.profiler.ProfileOptions()
  options.host_tracer_level = 1
  options.python_tracer_level = 0
  options.enable_hlo_proto = False
  return options


def _packed_segments(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
  """Packed rows of utterance-like lengths (U[55, 170]) and trailing padding."""
  segments = np.zeros((rows, length), np.int32)
  for row in range(rows):
    start, segment = 0, 1
    while True:
      size = int(rng.integers(55, 171))
      if start + size > length:
        break
      segments[row, start:start + size] = segment
      start, segment = start + size, segment + 1
  return segments


def check_attention(args) -> dict[str, Any]:
  """``cudnn_packed`` against float32 reference attention; and each one's time alone.

  gpt2_medium's attention shapes (``--rows`` x ``--length``, 16 heads of 64),
  bfloat16 inputs; errors at real (non-padding) query positions, relative to
  the reference's largest magnitude, for the output and the gradients of
  ``sum(out * w)`` with respect to q, k and v.
  """
  from sld_jax.model import masks  # pylint: disable=g-import-not-at-top
  from sld_jax.model import packed_attention  # pylint: disable=g-import-not-at-top
  from sld_jax.model import triton_attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shape = (args.rows, args.length, 16, 64)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
  segments = jnp.asarray(_packed_segments(rng, args.rows, args.length))
  real = np.asarray(segments) > 0
  scale = 1 / 8.0
  mask = masks.decoder_attention_mask(args.length, segments)

  def loss_of(attend):
    return lambda q, k, v: jnp.sum(jnp.where(real[:, :, None, None], attend(q, k, v), 0)
                                   .astype(jnp.float32) * w.astype(jnp.float32))

  implementations = {
      "reference_f32": lambda q, k, v: jax.nn.dot_product_attention(
          q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=mask,
          scale=scale, implementation="xla"),
      "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                                          implementation="xla"),
      "cudnn_dense_mask": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, mask=mask, scale=scale, implementation="cudnn"),
      "cudnn_causal_only": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, scale=scale, implementation="cudnn"),
      "cudnn_packed": lambda q, k, v: packed_attention.packed_attention(
          q, k, v, segments, scale, 32),
      "cudnn_packed_m16": lambda q, k, v: packed_attention.packed_attention(
          q, k, v, segments, scale, 16),
      "cudnn_packed_m64": lambda q, k, v: packed_attention.packed_attention(
          q, k, v, segments, scale, 64),
      "cudnn_packed_no_fallback": lambda q, k, v: packed_attention.cudnn_packed_attention(
          q, k, v, *packed_attention.segment_layout(segments, 32)[:2], scale),
  }
  # The Triton kernel at each block choice a step variant makes ("triton" for
  # packed_triton, "triton_blocks_64" for packed_triton_blocks_64, ...).
  for variant in VARIANTS:
    overrides, _ = variant_options(variant, "gpu")
    if overrides.get("attention_implementation") == "triton":
      blocks = dict(block=overrides.get("triton_block", DecoderConfig.triton_block),
                    backward_block=overrides.get("triton_backward_block",
                                                 DecoderConfig.triton_backward_block))
      implementations[variant.removeprefix("packed_")] = (
          lambda q, k, v, blocks=blocks: triton_attention.triton_attention(
              q, k, v, segments, scale, **blocks))
  # What training runs: the host's offsets, slots by power of two and by 4.
  count = packed_attention.host_segment_count(np.asarray(segments))
  for label, multiple in (("pow2", 0), ("by4", 4)):
    starts = jnp.asarray(packed_attention.host_segment_starts(
        np.asarray(segments), packed_attention.slots_for(count, multiple)))
    implementations[f"cudnn_packed_host_{label}"] = (
        lambda q, k, v, starts=starts: packed_attention.packed_attention(
            q, k, v, segments, scale, 0, segment_starts=starts))
  unknown = set(args.attention or ()) - set(implementations)
  if unknown:
    raise ValueError(f"--attention: no implementation {sorted(unknown)}; there are "
                     f"{sorted(implementations)}")
  if args.attention:      # and the float32 reference, which the errors are against
    implementations = {name: attend for name, attend in implementations.items()
                       if name == "reference_f32" or name in args.attention}
  result: dict[str, Any] = {"shape": shape, "segments_per_row": [
      int(len(set(row[row > 0]))) for row in np.asarray(segments)],
      "host_slots": {"pow2": packed_attention.slots_for(count),
                     "by4": packed_attention.slots_for(count, 4)},
      "triton_visited_block_fraction": triton_attention.visited_block_fraction(
          np.asarray(segments))}
  outputs = {}
  for name, attend in implementations.items():
    try:
      forward = jax.jit(attend)
      both = jax.jit(jax.value_and_grad(loss_of(attend), argnums=(0, 1, 2)))
      outputs[name] = (forward(q, k, v), both(q, k, v)[1])
      result[f"{name}_fwd_bwd_ms"] = median_ms(both, q, k, v, repeats=20)
    except Exception as error:  # pylint: disable=broad-except  (report, go on)
      result[f"{name}_error"] = f"{type(error).__name__}: {error}"[:1500]
  want_out, want_grads = outputs["reference_f32"]
  for name, (out, grads) in outputs.items():
    if name in ("reference_f32", "cudnn_causal_only"):
      continue
    errors = {"out": float(jnp.max(jnp.abs(jnp.where(real[:, :, None, None],
                                                      out.astype(jnp.float32) - want_out, 0))))
              / float(jnp.max(jnp.abs(want_out)))}
    for label, got, want in zip("qkv", grads, want_grads):
      errors[f"d{label}"] = (float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
                             / float(jnp.max(jnp.abs(want))))
    result[f"{name}_relative_error"] = errors
  return result


def _child_command(args, size: str, method: str, variant: str) -> list[str]:
  command = [sys.executable, os.path.abspath(__file__), "--in_process", "--sizes", size,
             "--methods", method, "--variants", variant]
  for name in ("dtype", "rows", "length", "steps", "text_size", "speech_size",
               "datasheet_tflops", "hbm_tb_s", "profile", "remat_policy", "hlo_dir"):
    value = getattr(args, name)
    if value is not None:
      command += [f"--{name}", str(value)]
  for flag in ("remat", "scan_layers", "breakdown"):
    if getattr(args, flag):
      command.append(f"--{flag}")
  return command


def child_environment(xla_flags: Optional[str]) -> dict[str, str]:
  """This process's environment with ``xla_flags`` appended to ``XLA_FLAGS``."""
  environment = dict(os.environ)
  if xla_flags:
    environment["XLA_FLAGS"] = " ".join(
        part for part in (environment.get("XLA_FLAGS", ""), xla_flags) if part)
  return environment


def _run_isolated(command: Sequence[str], timeout: float,
                  environment: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
  """Runs one configuration in a fresh process; its ``RESULT`` lines."""
  try:
    completed = subprocess.run(command, capture_output=True, text=True, check=False,
                               timeout=timeout, env=environment)
  except subprocess.TimeoutExpired as error:
    output = (error.stdout or b"") + (error.stderr or b"")
    output = output.decode(errors="replace") if isinstance(output, bytes) else output
    return [{"error": f"no result within {timeout:.0f} s: {output[-1500:]}"}]
  results = [json.loads(line[len("RESULT "):]) for line in completed.stdout.splitlines()
             if line.startswith("RESULT ")]
  if not results:
    tail = (completed.stdout + completed.stderr)[-2000:]
    results = [{"error": f"exit {completed.returncode}: {tail}"}]
  return results


def _write(path: Optional[str], payload: dict[str, Any]) -> None:
  if path:  # after every configuration, so that a time limit loses none
    atomic_files.write_json(path, payload, indent=1, sort_keys=False)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", nargs="+", default=["gpt2_small", "gpt2_medium"])
  parser.add_argument("--methods", nargs="+", default=["sld"])
  parser.add_argument("--variants", nargs="+", default=["packed"], choices=sorted(VARIANTS))
  parser.add_argument("--memory_only", action="store_true",
                      help="compile each step and print XLA's memory/cost analysis, run nothing")
  parser.add_argument("--target", default=None, choices=sorted(compile_only_gpu.TARGETS),
                      help="with --memory_only: compile for this GPU without one "
                           "(compile_only_gpu.py; needs jax's CUDA plugin)")
  parser.add_argument("--hlo_dir", default=None,
                      help="write each compiled step's optimized program there, with its "
                           "roofline (hlo_roofline.py), beside the measured time")
  parser.add_argument("--hbm_tb_s", type=float, default=4.8,
                      help="memory bandwidth for the roofline (H200: 4.8 TB/s)")
  parser.add_argument("--check_attention", action="store_true",
                      help="compare and time the attention implementations, then stop")
  parser.add_argument("--attention", nargs="+", default=None, metavar="NAME",
                      help="with --check_attention: only these implementations (and the "
                           "float32 reference); all by default")
  parser.add_argument("--in_process", action="store_true",
                      help="run every configuration in this process (peak memory then "
                           "accumulates over them)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time the step's parts alone: forward, forward+backward, "
                           "the chunked loss (breakdown_ms)")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="trace 2 steps of each configuration into DIR and summarise them")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--remat_policy", default="full",
                      help="DecoderConfig.remat_policy (with --remat)")
  parser.add_argument("--scan_layers", action="store_true")
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--text_size", type=int, default=50259)
  parser.add_argument("--speech_size", type=int, default=6000)
  parser.add_argument("--datasheet_tflops", type=float, default=989.0)
  parser.add_argument("--matmul_size", type=int, default=8192)
  parser.add_argument("--child_timeout", type=float, default=600.0,
                      help="seconds one configuration's process may take (default %(default)s)")
  parser.add_argument("--xla_flags", default=None,
                      help="XLA flags added to XLA_FLAGS for the configurations' processes")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  # A size, method or variant named twice (MEDIUM=SMALL=tiny in a dry run of
  # gpu_step_comparison.sh) is one configuration.
  args.sizes, args.methods, args.variants = (
      list(dict.fromkeys(names)) for names in (args.sizes, args.methods, args.variants))
  if args.xla_flags and (args.in_process or args.memory_only or args.check_attention):
    parser.error("--xla_flags applies to the configurations' own processes; set XLA_FLAGS "
                 "instead with --in_process, --memory_only or --check_attention")

  if args.check_attention:
    result = check_attention(args)
    print(json.dumps(result), flush=True)
    _write(args.out, result)
    return
  configurations = [(size, method, variant) for size in args.sizes
                    for method in args.methods for variant in args.variants]
  if args.target and not args.memory_only:
    parser.error("--target goes with --memory_only")
  if args.memory_only:
    device = compile_only_gpu.compile_only_device(args.target) if args.target else None
    results = []
    for size, method, variant in configurations:
      results.append(analyse_size(size, method, variant, args, device))
      print(json.dumps(results[-1]), flush=True)
      _write(args.out, {"results": results})
    print(memory_table(results))
    return
  if args.in_process:
    for size, method, variant in configurations:
      try:
        result = time_size(size, method, args, variant)
      except Exception as error:  # pylint: disable=broad-except  (keep the other configurations)
        result = {"size": size, "method": method, "variant": variant,
                  "error": f"{type(error).__name__}: {error}"[:2000]}
      print("RESULT " + json.dumps(result), flush=True)
    return

  # The parent touches no device: each configuration (and the matmul peak)
  # runs in a child process of its own.
  peak_run = subprocess.run(
      [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
       "import accelerator_step as a, jax; d = jax.devices()[0]; "
       "print('PEAK', a.measured_matmul_tflops(int(sys.argv[2])), d.device_kind, d.platform, "
       "jax.__version__)", os.path.dirname(os.path.abspath(__file__)), str(args.matmul_size)],
      capture_output=True, text=True, check=True)
  line = next(l for l in peak_run.stdout.splitlines() if l.startswith("PEAK"))
  _, peak, device_kind, platform_name, jax_version = line.split(" ", 4)
  peak = float(peak)
  print(f"device: {device_kind} ({platform_name}), jax {jax_version}, python "
        f"{platform.python_version()}; measured bf16 matmul {args.matmul_size}^3: "
        f"{peak:.0f} TFLOP/s", flush=True)
  results = []
  environment = child_environment(args.xla_flags)
  for size, method, variant in configurations:
    for result in _run_isolated(_child_command(args, size, method, variant),
                                args.child_timeout, environment):
      result["xla_flags"] = args.xla_flags
      result.setdefault("size", size)
      result.setdefault("method", method)
      result.setdefault("variant", variant)
      if "model_tflops_per_second" in result:
        result["mfu_measured_peak"] = result["model_tflops_per_second"] / peak
        result["mfu_datasheet"] = result["model_tflops_per_second"] / args.datasheet_tflops
      results.append(result)
      print(json.dumps({k: v for k, v in result.items() if k not in ("step_seconds_all",
                                                                     "options")}), flush=True)
      _write(args.out, {"device": device_kind, "jax": jax_version,
                        "measured_matmul_tflops": peak, "results": results})

  print(f"\n| size | method | variant | rows x length | step (ms) | tokens/s | model TFLOP/s | "
        f"MFU (measured {peak:.0f}) | MFU (datasheet {args.datasheet_tflops:.0f}) | "
        f"peak GiB | compiled GiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    if "error" in r:
      print(f"| {r['size']} | {r['method']} | {r['variant']} | error: "
            f"{r['error'][:120]} |||||||")
      continue
    print(f"| {r['size']} | {r['method']} | {r['variant']}{' remat ' + r['remat'] if r['remat'] else ''}"
          f"{' XLA_FLAGS ' + r['xla_flags'] if r.get('xla_flags') else ''} | "
          f"{r['rows']}x{r['length']} | {1e3 * r['step_seconds']:.1f} | "
          f"{r['tokens_per_second']:,.0f} | {r['model_tflops_per_second']:.1f} | "
          f"{100 * r['mfu_measured_peak']:.1f}% | {100 * r['mfu_datasheet']:.1f}% | "
          f"{(r['peak_bytes_in_use'] or 0) / 2**30:.1f} | {r['compiled_bytes'] / 2**30:.1f} |")


if __name__ == "__main__":
  main()
