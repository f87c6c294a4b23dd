"""Decoder: packing, KV-cache decoding, remat/scan equivalence, dtypes."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax.model import decoder
from sld_jax.model import masks
from sld_jax.model.config import DecoderConfig
from sld_jax.model.config import REMAT_POLICIES

jax.config.update("jax_default_matmul_precision", "highest")

TINY = DecoderConfig(vocab_size=128, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64,
                     max_length=32, dropout_rate=0.1)
LLAMA_LIKE = TINY.replace(position="rope", norm="rmsnorm", mlp="swiglu")
VARIANTS = {"gpt2": TINY, "llama_like": LLAMA_LIKE, "untied": TINY.replace(tie_embeddings=False)}


def _strip(boxed):
  return jax.tree.map(lambda box: box.value, boxed,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


@functools.lru_cache(maxsize=None)
def _params(config, seed=0):
  """Random parameters of the real structure, drawn in numpy.

  Cheaper than compiling ``init_params`` for every config (the partitioning
  tests run the real init) and, unlike it, non-zero biases and non-unit norm
  scales, so that a misplaced bias or norm cannot hide.
  """
  rng = np.random.default_rng(seed)
  shapes = _strip(jax.eval_shape(functools.partial(decoder.init_params, config),
                                 jax.random.key(0)))

  def draw(path, shape):
    name = jax.tree_util.keystr(path[-1:])
    center = 1.0 if "scale" in name else 0.0
    return jnp.asarray(center + 0.1 * rng.standard_normal(shape.shape), shape.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, params, tokens, positions, segment_ids):
  return decoder.Decoder(config).apply({"params": params}, tokens, positions, segment_ids)


def _forward(config, params, tokens, positions=None, segment_ids=None):
  return _apply(config, params, jnp.asarray(tokens),
                None if positions is None else jnp.asarray(positions),
                None if segment_ids is None else jnp.asarray(segment_ids))


def _random_tokens(seed, shape):
  return np.random.default_rng(seed).integers(3, 128, size=shape).astype(np.int32)


# One [2, 10] batch shared by several tests so that their jits are compiled once.
TOKENS = _random_tokens(5, (2, 10))


def test_masks_match_docstring_examples():
  mask = masks.decoder_attention_mask(6, jnp.array([[1, 1, 1, 2, 2, 0]]))[0, 0]
  expected = np.array([[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0],
                       [0, 0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(
      masks.decode_step_mask(jnp.array([2, 0]), 4)[:, 0, 0],
      [[1, 1, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(masks.prompt_mask(jnp.array([2, 0]), 3), [[1, 1, 0], [0, 0, 0]])


def test_gpt2_parameter_shapes_and_logical_axes():
  boxed = jax.eval_shape(functools.partial(decoder.init_params, TINY), jax.random.key(0))
  axes = jax.tree.map(lambda box: (box.value.shape, box.names), boxed,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  layer = axes["layers_0"]
  assert axes["token_embedder"]["embedding"] == ((128, 32), ("vocab", "embed"))
  assert axes["position_embedder"]["embedding"] == ((32, 32), ("abspos", "embed"))
  assert layer["attention"]["query"]["kernel"] == ((32, 4, 8), ("embed", "heads", "kv"))
  assert layer["attention"]["value"]["bias"] == ((4, 8), ("heads", "kv"))
  assert layer["attention"]["out"]["kernel"] == ((4, 8, 32), ("heads", "kv", "embed"))
  assert layer["mlp"]["wi"]["kernel"] == ((32, 64), ("embed", "mlp"))
  assert layer["mlp"]["wo"]["kernel"] == ((64, 32), ("mlp", "embed"))
  assert layer["pre_attention_norm"]["bias"] == ((32,), ("embed",))
  assert axes["final_norm"]["scale"] == ((32,), ("embed",))
  assert "logits_dense" not in axes and "layers_2" not in axes
  llama = _strip(jax.eval_shape(functools.partial(decoder.init_params, LLAMA_LIKE),
                                jax.random.key(0)))
  untied = _strip(jax.eval_shape(functools.partial(decoder.init_params, VARIANTS["untied"]),
                                 jax.random.key(0)))
  assert untied["logits_dense"]["kernel"].shape == (32, 128)
  assert "position_embedder" not in llama
  assert set(llama["layers_0"]["mlp"]) == {"wi_gate", "wi_up", "wo"}
  assert "bias" not in llama["layers_0"]["mlp"]["wo"] and "bias" not in llama["final_norm"]


@pytest.mark.parametrize("variant", ["gpt2", "llama_like"])
def test_packed_row_equals_sequences_alone(variant):
  config = VARIANTS[variant]
  params = _params(config)
  first, second = _random_tokens(1, (5,)), _random_tokens(2, (7,))
  packed = np.zeros((1, 14), np.int32)
  packed[0, :5], packed[0, 5:12] = first, second
  segments = np.array([[1] * 5 + [2] * 7 + [0] * 2])
  positions = np.array([list(range(5)) + list(range(7)) + [0, 0]])
  alone = np.zeros((2, 7), np.int32)  # right padding is invisible to causal attention
  alone[0, :5], alone[1] = first, second

  logits = _forward(config, params, packed, positions, segments)
  alone_logits = _forward(config, params, alone)

  assert logits.shape == (1, 14, 128) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits[0, :5], alone_logits[0, :5], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits[0, 5:12], alone_logits[1], atol=1e-5, rtol=1e-5)
  assert np.all(np.isfinite(logits))  # padding rows attend to nothing, stay finite


_prefill = jax.jit(decoder.prefill, static_argnums=0)
_decode_step = jax.jit(decoder.decode_step, static_argnums=0)


@pytest.mark.parametrize("variant", ["gpt2", "llama_like_scan_remat"])
def test_kv_cache_decoding_matches_full_forward(variant):
  config = {"gpt2": TINY,
            "llama_like_scan_remat": LLAMA_LIKE.replace(scan_layers=True, remat=True)}[variant]
  params = _params(config)
  if config.scan_layers:
    params = decoder.stack_layer_params(_params(config.replace(scan_layers=False)),
                                        config.num_layers)
  lengths = np.array([3, 6, 1], np.int32)
  prompts = _random_tokens(3, (3, 6))  # garbage past each length: must never be attended
  steps = _random_tokens(4, (4, 3))    # tokens fed at decode steps 0..3
  max_length = 6 + len(steps)          # row 1 fills the cache exactly

  cache = decoder.init_cache(config, batch_size=3, max_length=max_length)
  logits, cache = _prefill(config, params, cache, prompts, lengths)
  np.testing.assert_array_equal(cache["cache_index"], lengths)
  predicted = [decoder.last_logits(logits, lengths)]
  for tokens in steps:
    step_logits, cache = _decode_step(config, params, cache, tokens)
    predicted.append(step_logits)
  np.testing.assert_array_equal(cache["cache_index"], lengths + len(steps))

  # Reference: each row's prompt + fed tokens, run in full.
  full = np.zeros((3, max_length), np.int32)
  for row, length in enumerate(lengths):
    full[row, :length] = prompts[row, :length]
    full[row, length:length + len(steps)] = steps[:, row]
  reference = _forward(config, params, full)
  for t, got in enumerate(predicted):
    want = reference[np.arange(3), lengths - 1 + t]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"step {t}")

  # Row 1's cache is full: one more step gives it NaN logits, the others go on.
  overflow_logits, _ = _decode_step(config, params, cache, steps[0])
  assert np.all(np.isnan(overflow_logits[1]))
  assert np.all(np.isfinite(overflow_logits[np.array([0, 2])]))


@pytest.mark.parametrize("variant", ["gpt2", "untied"])
def test_prefill_last_logits_and_restricted_vocabulary(variant):
  """logits="last" is the full prefill read at lengths - 1; restrict_vocab's
  decoder steps give the first columns of the full decoder's logits."""
  config = VARIANTS[variant].replace(dropout_rate=0.0)
  params = _params(config)
  lengths = np.array([3, 6, 1], np.int32)
  prompts = _random_tokens(5, (3, 6))
  prefill = jax.jit(decoder.prefill, static_argnums=0, static_argnames="logits")
  cache = decoder.init_cache(config, batch_size=3, max_length=8)

  everything, full_cache = prefill(config, params, cache, prompts, lengths)
  last, last_cache = prefill(config, params, cache, prompts, lengths, logits="last")
  assert everything.shape == (3, 6, 128) and last.shape == (3, 128)
  np.testing.assert_allclose(last, decoder.last_logits(everything, lengths),
                             atol=1e-5, rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, last_cache, full_cache)   # the same cache

  text_model, text_params = decoder.restrict_vocab(config, params, 40)
  assert text_model.config.vocab_size == 40
  assert text_params["token_embedder"]["embedding"].shape == (40, 32)
  tokens = np.array([7, 8, 39], np.int32)
  full_step, full_next = _decode_step(config, params, full_cache, tokens)
  text_step, text_next = _decode_step(text_model.config, text_params, full_cache, tokens)
  assert text_step.shape == (3, 40)
  np.testing.assert_allclose(text_step, full_step[:, :40], atol=1e-5, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), text_next, full_next)


