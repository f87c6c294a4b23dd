"""The fused paths for large vocabularies and long rows equal the reference paths.

- ``losses.compute_loss_chunked`` (hidden states projected a chunk of
  positions at a time, never ``[B, L, V]`` logits) == ``compute_loss`` on the
  full logits: values and gradients, every objective, packed rows, T != 1,
  a length that is not a multiple of the chunk.
- ``fused_loss.compute_loss_fused`` (the same chunks, the gradient made in
  the forward pass by a ``custom_vjp``) == ``compute_loss``: values and
  gradients, with the batch's own counts or a larger batch's
  (``denominators``), float32 and bfloat16 logits; one projection fewer in
  the compiled gradient (XLA's cost analysis).
- ``SpeechTextLM(loss_chunk_size=C, loss_backward=...)`` == ``SpeechTextLM()``:
  loss, metrics and parameter gradients, tied and untied output layers.
- The chunked loss's compiled gradient holds less temporary memory than the
  reference's (XLA's own memory analysis of the CPU executable).
- ``DecoderConfig.attention_implementation="xla"`` (``jax.nn.dot_product_attention``,
  the portable twin of the cuDNN path), ``"splash"`` (the Pallas TPU kernel)
  and ``"triton"`` (the Pallas Triton kernel), both interpreted on CPU, ==
  the written-out ``"einsum"`` attention on packed rows, forward and
  backward, float32 and bfloat16; the Pallas ones also under a (2, 2, 2)
  mesh, where they run in ``shard_map``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax import fused_loss
from sld_jax import losses
from sld_jax import partitioning
from sld_jax.lm import SpeechTextLM
from sld_jax.model import decoder
from sld_jax.model import splash
from sld_jax.model import triton_attention
from sld_jax.model.config import DecoderConfig
from sld_jax.vocab import VocabLayout

jax.config.update("jax_default_matmul_precision", "highest")

LAYOUT = VocabLayout(text_size=40, speech_size=70)          # size 128, real 111
OBJECTIVES = [dict(method="loss_masking"), dict(method="multimodal_ce"),
              dict(method="sld", kl_target="paper", alpha=0.5, temperature=2.0),
              dict(method="sld", kl_target="reference", alpha=0.3, epsilon=0.2),
              dict(method="sld", kl_target="paper", alpha=0.5, kl_normalization="token")]


def _packed_batch(rng, batch, length):
  """Rows of two sequences ``units <speech_end> text <text_end>`` and padding."""
  targets = np.zeros((batch, length), np.int32)
  segments = np.zeros((batch, length), np.int32)
  for row in range(batch):
    start = 0
    for segment in (1, 2):
      units = rng.integers(LAYOUT.speech_offset, LAYOUT.real_size, rng.integers(3, 8))
      text = rng.integers(3, LAYOUT.text_size, rng.integers(1, 4))
      sequence = np.concatenate([units, [LAYOUT.speech_end_id], text, [LAYOUT.eos_id]])
      sequence = sequence[:length - start]
      targets[row, start:start + len(sequence)] = sequence
      segments[row, start:start + len(sequence)] = segment
      start += len(sequence)
  return targets, (segments > 0).astype(np.float32), segments


def _chunked_loss(backward, hidden, table, targets, weights, segments, rows="size", **knobs):
  """compute_loss_chunked ("recompute") or compute_loss_fused ("in_forward"),
  projecting onto the whole table (``rows="size"``: the rounding ids' logits
  are computed and must be left out) or onto the real vocabulary only."""
  projected = table[:getattr(LAYOUT, rows)]
  if backward == "in_forward":
    return fused_loss.compute_loss_fused(hidden, projected, targets, weights, segments,
                                         layout=LAYOUT, chunk_size=8, **knobs)
  project = lambda h: jnp.einsum("...e,ve->...v", h, projected)
  return losses.compute_loss_chunked(hidden, project, targets, weights, segments,
                                     layout=LAYOUT, chunk_size=8, **knobs)


@pytest.mark.parametrize("rows", ["size", "real_size"])
@pytest.mark.parametrize("backward", ["recompute", "in_forward"])
@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: "-".join(map(str, o.values())))
def test_chunked_loss_equals_full_logits_loss(objective, backward, rows):
  rng = np.random.default_rng(0)
  batch, length, embed = 3, 29, 16
  targets, weights, segments = _packed_batch(rng, batch, length)
  hidden = jnp.asarray(rng.standard_normal((batch, length, embed)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((LAYOUT.size, embed)), jnp.float32)

  def full(hidden, table):
    logits = jnp.einsum("ble,ve->blv", hidden, table)
    return losses.compute_loss(logits, targets, weights, segments, layout=LAYOUT, **objective)

  def chunked(hidden, table):
    return _chunked_loss(backward, hidden, table, targets, weights, segments, rows,
                         **objective)

  (loss_full, aux_full), grads_full = jax.value_and_grad(full, (0, 1), has_aux=True)(hidden, table)
  (loss_chunk, aux_chunk), grads_chunk = jax.jit(
      jax.value_and_grad(chunked, (0, 1), has_aux=True))(hidden, table)
  assert float(loss_full) > 0
  np.testing.assert_allclose(loss_chunk, loss_full, rtol=1e-5)
  for name in aux_full:
    np.testing.assert_allclose(aux_chunk[name], aux_full[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  for got, want in zip(grads_chunk, grads_full):
    assert float(jnp.abs(want).max()) > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert not np.any(grads_chunk[1][LAYOUT.real_size:]), "rounding rows got a gradient"


@pytest.mark.parametrize("backward", ["full", "recompute", "in_forward"])
def test_loss_with_a_larger_batch_denominators(backward):
  """A microbatch's share: the summed terms over the whole batch's counts.

  Checked against the metrics' sums (mean x own count) divided by the given
  counts, and the gradient against the full-logits loss with the same
  denominators, under a cotangent other than 1.
  """
  rng = np.random.default_rng(4)
  targets, weights, segments = _packed_batch(rng, 2, 24)
  hidden = jnp.asarray(rng.standard_normal((2, 24, 16)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((LAYOUT.size, 16)), jnp.float32)
  knobs = dict(method="sld", alpha=0.5, temperature=1.5)
  denominators = {"num_text_tokens": jnp.int32(40), "num_speech_tokens": jnp.int32(70),
                  "num_sequences": jnp.int32(9), "num_kl_positions": jnp.int32(60)}

  def loss(backward, hidden, table):
    if backward == "full":
      logits = jnp.einsum("ble,ve->blv", hidden, table)
      return losses.compute_loss(logits, targets, weights, segments, layout=LAYOUT,
                                 denominators=denominators, **knobs)
    return _chunked_loss(backward, hidden, table, targets, weights, segments,
                         denominators=denominators, **knobs)

  value, aux = jax.jit(functools.partial(loss, backward))(hidden, table)
  expected = (aux["ce_text"] * aux["num_text_tokens"] / 40
              + aux["ce_speech"] * aux["num_speech_tokens"] / 70
              + 0.5 * aux["kl_speech"] * aux["num_sequences"] / 9)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert int(aux["num_text_tokens"]) < 40            # the means stay this batch's

  scaled = lambda backward: jax.jit(jax.grad(lambda h, t: 2.5 * loss(backward, h, t)[0],
                                             (0, 1)))(hidden, table)
  for got, want in zip(scaled(backward), scaled("full")):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_fused_loss_with_bfloat16_logits_matches_the_rematerialised_chunks():
  """bf16 products, float32 accumulation, on both paths: the same gradients."""
  rng = np.random.default_rng(5)
  targets, weights, segments = _packed_batch(rng, 2, 32)
  hidden = jnp.asarray(rng.standard_normal((2, 32, 16)), jnp.bfloat16)
  table = jnp.asarray(0.3 * rng.standard_normal((LAYOUT.real_size, 16)), jnp.float32)
  knobs = dict(layout=LAYOUT, chunk_size=8, method="sld", alpha=0.5)

  def recompute(hidden, table):
    project = lambda h: jnp.einsum("...e,ve->...v", h.astype(jnp.bfloat16),
                                   table.astype(jnp.bfloat16),
                                   preferred_element_type=jnp.float32)
    return losses.compute_loss_chunked(hidden, project, targets, weights, segments, **knobs)[0]

  def in_forward(hidden, table):
    return fused_loss.compute_loss_fused(hidden, table, targets, weights, segments,
                                         logits_dtype=jnp.bfloat16, **knobs)[0]

  value_and_grads = lambda fn: jax.jit(jax.value_and_grad(fn, (0, 1)))(hidden, table)
  (want_loss, want_grads), (got_loss, got_grads) = map(value_and_grads, (recompute, in_forward))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for got, want in zip(got_grads, want_grads):
    assert got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def _vocabulary_products(jaxpr, vocabulary: int) -> int:
  """dot_generals with a ``vocabulary``-sized operand, in ``jaxpr`` and the
  jaxprs inside it (scan bodies, remat, custom_vjp), each counted once."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and any(
        vocabulary in getattr(var.aval, "shape", ()) for var in eqn.invars):
      count += 1
    for param in eqn.params.values():
      for inner in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          count += _vocabulary_products(inner, vocabulary)
  return count


def test_fused_loss_gradient_needs_one_projection_fewer():
  """Per chunk, three [B, C, E] x [E, V] products in the traced gradient
  instead of four (the rematerialised chunk projects twice)."""
  layout = VocabLayout(text_size=4000, speech_size=4000)
  hidden = jnp.zeros((2, 256, 64), jnp.float32)
  table = jnp.zeros((layout.real_size, 64), jnp.float32)
  targets = jnp.full((2, 256), layout.speech_offset, jnp.int32)
  weights = jnp.ones((2, 256), jnp.float32)
  knobs = dict(layout=layout, chunk_size=64, method="sld")

  def recompute(hidden, table):
    project = lambda h: jnp.einsum("...e,ve->...v", h, table)
    return losses.compute_loss_chunked(hidden, project, targets, weights, **knobs)[0]

  def in_forward(hidden, table):
    return fused_loss.compute_loss_fused(hidden, table, targets, weights, **knobs)[0]

  def products(fn):
    return _vocabulary_products(jax.make_jaxpr(jax.grad(fn, (0, 1)))(hidden, table).jaxpr,
                                layout.real_size)

  assert (products(recompute), products(in_forward)) == (4, 3)


def test_chunked_loss_rejects_bad_chunk_and_shapes():
  hidden = jnp.zeros((2, 4, 8))
  targets = np.zeros((2, 4), np.int32)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    losses.compute_loss_chunked(hidden, lambda h: h, targets, targets, layout=LAYOUT,
                                chunk_size=0)
  with pytest.raises(ValueError, match=r"hidden must be \[B, L, E\]"):
    losses.compute_loss_chunked(hidden[:, :3], lambda h: h, targets, targets, layout=LAYOUT,
                                chunk_size=2)
  with pytest.raises(ValueError, match="loss_chunk_size"):
    SpeechTextLM(LAYOUT, decoder=_tiny_decoder, loss_chunk_size=-4)
  with pytest.raises(ValueError, match="needs loss_chunk_size"):
    SpeechTextLM(LAYOUT, decoder=_tiny_decoder, loss_backward="in_forward")
  with pytest.raises(ValueError, match="loss_backward must be one of"):
    SpeechTextLM(LAYOUT, decoder=_tiny_decoder, loss_chunk_size=4, loss_backward="fused")
  for rows, embed in ((LAYOUT.real_size - 1, 8), (LAYOUT.size, 7)):
    with pytest.raises(ValueError, match=r"table must be \[V, E\] with V >= real_size"):
      fused_loss.compute_loss_fused(hidden, jnp.zeros((rows, embed)), targets, targets,
                                    layout=LAYOUT, chunk_size=2)
  with pytest.raises(ValueError, match="fewer than the real vocabulary"):
    losses.compute_loss_chunked(hidden, lambda h: h, targets, targets, layout=LAYOUT,
                                chunk_size=2)