def test_logits_positions_pick_one_position_per_row():
  params = _params(TINY)
  tokens = _random_tokens(6, (2, 5))
  full = _forward(TINY, params, tokens)
  picked = decoder.Decoder(TINY).apply({"params": params}, jnp.asarray(tokens),
                                       logits_positions=jnp.array([4, 1]))
  assert picked.shape == (2, 1, 128)
  np.testing.assert_allclose(picked[:, 0], full[np.arange(2), [4, 1]], atol=1e-5, rtol=1e-5)


def test_bad_cache_and_feature_shapes_raise():
  params = _params(TINY)
  prompts, lengths = np.full((2, 4), 5, np.int32), np.array([4, 2], np.int32)
  with pytest.raises(ValueError, match="exceeds the cache length"):
    decoder.prefill(TINY, params, decoder.init_cache(TINY, 2, 3), prompts, lengths)
  cache = decoder.init_cache(TINY, 2, 8)
  with pytest.raises(ValueError, match="lengths must lie in"):
    decoder.prefill(TINY, params, cache, prompts, np.array([5, 2]))
  with pytest.raises(ValueError, match="tokens must be \\[batch\\]"):
    decoder.decode_step(TINY, params, cache, prompts)
  with pytest.raises(ValueError, match="max_length=64 exceeds"):
    decoder.init_cache(TINY, 2, 64)
  with pytest.raises(ValueError, match="decoder_segment_ids has shape"):
    _forward(TINY, params, np.ones((1, 4), np.int32), segment_ids=np.ones((1, 3), np.int32))
  with pytest.raises(ValueError, match="logits must be one of"):
    decoder.prefill(TINY, params, cache, prompts, lengths, logits="first")
  with pytest.raises(ValueError, match="vocab_size must lie in"):
    decoder.restrict_vocab(TINY, params, 129)
  with pytest.raises(ValueError, match="logits_positions must be"):
    decoder.Decoder(TINY).apply({"params": params}, prompts, logits_positions=jnp.array([1]))