def _tiny_decoder(vocab_size, **changes):
  return DecoderConfig(vocab_size=vocab_size, num_layers=2, num_heads=2, embed_dim=16,
                       mlp_dim=32, max_length=32, dropout_rate=0.0, **changes)


@pytest.mark.parametrize("backward", ["recompute", "in_forward"])
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_speech_text_lm_chunked_loss_equals_reference(tie_embeddings, backward):
  rng = np.random.default_rng(1)
  targets, weights, segments = _packed_batch(rng, 2, 32)
  inputs = np.where(segments > 0, np.pad(targets[:, :-1], ((0, 0), (1, 0))), 0)
  inputs[:, 0] = 0
  batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
           "decoder_loss_weights": weights.astype(np.int32), "decoder_segment_ids": segments}
  decoder_factory = functools.partial(_tiny_decoder, tie_embeddings=tie_embeddings)
  config = losses.LossConfig(method="sld", alpha=0.5)
  reference = SpeechTextLM(LAYOUT, decoder=decoder_factory, loss_config=config)
  chunked = SpeechTextLM(LAYOUT, decoder=decoder_factory, loss_config=config, loss_chunk_size=12,
                         loss_backward=backward)
  params = jax.tree.map(lambda box: box.value if hasattr(box, "value") else box,
                        reference.init_params(jax.random.key(3)),
                        is_leaf=lambda x: hasattr(x, "value"))

  def loss_and_grads(model):
    return jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(params, batch)

  (loss_ref, aux_ref), grads_ref = loss_and_grads(reference)
  (loss_chunk, aux_chunk), grads_chunk = loss_and_grads(chunked)
  np.testing.assert_allclose(loss_chunk, loss_ref, rtol=1e-5)
  for name in aux_ref:
    np.testing.assert_allclose(aux_chunk[name], aux_ref[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  flat_ref = jax.tree_util.tree_leaves_with_path(grads_ref)
  flat_chunk = jax.tree.leaves(grads_chunk)
  for (path, want), got in zip(flat_ref, flat_chunk):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_chunked_loss_gradient_needs_less_temporary_memory():
  """The reference's backward pass holds [B, L, V] float32 logits; chunks don't."""
  layout = VocabLayout(text_size=4000, speech_size=4000)
  batch, length, embed = 2, 256, 32
  hidden = jax.ShapeDtypeStruct((batch, length, embed), jnp.float32)
  table = jax.ShapeDtypeStruct((layout.size, embed), jnp.float32)
  targets = jnp.full((batch, length), layout.speech_offset, jnp.int32)
  weights = jnp.ones((batch, length), jnp.float32)

  def full(hidden, table):
    logits = jnp.einsum("ble,ve->blv", hidden, table)
    return losses.compute_loss(logits, targets, weights, layout=layout, method="sld")[0]

  def chunked(hidden, table):
    project = lambda h: jnp.einsum("...e,ve->...v", h, table)
    return losses.compute_loss_chunked(hidden, project, targets, weights, layout=layout,
                                       chunk_size=16, method="sld")[0]

  def temp_bytes(fn):
    compiled = jax.jit(jax.grad(fn, (0, 1))).lower(hidden, table).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  logits_bytes = batch * length * layout.size * 4
  full_bytes, chunked_bytes = temp_bytes(full), temp_bytes(chunked)
  # The reference holds the logits and their gradient (two [B, L, V] float32 buffers).
  assert full_bytes >= 2 * logits_bytes
  # What is left is a chunk of logits and its gradient, plus the [V, E] table gradient.
  assert chunked_bytes < logits_bytes / 3, (full_bytes, chunked_bytes)
  assert chunked_bytes < full_bytes / 6, (full_bytes, chunked_bytes)


def _attention_params_and_inputs(config, seed=0):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(decoder.init_params, config), jax.random.key(0))
  shapes = jax.tree.map(lambda box: box.value if hasattr(box, "value") else box, shapes,
                        is_leaf=lambda x: hasattr(x, "value"))
  params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
                        shapes)
  length = config.max_length               # splash takes multiples of 128
  tokens = rng.integers(1, config.vocab_size, (2, length)).astype(np.int32)
  segments = np.array([[1] * 50 + [2] * 60 + [0] * (length - 110), [1] * length], np.int32)
  positions = np.array([list(range(50)) + list(range(60)) + [0] * (length - 110),
                        list(range(length))], np.int32)
  return params, tokens, positions, segments


@pytest.mark.parametrize("implementation", ["xla", "splash", "triton"])
@pytest.mark.parametrize("dtype,tolerance", [("float32", 2e-5), ("bfloat16", 3e-2)])
def test_fused_attention_equals_einsum_attention(implementation, dtype, tolerance):
  """"xla" is cuDNN's portable twin; "splash" and "triton" run their Pallas
  kernels interpreted."""
  einsum = DecoderConfig(vocab_size=128, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
                         max_length=128, dropout_rate=0.0, dtype=dtype)
  fused = einsum.replace(attention_implementation=implementation)
  params, tokens, positions, segments = _attention_params_and_inputs(einsum)
  real = segments > 0

  def summed_logits(config, params):
    logits = decoder.Decoder(config).apply({"params": params}, tokens, positions, segments)
    return jnp.sum(jnp.where(real[..., None], logits, 0.0) ** 2), logits

  grad = lambda config: jax.jit(jax.grad(functools.partial(summed_logits, config),
                                         has_aux=True))(params)
  grads_einsum, logits_einsum = grad(einsum)
  grads_fused, logits_fused = grad(fused)
  scale = float(jnp.abs(logits_einsum).max())
  np.testing.assert_allclose(np.asarray(logits_fused)[real], np.asarray(logits_einsum)[real],
                             atol=tolerance * scale)
  # One bound for every leaf: the key bias's true gradient is 0 (softmax is
  # shift-invariant), so its values are rounding noise on either side.
  bound = tolerance * max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_einsum))
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(grads_einsum),
                               jax.tree.leaves(grads_fused)):
    np.testing.assert_allclose(got, want, atol=bound, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("implementation", ["splash", "triton"])
def test_pallas_attention_under_a_mesh_equals_einsum_attention(implementation):
  """The kernel in shard_map on a (2, 2, 2) mesh: rows over data x fsdp,
  heads over model; values and gradients equal one device's einsum path."""
  einsum = DecoderConfig(vocab_size=128, num_layers=1, num_heads=4, embed_dim=32, mlp_dim=64,
                         max_length=128, dropout_rate=0.0)
  fused = einsum.replace(attention_implementation=implementation)
  params, tokens, positions, segments = _attention_params_and_inputs(einsum)
  tokens, positions, segments = (np.concatenate([x, x[::-1]]) for x in
                                 (tokens, positions, segments))      # 4 rows
  real = segments > 0

  def summed_logits(config, params, tokens, positions, segments):
    logits = decoder.Decoder(config).apply({"params": params}, tokens, positions, segments)
    return jnp.sum(jnp.where(real[..., None], logits, 0.0) ** 2), logits

  def grad(config):
    return jax.grad(functools.partial(summed_logits, config), has_aux=True)

  grads_einsum, logits_einsum = jax.jit(grad(einsum))(params, tokens, positions, segments)
  mesh = partitioning.make_mesh(2, 2, 2, devices=jax.devices()[:8])
  with partitioning.sharding_context(mesh, partitioning.logical_axis_rules()):
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    inputs = [jax.device_put(x, rows) for x in (tokens, positions, segments)]
    jaxpr = str(jax.make_jaxpr(grad(fused))(params, *inputs))
    grads_fused, logits_fused = jax.jit(grad(fused))(params, *inputs)
  assert "shard_map" in jaxpr
  scale = float(jnp.abs(logits_einsum).max())
  np.testing.assert_allclose(np.asarray(logits_fused)[real], np.asarray(logits_einsum)[real],
                             atol=2e-5 * scale)
  bound = 2e-5 * max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_einsum))
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(grads_einsum),
                               jax.tree.leaves(grads_fused)):
    np.testing.assert_allclose(got, want, atol=bound, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kernel", [splash.splash_attention, triton_attention.triton_attention])
def test_pallas_attention_refuses_a_sharded_length(kernel):
  mesh = partitioning.make_mesh(4, 1, 2, devices=jax.devices()[:8])
  rules = partitioning.logical_axis_rules(overrides=[("length", "model")])
  query = jnp.zeros((4, 128, 2, 8))
  with partitioning.sharding_context(mesh, rules):
    with pytest.raises(ValueError, match="length axis is sharded"):
      jax.eval_shape(lambda q: kernel(q, q, q, jnp.ones((4, 128), jnp.int32), 0.3), query)


def test_fused_attention_refuses_attention_dropout():
  base = dict(vocab_size=128, num_layers=1, num_heads=2, embed_dim=8, mlp_dim=16)
  with pytest.raises(ValueError, match="attention_dropout_rate=0.0"):
    DecoderConfig(**base, dropout_rate=0.1, attention_implementation="cudnn")
  config = DecoderConfig(**base, dropout_rate=0.1, attention_dropout_rate=0.0,
                         attention_implementation="cudnn")
  assert config.attention_dropout == 0.0 and config.dropout_rate == 0.1
  with pytest.raises(ValueError, match="attention_implementation must be one of"):
    DecoderConfig(**base, attention_implementation="flash")


@pytest.mark.parametrize("kernel", [splash.splash_attention, triton_attention.triton_attention])
def test_pallas_attention_names_the_length_it_needs(kernel):
  query = jnp.zeros((1, 100, 2, 8))
  with pytest.raises(ValueError, match=r"row length \(100\) to be a multiple of 128"):
    kernel(query, query, query, jnp.ones((1, 100), jnp.int32), 1.0)