def test_remat_and_scan_equal_plain_stack():
  params = _params(TINY)
  tokens = TOKENS
  segments = np.array([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3])
  positions = np.array([list(range(4)) + list(range(6)), list(range(7)) + [0] * 3])
  plain = _forward(TINY, params, tokens, positions, segments)

  remat = TINY.replace(remat=True)
  np.testing.assert_allclose(_forward(remat, params, tokens, positions, segments), plain,
                             atol=1e-6, rtol=1e-6)
  scanned_params = decoder.stack_layer_params(params, TINY.num_layers)
  scanned = _forward(TINY.replace(scan_layers=True), scanned_params, tokens, positions, segments)
  np.testing.assert_allclose(scanned, plain, atol=1e-6, rtol=1e-6)
  round_trip = decoder.unstack_layer_params(scanned_params, TINY.num_layers)
  jax.tree.map(np.testing.assert_array_equal, round_trip, params)

  # Gradients through remat equal the plain ones.
  def loss(config, p):
    return jnp.mean(decoder.Decoder(config).apply({"params": p}, tokens) ** 2)
  grads_plain = jax.jit(jax.grad(lambda p: loss(TINY, p)))(params)
  grads_remat = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               grads_remat, grads_plain)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_policies_keep_the_gradients(scan_layers):
  params = _params(TINY)
  if scan_layers:
    params = decoder.stack_layer_params(params, TINY.num_layers)

  def grads(config):
    loss = lambda p: jnp.mean(decoder.Decoder(config).apply({"params": p}, TOKENS) ** 2)
    return jax.jit(jax.grad(loss))(params)

  plain = grads(TINY.replace(scan_layers=scan_layers))
  for policy in REMAT_POLICIES:
    got = grads(TINY.replace(scan_layers=scan_layers, remat=True, remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), got, plain)
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    TINY.replace(remat_policy="dots")


def test_remat_policies_recompute_less_as_they_save_more():
  """XLA's flop count of the gradient: full remat recomputes the whole
  layer, "minimal" keeps the matmul outputs, and keeping the attention
  output as well recomputes least. (16 rows: at 4, XLA:CPU's counts for
  the two policies that keep the attention output came within 0.2% of each
  other once the LayerNorm had a backward pass of its own.)"""
  config = DecoderConfig(vocab_size=256, num_layers=4, num_heads=4, embed_dim=64, mlp_dim=256,
                         max_length=256, dropout_rate=0.0)
  params = jax.eval_shape(lambda: nn.meta.unbox(decoder.init_params(config, jax.random.key(0))))
  tokens = jnp.ones((16, 256), jnp.int32)

  def flops(config):
    loss = lambda p: jnp.mean(decoder.Decoder(config).apply({"params": p}, tokens) ** 2)
    return jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()["flops"]

  cost = {policy: flops(config.replace(remat=True, remat_policy=policy))
          for policy in REMAT_POLICIES}
  none = flops(config)
  assert none < cost["minimal_attention_out"] < cost["minimal"] < cost["full"], (none, cost)
  assert cost["minimal_attention_out"] < cost["save_attention_out"] < cost["full"], cost


def test_scanned_init_has_leading_layers_axis():
  init = functools.partial(decoder.init_params, TINY.replace(scan_layers=True))
  boxed = jax.eval_shape(init, jax.random.key(0))
  kernel = boxed["layers"]["attention"]["query"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads", "kv")
  assert kernel.value.shape == (2, 32, 4, 8)


def test_dropout_changes_outputs_only_when_enabled():
  params = _params(TINY)
  base = _forward(TINY, params, TOKENS)
  np.testing.assert_array_equal(_forward(TINY, params, TOKENS), base)
  apply = jax.jit(functools.partial(decoder.Decoder(TINY).apply, enable_dropout=True))
  dropped = apply({"params": params}, TOKENS, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(dropped, base)


def test_bfloat16_compute_is_close_to_float32():
  tokens = TOKENS
  for config in (TINY, LLAMA_LIKE):
    params = _params(config)
    fp32 = _forward(config, params, tokens)
    bf16 = _forward(config.replace(dtype="bfloat16"), params, tokens)
    assert bf16.dtype == jnp.float32 and fp32.dtype == jnp.float32
    np.testing.assert_allclose(bf16, fp32, atol=3e-2 * float(jnp.abs(fp32).max()))
  bf16_init = functools.partial(decoder.init_params, TINY.replace(dtype="bfloat16"))
  bf16_params = jax.eval_shape(bf16_init, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.float32)}


def test_out_of_range_token_poisons_its_row_instead_of_being_clamped():
  params = _params(TINY)
  tokens = TOKENS.copy()
  tokens[1, 6] = 128
  logits = _forward(TINY, params, tokens)
  assert np.all(np.isfinite(logits[0])) and np.all(np.isnan(logits[1]))


def _dot_input_dtypes(closed_jaxpr) -> list[tuple[str, ...]]:
  """Input dtypes of every dot_general in a jaxpr, sub-jaxprs (jit, scan,
  remat, custom_vjp) included."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):  # ClosedJaxpr
            visit(sub.jaxpr)
          elif hasattr(sub, "eqns"):  # Jaxpr
            visit(sub)

  visit(closed_jaxpr.jaxpr)
  return found


@pytest.mark.parametrize("name", ["gpt2", "llama_like"])
def test_bfloat16_config_runs_its_matmuls_in_bfloat16(name):
  """With dtype="bfloat16" every matmul but the float32 logits projection
  takes bfloat16 inputs: q/k/v/out, the two attention products and the MLP of
  each layer. Closeness to float32 alone would pass if bf16 were ignored."""
  config = VARIANTS[name]
  params = _params(config)
  tokens = jnp.asarray(TOKENS)

  def dots(cfg):
    return _dot_input_dtypes(jax.make_jaxpr(
        lambda p: decoder.Decoder(cfg).apply({"params": p}, tokens))(params))

  bf16 = dots(config.replace(dtype="bfloat16"))
  in_bf16 = [d for d in bf16 if d == ("bfloat16", "bfloat16")]
  other = [d for d in bf16 if d != ("bfloat16", "bfloat16")]
  mlp_matmuls = 3 if config.mlp == "swiglu" else 2
  assert len(in_bf16) == config.num_layers * (4 + 2 + mlp_matmuls), bf16
  assert other == [("float32", "float32")], bf16  # the logits projection
  assert all(d == ("float32", "float32") for d in dots(config)), "float32 config"



@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_mlp_keeps_only_matmul_outputs_for_its_backward_pass(mlp, capsys):
  """The activation is recomputed in the backward pass (``layers.Mlp``): of the
  ``[B, L, M]`` arrays only the projections' products and the activation
  that feeds the output projection are kept, and the gradients are those of
  the formula written out."""
  from jax.ad_checkpoint import print_saved_residuals  # pylint: disable=g-import-not-at-top
  from sld_jax.model import layers  # pylint: disable=g-import-not-at-top
  config = TINY.replace(mlp=mlp, dropout_rate=0.0)
  module = layers.Mlp(config)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 32)), jnp.float32)
  params = _strip(module.init(jax.random.key(0), x))["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)           # non-zero biases

  def written_out(params, x):
    p = params
    if mlp == "gelu":
      hidden = jax.nn.gelu(x @ p["wi"]["kernel"] + p["wi"]["bias"], approximate=True)
      return hidden @ p["wo"]["kernel"] + p["wo"]["bias"]
    return (jax.nn.silu(x @ p["wi_gate"]["kernel"]) * (x @ p["wi_up"]["kernel"])) @ p["wo"]["kernel"]

  def loss(apply, params, x):
    return jnp.sum(jnp.sin(apply(params, x)))

  ours = lambda params, x: module.apply({"params": params}, x)
  np.testing.assert_allclose(ours(params, x), written_out(params, x), rtol=1e-5, atol=1e-6)
  want = jax.grad(functools.partial(loss, written_out), (0, 1))(params, x)
  got = jax.grad(functools.partial(loss, ours), (0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  print_saved_residuals(functools.partial(loss, ours), params, x)
  kept = [line for line in capsys.readouterr().out.splitlines() if "[2,5,64]" in line]
  products = 1 if mlp == "gelu" else 2
  assert len(kept) == products + 1, kept


def _naive_layer_norm(x, scale, bias, epsilon):
  """LayerNorm as NumPy float64 would write it."""
  x = np.asarray(x, np.float64)
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + epsilon) * scale + bias


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_backward_equals_the_differentiated_forward(dtype):
  """``layers.layer_norm``'s own backward pass against autodiff of its forward
  expression (and the forward against NumPy), under a cotangent with a
  different weight at every position; rows batched over two leading axes."""
  from sld_jax.model import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  x = jnp.asarray(3.0 * rng.standard_normal((3, 5, 16)) + 1.0, dtype)
  scale = jnp.asarray(1.0 + 0.3 * rng.standard_normal(16), jnp.float32)
  bias = jnp.asarray(0.3 * rng.standard_normal(16), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)

  def differentiated(x, scale, bias):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias).astype(dtype)

  def loss(norm, x, scale, bias):
    return jnp.sum(norm(x, scale, bias).astype(jnp.float32) * weights)

  ours = functools.partial(layers.layer_norm, epsilon=1e-5, dtype=dtype)
  np.testing.assert_allclose(np.asarray(ours(x, scale, bias), np.float64),
                             _naive_layer_norm(x.astype(jnp.float32), scale, bias, 1e-5),
                             rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-5)
  want = jax.grad(functools.partial(loss, differentiated), (0, 1, 2))(x, scale, bias)
  got = jax.jit(jax.grad(functools.partial(loss, ours), (0, 1, 2)))(x, scale, bias)
  for name, g, w in zip(("x", "scale", "bias"), got, want):
    assert g.dtype == w.dtype, name
    assert float(jnp.abs(w.astype(jnp.float32)).max()) > 0.1, name
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=1e-5, atol=1e-5 if dtype == jnp.float32 else 2e-2,
                               err_msg=name)


def test_layer_norm_one_pass_variance_holds_for_offset_rows_and_large_dimensions():
  """``var = mean(x^2) - mean^2`` against float64 NumPy on rows whose mean is
  30x their spread, and on rows with one dimension 1000x the others (as
  residual streams have): float32 accuracy within 1e-3."""
  from sld_jax.model import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  offset = 30.0 + rng.standard_normal((4, 256))
  spiky = rng.standard_normal((4, 256))
  spiky[:, 7] = 1000.0
  ones, zeros = jnp.ones(256), jnp.zeros(256)
  for x in (offset, spiky):
    got = layers.layer_norm(jnp.asarray(x, jnp.float32), ones, zeros, 1e-5, jnp.float32)
    np.testing.assert_allclose(np.asarray(got, np.float64), _naive_layer_norm(x, 1.0, 0.0, 1e-5),
                               atol=1e-3)
