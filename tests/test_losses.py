"""Tests for sld_jax.losses against naive one-hot implementations.

The peers here are written independently of the closed forms in losses.py:
they loop over positions (NumPy, float64) or build full one-hot / target
tensors (jnp), and one is a NumPy transcription of the released PyTorch loss
(HF-style shifted logits, ignore_index=-100, KLDivLoss(reduction="batchmean")).
"""

from __future__ import annotations

import math
import zlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax import losses
from sld_jax.vocab import VocabLayout

LAYOUT = VocabLayout(text_size=7, speech_size=11)       # real 19, size 128
FULL_LAYOUT = VocabLayout(text_size=28, speech_size=100)  # real 128, <time_mask> 128
STATIC = ("layout", "method", "alpha", "epsilon", "temperature", "kl_target",
          "kl_normalization")


# ----------------------------------------------------------------------------
# Random batches: "units <speech_end> text <text_end>" segments plus padding.
# ----------------------------------------------------------------------------


def make_segment(rng, layout):
  units = rng.integers(0, layout.speech_size, rng.integers(1, 6)) + layout.speech_offset
  text = rng.integers(2, layout.text_size, rng.integers(1, 4))  # UNK and words
  return np.concatenate(
      [units, [layout.speech_end_id], text, [layout.text_end_id]]).astype(np.int32)


def make_batch(rng, layout, batch=3, length=32, packed=False, drop_prob=0.1,
               empty_last_row=False):
  """Returns targets, weights [B, L] and segment_ids (None when unpacked)."""
  targets = np.zeros((batch, length), np.int32)
  weights = np.zeros((batch, length), np.float32)
  segment_ids = np.zeros((batch, length), np.int32)
  for row in range(batch - int(empty_last_row)):
    segments = [make_segment(rng, layout)
                for _ in range(int(rng.integers(2, 4)) if packed else 1)]
    start = 0
    for number, segment in enumerate(segments, start=1):
      targets[row, start:start + len(segment)] = segment
      weights[row, start:start + len(segment)] = 1.0
      segment_ids[row, start:start + len(segment)] = number
      start += len(segment)
  # Some real tokens get weight 0 too (e.g. masked by the feature converter).
  weights[rng.random(weights.shape) < drop_prob] = 0.0
  return targets, weights, (segment_ids if packed else None)


def make_logits(rng, layout, batch=3, length=32, scale=2.0):
  logits = rng.normal(size=(batch, length, layout.size)) * scale
  logits[..., layout.real_size:] = 50.0  # rounding ids: must never matter
  return logits.astype(np.float32)


# ----------------------------------------------------------------------------
# Naive peers.
# ----------------------------------------------------------------------------


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def naive_num_sequences(weights, segment_ids):
  if segment_ids is None:
    return int(np.sum(np.any(weights > 0, axis=1)))
  return sum(len({int(s) for s, w in zip(seg_row, w_row) if s != 0 and w > 0})
             for seg_row, w_row in zip(segment_ids, weights))


def naive_loss(logits, targets, weights, segment_ids, layout, method, alpha=0.008,
               epsilon=0.1, temperature=1.0, kl_target="paper", kl_normalization="sequence"):
  """Position-by-position float64 loss with explicit target vectors."""
  g, k, off, real = (layout.text_size, layout.speech_size, layout.speech_offset,
                     layout.real_size)
  t = temperature
  sums = {"text": 0.0, "speech": 0.0, "kl": 0.0, "acc_text": 0.0, "acc_speech": 0.0}
  counts = {"text": 0, "speech": 0, "unit": 0, "kl": 0}
  for b in range(targets.shape[0]):
    for i in range(targets.shape[1]):
      y, w = int(targets[b, i]), float(weights[b, i])
      if w <= 0:
        continue
      is_text, is_speech = 0 < y < g, g <= y < real
      logp = np_log_softmax(logits[b, i, :real])
      correct = float(np.argmax(logits[b, i, :real]) == y)
      if is_text:
        sums["text"] += -w * logp[y]
        sums["acc_text"] += correct
        counts["text"] += 1
      if is_speech:
        sums["speech"] += -w * logp[y]
        sums["acc_speech"] += correct
        counts["speech"] += 1
      counts["unit"] += int(y >= off)
      counts["kl"] += int(y >= off) if kl_target == "paper" else int(is_text or is_speech)
      if method != "sld":
        continue
      log_student = np_log_softmax(logits[b, i, off:real] / t)
      if kl_target == "paper" and y >= off:
        q = np.full(k, epsilon / k)
        q[y - off] += 1 - epsilon
        terms = [qk * (math.log(qk) - lp) for qk, lp in zip(q, log_student) if qk > 0]
        sums["kl"] += w * t * t * sum(terms)
      elif kl_target == "reference" and (is_text or is_speech):
        q = np.full(k, epsilon / k)
        q[max(y - off, 0)] += 1 - epsilon
        r = np_softmax(q / t)
        sums["kl"] += w * t * t * np.sum(r * (np.log(r) - log_student))
  num_sequences = naive_num_sequences(weights, segment_ids)
  out = {
      "ce_text": sums["text"] / max(counts["text"], 1),
      "ce_speech": sums["speech"] / max(counts["speech"], 1),
      "accuracy_text": sums["acc_text"] / max(counts["text"], 1),
      "accuracy_speech": sums["acc_speech"] / max(counts["speech"], 1),
      "num_text_tokens": counts["text"],
      "num_speech_tokens": counts["speech"],
      "num_unit_tokens": counts["unit"],
      "num_kl_positions": counts["kl"],
      "num_sequences": num_sequences,
      "kl_speech": 0.0,
  }
  if method == "sld":
    denominator = num_sequences if kl_normalization == "sequence" else counts["kl"]
    out["kl_speech"] = sums["kl"] / max(denominator, 1)
  out["loss"] = {
      "loss_masking": out["ce_text"],
      "multimodal_ce": out["ce_text"] + out["ce_speech"],
      "sld": out["ce_text"] + out["ce_speech"] + alpha * out["kl_speech"],
  }[method]
  return out


def naive_jnp_loss(logits, targets, weights, num_sequences, layout, method,
                   alpha, epsilon, temperature, kl_target, kl_normalization="sequence"):
  """Differentiable peer that materialises every one-hot and target tensor."""
  g, k, off, real = (layout.text_size, layout.speech_size, layout.speech_offset,
                     layout.real_size)
  t = temperature
  rounding = jnp.arange(layout.size) >= real
  logp = jax.nn.log_softmax(jnp.where(rounding, -1e30, logits), axis=-1)
  onehot = jax.nn.one_hot(targets, layout.size, dtype=logits.dtype)
  nll = -jnp.sum(onehot * logp, axis=-1)
  weighted = weights > 0
  text = weighted & (targets > 0) & (targets < g)
  speech = weighted & (targets >= g) & (targets < real)
  unit = weighted & (targets >= off) & (targets < real)
  mean = lambda x, m, n: jnp.sum(jnp.where(m, weights * x, 0)) / max(n, 1)
  ce_text = mean(nll, text, int(np.sum(text)))
  ce_speech = mean(nll, speech, int(np.sum(speech)))
  if method == "loss_masking":
    return ce_text
  if method == "multimodal_ce":
    return ce_text + ce_speech
  log_student = jax.nn.log_softmax(logits[..., off:real] / t, axis=-1)
  unit_class = jnp.where(unit, targets - off, 0)
  q = (1 - epsilon) * jax.nn.one_hot(unit_class, k, dtype=logits.dtype) + epsilon / k
  if kl_target == "paper":
    kl = jnp.sum(jax.scipy.special.xlogy(q, q) - q * log_student, axis=-1)
    positions = unit
  else:
    r = jax.nn.softmax(q / t, axis=-1)
    kl = jnp.sum(r * jnp.log(r) - r * log_student, axis=-1)
    positions = text | speech
  denominator = num_sequences if kl_normalization == "sequence" else int(np.sum(positions))
  kl_speech = t * t * mean(kl, positions, denominator)
  return ce_text + ce_speech + alpha * kl_speech


def released_sld_loss(logits, labels, text_size, alpha, epsilon, temperature):
  """NumPy transcription of the released PyTorch SLD loss.

  Released layout: text [0, G), <text_end> = G, <speech_end> = G + 1, units
  from G + 2. ``logits [B, L+1, V]`` and ``labels [B, L+1]`` are HF-style
  (position i predicts label i + 1), -100 = ignore.
  """
  g, t = text_size, temperature
  logits = np.asarray(logits, np.float64)[:, :-1]
  labels = np.asarray(labels)[:, 1:]
  valid = labels != -100
  logp = np_log_softmax(logits)

  def mean_cross_entropy(select):  # F.cross_entropy on the selected positions
    rows, cols = np.nonzero(select)
    return -np.mean(logp[rows, cols, labels[rows, cols]])

  ce_text = mean_cross_entropy(valid & (labels < g + 1))
  ce_speech = mean_cross_entropy(valid & (labels >= g + 1))
  speech_logits = logits[..., g + 2:]
  k = speech_logits.shape[-1]
  student = np_log_softmax(speech_logits / t)
  speech_labels = np.clip(labels - (g + 2), 0, None)
  q = np.eye(k)[speech_labels] * (1 - epsilon) + epsilon / k
  target = np_softmax(q / t)
  pointwise = target * (np.log(target) - student)     # nn.KLDivLoss, log input
  kl = pointwise[valid].sum() / logits.shape[0] * t * t  # reduction="batchmean"
  return {"ce_text": ce_text, "ce_speech": ce_speech, "kl_speech": kl,
          "loss": ce_text + ce_speech + alpha * kl}


def to_released_layout(rng, logits, targets, weights, layout):
  """Same logits and labels in the released id layout (columns permuted)."""
  g, real = layout.text_size, layout.real_size
  ours_to_released = np.arange(real)
  ours_to_released[layout.text_end_id] = g - 1   # released <text_end> = G' = g - 1
  ours_to_released[2:g] = np.arange(1, g - 1)     # PAD stays 0, text shifts down
  released_to_ours = np.argsort(ours_to_released)
  batch, length = targets.shape
  core = logits[..., :real][..., released_to_ours]
  extra = rng.normal(size=(batch, 1, real)).astype(logits.dtype)  # dropped by shift
  released_logits = np.concatenate([core, extra], axis=1)
  labels = np.full((batch, length + 1), -100, np.int64)
  labels[:, 1:] = np.where(weights > 0, ours_to_released[targets], -100)
  return released_logits, labels, g - 1


def run_loss(logits, targets, weights, segment_ids, layout, **kwargs):
  return losses.compute_loss(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
      None if segment_ids is None else jnp.asarray(segment_ids),
      layout=layout, **kwargs)


def assert_aux_close(aux, expected, rtol=1e-5, atol=1e-6):
  for key, value in expected.items():
    np.testing.assert_allclose(np.asarray(aux[key], np.float64), value,
                               rtol=rtol, atol=atol, err_msg=key)


# ----------------------------------------------------------------------------
# Values.
# ----------------------------------------------------------------------------

CASES = [
    ("loss_masking", "paper", 0.1, 1.0, "sequence"),
    ("multimodal_ce", "paper", 0.1, 1.0, "sequence"),
    ("sld", "paper", 0.1, 1.0, "sequence"),
    ("sld", "paper", 0.1, 1.0, "token"),
    ("sld", "reference", 0.1, 1.0, "sequence"),
    ("sld", "reference", 0.1, 1.0, "token"),
    ("sld", "paper", 0.25, 2.5, "token"),
    ("sld", "reference", 0.25, 2.5, "sequence"),
    ("sld", "paper", 0.0, 0.5, "sequence"),
    ("sld", "reference", 1.0, 1.0, "token"),
]


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("method,kl_target,epsilon,temperature,kl_normalization", CASES)
def test_matches_naive_numpy(method, kl_target, epsilon, temperature, kl_normalization,
                             packed):
  rng = np.random.default_rng(zlib.crc32(repr((method, kl_target, epsilon, packed)).encode()))
  targets, weights, segment_ids = make_batch(rng, LAYOUT, packed=packed,
                                             empty_last_row=not packed)
  logits = make_logits(rng, LAYOUT)
  kwargs = dict(method=method, alpha=0.7, epsilon=epsilon, temperature=temperature,
                kl_target=kl_target, kl_normalization=kl_normalization)
  loss, aux = run_loss(logits, targets, weights, segment_ids, LAYOUT, **kwargs)
  expected = naive_loss(logits, targets, weights, segment_ids, LAYOUT, **kwargs)
  assert loss.dtype == jnp.float32
  assert_aux_close(aux, expected)
  np.testing.assert_allclose(float(loss), expected["loss"], rtol=1e-5)
  if method == "sld":
    assert expected["kl_speech"] > 0  # the KL term is really exercised


@pytest.mark.parametrize("kl_normalization", ["sequence", "token"])
@pytest.mark.parametrize("kl_target", ["paper", "reference"])
def test_fractional_weights_and_full_vocab(kl_target, kl_normalization):
  """Weights scale each token's term; real_size a multiple of 128 (only <time_mask> after)."""
  rng = np.random.default_rng(7)
  targets, weights, segment_ids = make_batch(rng, FULL_LAYOUT, packed=True)
  weights = weights * rng.uniform(0.5, 2.0, weights.shape).astype(np.float32)
  logits = make_logits(rng, FULL_LAYOUT)
  kwargs = dict(method="sld", alpha=0.3, epsilon=0.2, temperature=1.5,
                kl_target=kl_target, kl_normalization=kl_normalization)
  _, aux = run_loss(logits, targets, weights, segment_ids, FULL_LAYOUT, **kwargs)
  expected = naive_loss(logits, targets, weights, segment_ids, FULL_LAYOUT, **kwargs)
  assert_aux_close(aux, expected)


@pytest.mark.parametrize("alpha,epsilon,temperature",
                         [(0.008, 0.1, 1.0), (1.0, 0.3, 2.0)])
def test_reference_matches_released_code(alpha, epsilon, temperature):
  rng = np.random.default_rng(11)
  targets, weights, _ = make_batch(rng, LAYOUT, batch=4, drop_prob=0.0)
  weights[:, -1] = 0.0  # trailing ignore positions
  logits = make_logits(rng, LAYOUT, batch=4)
  released_logits, labels, released_g = to_released_layout(
      rng, logits, targets, weights, LAYOUT)
  expected = released_sld_loss(released_logits, labels, released_g, alpha,
                               epsilon, temperature)
  loss, aux = run_loss(logits, targets, weights, None, LAYOUT, method="sld",
                       alpha=alpha, epsilon=epsilon, temperature=temperature,
                       kl_target="reference")
  assert_aux_close(aux, expected, rtol=1e-5, atol=0)
  np.testing.assert_allclose(float(loss), expected["loss"], rtol=1e-5)
  # The default normalisation is the released one.
  default_loss, _ = run_loss(logits, targets, weights, None, LAYOUT, method="sld",
                             alpha=alpha, epsilon=epsilon, temperature=temperature,
                             kl_target="reference", kl_normalization="sequence")
  assert float(default_loss) == float(loss)


@pytest.mark.parametrize("kl_normalization", ["sequence", "token"])
def test_both_normalisations_against_the_released_kl_sum(kl_normalization):
  """The released KL is a sum over positions / batch; "token" divides it by positions.

  Released rows hold one utterance each (unpacked), so its batchmean divisor
  is the number of rows = our num_sequences.
  """
  rng = np.random.default_rng(31)
  targets, weights, _ = make_batch(rng, LAYOUT, batch=5, drop_prob=0.0)
  logits = make_logits(rng, LAYOUT, batch=5)
  released_logits, labels, released_g = to_released_layout(
      rng, logits, targets, weights, LAYOUT)
  released = released_sld_loss(released_logits, labels, released_g, 0.3, 0.1, 1.5)
  kl_sum = released["kl_speech"] * labels.shape[0]   # undo "batchmean"
  positions = int(np.sum(labels != -100))
  expected = kl_sum / (labels.shape[0] if kl_normalization == "sequence" else positions)
  loss, aux = run_loss(logits, targets, weights, None, LAYOUT, method="sld", alpha=0.3,
                       epsilon=0.1, temperature=1.5, kl_target="reference",
                       kl_normalization=kl_normalization)
  assert int(aux["num_kl_positions"]) == positions
  assert int(aux["num_sequences"]) == labels.shape[0]
  np.testing.assert_allclose(float(aux["kl_speech"]), expected, rtol=1e-5)
  np.testing.assert_allclose(
      float(loss), released["ce_text"] + released["ce_speech"] + 0.3 * expected, rtol=1e-5)


@pytest.mark.parametrize("kl_target", ["paper", "reference"])
def test_sequence_normalisation_scales_token_by_positions_per_sequence(kl_target):
  """The docstring table: "sequence" = "token" x (KL positions / sequences)."""
  rng = np.random.default_rng(37)
  targets, weights, segment_ids = make_batch(rng, LAYOUT, packed=True, drop_prob=0.0)
  logits = make_logits(rng, LAYOUT)
  kwargs = dict(method="sld", kl_target=kl_target)
  _, per_sequence = run_loss(logits, targets, weights, segment_ids, LAYOUT,
                             kl_normalization="sequence", **kwargs)
  _, per_token = run_loss(logits, targets, weights, segment_ids, LAYOUT,
                          kl_normalization="token", **kwargs)
  ratio = float(per_token["num_kl_positions"]) / float(per_token["num_sequences"])
  assert ratio > 2  # the two differ by a real factor
  np.testing.assert_allclose(float(per_sequence["kl_speech"]),
                             ratio * float(per_token["kl_speech"]), rtol=1e-5)


def test_reference_target_values_in_the_paper_setting():
  k, epsilon = 6000, 0.1
  p_true, p_other = losses.reference_target_probs(k, epsilon, 1.0)
  assert abs(p_true - 4.10e-4) < 5e-7 and abs(p_other - 1.67e-4) < 5e-7
  q = np.full(k, epsilon / k)
  q[123] += 1 - epsilon
  materialised = np_softmax(q)
  np.testing.assert_allclose(materialised[123], p_true, rtol=1e-12)
  np.testing.assert_allclose(np.delete(materialised, 123), p_other, rtol=1e-12)
  entropy = -np.sum(materialised * np.log(materialised))
  assert abs(entropy - 8.69939) < 1e-5 and abs(math.log(k) - 8.69951) < 1e-5


def test_paper_scale_vocabulary_matches_naive():
  """K=6000: the near-uniform reference target stays accurate in float32."""
  layout = VocabLayout(text_size=10, speech_size=6000)
  rng = np.random.default_rng(3)
  targets, weights, _ = make_batch(rng, layout, batch=2, length=12)
  logits = make_logits(rng, layout, batch=2, length=12, scale=1.0)
  for kl_target, kl_normalization in (("paper", "token"), ("reference", "sequence")):
    kwargs = dict(method="sld", alpha=0.008, epsilon=0.1, temperature=1.0,
                  kl_target=kl_target, kl_normalization=kl_normalization)
    _, aux = run_loss(logits, targets, weights, None, layout, **kwargs)
    expected = naive_loss(logits, targets, weights, None, layout, **kwargs)
    assert_aux_close(aux, {"kl_speech": expected["kl_speech"]}, rtol=2e-5)


def test_docstring_example_masks_and_counts():
  layout = VocabLayout(text_size=5, speech_size=3)
  logits = np.zeros((2, 10, layout.size), np.float32)
  targets = np.array([[6, 8, 7, 5, 3, 4, 1, 0, 0, 0],
                      [6, 7, 5, 3, 1, 8, 5, 4, 1, 0]], np.int32)
  weights = (targets > 0).astype(np.float32)
  segment_ids = np.array([[1] * 7 + [0] * 3, [1] * 5 + [2] * 4 + [0]], np.int32)
  _, aux = run_loss(logits, targets, weights, segment_ids, layout,
                    kl_target="reference")
  assert int(aux["num_text_tokens"]) == 3 + 4
  assert int(aux["num_speech_tokens"]) == 4 + 5
  assert int(aux["num_unit_tokens"]) == 3 + 3
  assert int(aux["num_sequences"]) == 1 + 2
  assert int(aux["num_kl_positions"]) == 7 + 9   # reference: every real target
  # Uniform logits: every CE is log(real_size) (rounding ids excluded).
  np.testing.assert_allclose(float(aux["ce_text"]), math.log(layout.real_size),
                             rtol=1e-6)


# ----------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------

GRAD_CASES = [("loss_masking", "paper"), ("multimodal_ce", "paper"),
              ("sld", "paper"), ("sld", "reference")]


@pytest.mark.parametrize("method,kl_target,kl_normalization",
                         [case + ("sequence",) for case in GRAD_CASES]
                         + [("sld", "paper", "token"), ("sld", "reference", "token")])
def test_gradients_match_finite_differences_and_one_hot_peer(method, kl_target,
                                                             kl_normalization):
  layout = VocabLayout(text_size=4, speech_size=5)
  rng = np.random.default_rng(5)
  targets, weights, segment_ids = make_batch(rng, layout, batch=2, length=24,
                                             packed=True)
  kwargs = dict(method=method, alpha=0.9, epsilon=0.2, temperature=1.7,
                kl_target=kl_target, kl_normalization=kl_normalization)
  num_sequences = naive_num_sequences(weights, segment_ids)
  with jax.enable_x64(True):
    logits = jnp.asarray(rng.normal(size=(2, 24, layout.size)), jnp.float64)
    args = (jnp.asarray(targets), jnp.asarray(weights, jnp.float64))
    loss_fn = lambda x: losses.compute_loss(
        x, *args, jnp.asarray(segment_ids), layout=layout, **kwargs)[0]
    peer_fn = lambda x: naive_jnp_loss(x, *args, num_sequences, layout, **kwargs)
    value, grad = jax.value_and_grad(loss_fn)(logits)
    peer_value, peer_grad = jax.value_and_grad(peer_fn)(logits)
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, peer_value, rtol=1e-12)
    np.testing.assert_allclose(grad, peer_grad, rtol=1e-9, atol=1e-12)

    rows, cols = np.nonzero(weights > 0)
    picks = rng.choice(len(rows), 10, replace=False)
    h = 1e-6
    for pick in picks:
      index = (rows[pick], cols[pick], int(rng.integers(0, layout.real_size)))
      plus = loss_fn(logits.at[index].add(h))
      minus = loss_fn(logits.at[index].add(-h))
      np.testing.assert_allclose((plus - minus) / (2 * h), grad[index],
                                 rtol=1e-6, atol=1e-9, err_msg=str(index))
  assert np.all(np.asarray(grad)[..., layout.real_size:] == 0)


def _intermediates(jaxpr):
  for eqn in jaxpr.eqns:
    yield from ((eqn.primitive.name, v.aval) for v in eqn.outvars)
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _intermediates(inner)


@pytest.mark.parametrize("kl_target,temperature", [("paper", 1.0), ("reference", 2.0)])
def test_no_one_hot_or_target_tensor_is_built(kl_target, temperature):
  """Forward pass: the only [B, L, K|V] arrays are logits-derived floats, and
  the column positions and ones that ``one_pass_softmax_statistics``'
  reduction reads beside them (an ``iota`` and a broadcast constant, which
  XLA builds inside the reduction's kernel): no comparison with the targets."""
  layout = VocabLayout(text_size=100, speech_size=300)
  loss_fn = lambda x, t, w: losses.compute_loss(
      x, t, w, None, layout=layout, kl_target=kl_target, temperature=temperature)[0]
  jaxpr = jax.make_jaxpr(loss_fn)(jnp.zeros((2, 16, layout.size)),
                                  jnp.ones((2, 16), jnp.int32), jnp.ones((2, 16)))
  wide = [(name, aval) for name, aval in _intermediates(jaxpr.jaxpr)
          if len(aval.shape) == 3 and aval.shape[-1] > 1]
  assert wide, "expected the softmax over the vocabulary"
  assert all(jnp.issubdtype(aval.dtype, jnp.floating) or name == "iota"
             for name, aval in wide), wide
  assert all(name in ("slice", "sub", "exp", "div", "convert_element_type", "iota",
                      "broadcast_in_dim") for name, _ in wide), wide


# ----------------------------------------------------------------------------
# Invariances.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method,kl_target", GRAD_CASES)
def test_rounding_ids_and_padding_do_not_matter(method, kl_target):
  rng = np.random.default_rng(9)
  targets, weights, segment_ids = make_batch(rng, LAYOUT, packed=True)
  logits = make_logits(rng, LAYOUT)
  kwargs = dict(method=method, kl_target=kl_target, alpha=0.5)
  _, aux = run_loss(logits, targets, weights, segment_ids, LAYOUT, **kwargs)

  changed = logits.copy()
  changed[..., LAYOUT.real_size:] = rng.normal(size=changed[..., LAYOUT.real_size:].shape) * 1e4
  padding = weights == 0
  changed[padding] = rng.normal(size=changed[padding].shape) * 10
  changed_targets = np.where(padding, rng.integers(0, LAYOUT.real_size, targets.shape),
                             targets).astype(np.int32)
  _, changed_aux = run_loss(changed, changed_targets, weights, segment_ids, LAYOUT,
                            **kwargs)
  for key in aux:
    np.testing.assert_allclose(changed_aux[key], aux[key], rtol=1e-6, err_msg=key)


def test_loss_masking_ignores_speech_positions():
  rng = np.random.default_rng(13)
  targets, weights, segment_ids = make_batch(rng, LAYOUT, packed=True)
  logits = jnp.asarray(make_logits(rng, LAYOUT))
  grad = jax.grad(lambda x: losses.compute_loss(
      x, jnp.asarray(targets), jnp.asarray(weights), jnp.asarray(segment_ids),
      layout=LAYOUT, method="loss_masking")[0])(logits)
  speech_positions = np.asarray(LAYOUT.is_speech(targets))
  assert speech_positions.sum() > 10
  assert np.all(np.asarray(grad)[speech_positions] == 0)
  text_positions = np.asarray(LAYOUT.is_text(targets)) & (weights > 0)
  assert np.all(np.abs(np.asarray(grad)[text_positions]).sum(-1) > 0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_paper_kl_is_zero_when_student_equals_smoothed_label(temperature):
  layout, epsilon = LAYOUT, 0.1
  rng = np.random.default_rng(17)
  targets, weights, segment_ids = make_batch(rng, layout, packed=True)
  logits = make_logits(rng, layout)
  k, off = layout.speech_size, layout.speech_offset
  for b, i in zip(*np.nonzero(layout.is_unit(targets))):
    q = np.full(k, epsilon / k)
    q[targets[b, i] - off] += 1 - epsilon
    logits[b, i, off:layout.real_size] = temperature * np.log(q) + rng.normal()
  _, aux = run_loss(logits, targets, weights, segment_ids, layout, method="sld",
                    epsilon=epsilon, temperature=temperature, kl_target="paper")
  assert abs(float(aux["kl_speech"])) < 1e-5
  _, random_aux = run_loss(make_logits(rng, layout), targets, weights, segment_ids,
                           layout, method="sld", kl_target="paper")
  assert float(random_aux["kl_speech"]) > 0.1


def test_kl_only_for_sld():
  rng = np.random.default_rng(19)
  targets, weights, _ = make_batch(rng, LAYOUT)
  logits = make_logits(rng, LAYOUT)
  _, mce = run_loss(logits, targets, weights, None, LAYOUT, method="multimodal_ce")
  _, sld = run_loss(logits, targets, weights, None, LAYOUT, method="sld")
  assert float(mce["kl_speech"]) == 0.0 and float(sld["kl_speech"]) > 0
  np.testing.assert_allclose(float(sld["loss"]),
                             float(mce["loss"]) + 0.008 * float(sld["kl_speech"]),
                             rtol=1e-6)


# ----------------------------------------------------------------------------
# jit, dtypes, config.
# ----------------------------------------------------------------------------


def test_jit_matches_eager_and_config_entry_point():
  rng = np.random.default_rng(23)
  targets, weights, segment_ids = make_batch(rng, LAYOUT, packed=True)
  logits = jnp.asarray(make_logits(rng, LAYOUT))
  batch = (logits, jnp.asarray(targets), jnp.asarray(weights), jnp.asarray(segment_ids))
  config = losses.LossConfig(method="sld", alpha=0.2, epsilon=0.15,
                             temperature=1.3, kl_target="reference")
  knobs = dict(method="sld", alpha=0.2, epsilon=0.15, temperature=1.3,
               kl_target="reference")
  eager_loss, eager_aux = losses.compute_loss(*batch, layout=LAYOUT, **knobs)
  jitted = jax.jit(losses.compute_loss, static_argnames=STATIC)
  jit_loss, jit_aux = jitted(*batch, layout=LAYOUT, **knobs)
  cfg_loss, _ = jax.jit(losses.compute_loss_from_config,
                        static_argnames=("layout", "config"))(*batch, LAYOUT, config)
  np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
  np.testing.assert_allclose(cfg_loss, eager_loss, rtol=1e-6)
  for key in eager_aux:
    np.testing.assert_allclose(jit_aux[key], eager_aux[key], rtol=1e-6, err_msg=key)
  grad = jax.jit(jax.grad(lambda x: jitted(x, *batch[1:], layout=LAYOUT, **knobs)[0]))(
      logits)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_bfloat16_logits_use_float32_math():
  rng = np.random.default_rng(29)
  targets, weights, _ = make_batch(rng, LAYOUT)
  logits = jnp.asarray(make_logits(rng, LAYOUT), jnp.bfloat16)
  loss, aux = run_loss(logits, targets, weights, None, LAYOUT, method="sld")
  reference, _ = run_loss(logits.astype(jnp.float32), targets, weights, None, LAYOUT,
                          method="sld")
  assert loss.dtype == jnp.float32 and aux["ce_text"].dtype == jnp.float32
  np.testing.assert_allclose(loss, reference, rtol=1e-6)


def test_loss_config_defaults_and_gin():
  config = losses.LossConfig()
  assert (config.method, config.alpha, config.epsilon, config.temperature,
          config.kl_target, config.kl_normalization) == ("sld", 0.008, 0.1, 1.0, "paper",
                                                         "sequence")
  hash(config)  # usable as a static jit argument
  try:
    gin.parse_config(["LossConfig.alpha = 0.5", "LossConfig.kl_target = 'reference'",
                      "LossConfig.kl_normalization = 'token'"])
    configured = losses.LossConfig()
  finally:
    gin.clear_config()
  assert configured.alpha == 0.5 and configured.kl_target == "reference"
  assert configured.kl_normalization == "token"
  assert isinstance(configured, losses.LossConfig)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def _small_batch():
  targets = np.array([[7, 8, 6, 1]], np.int32)
  return (jnp.zeros((1, 4, LAYOUT.size)), jnp.asarray(targets), jnp.ones((1, 4)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="ctc"), r"unknown method 'ctc'.*loss_masking.*multimodal_ce.*sld"),
    (dict(kl_target="released"), r"unknown kl_target 'released'.*paper.*reference"),
    (dict(kl_normalization="batch"), r"unknown kl_normalization 'batch'.*sequence.*token"),
    (dict(alpha=-0.1), r"alpha must be >= 0"),
    (dict(epsilon=1.5), r"epsilon must be in \[0, 1\]"),
    (dict(temperature=0.0), r"temperature must be > 0"),
])
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    losses.compute_loss(*_small_batch(), None, layout=LAYOUT, **kwargs)
  with pytest.raises(ValueError, match=match):
    losses.LossConfig(**kwargs)


def test_shape_mismatches_name_the_argument():
  logits, targets, weights = _small_batch()
  with pytest.raises(ValueError, match=r"logits must have rank 3.*\(1, 4\)"):
    losses.compute_loss(logits[..., 0], targets, weights, None, layout=LAYOUT)
  with pytest.raises(ValueError, match=r"targets has shape \(1, 3\)"):
    losses.compute_loss(logits, targets[:, :3], weights, None, layout=LAYOUT)
  with pytest.raises(ValueError, match=r"weights has shape \(4,\)"):
    losses.compute_loss(logits, targets, weights[0], None, layout=LAYOUT)
  with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 4\)"):
    losses.compute_loss(logits, targets, weights, jnp.ones((2, 4), jnp.int32),
                        layout=LAYOUT)
  with pytest.raises(ValueError, match=r"logits has 19 classes.*layout.size = 128"):
    losses.compute_loss(logits[..., :19], targets, weights, None, layout=LAYOUT)
  with pytest.raises(ValueError, match=r"config must be a LossConfig"):
    losses.compute_loss_from_config(logits, targets, weights, None, LAYOUT, {})


@pytest.mark.parametrize("statistics", [losses.one_pass_softmax_statistics,
                                        losses.two_pass_softmax_statistics,
                                        losses.softmax_statistics])
@pytest.mark.parametrize("width", [1, 7, 300])
def test_softmax_statistics_equal_numpy(width, statistics):
  """The one-pass reduction (the online softmax, what a GPU runs), XLA's
  reductions (elsewhere) and the dispatching, differentiable function ==
  float64 NumPy's logsumexp, max and first argmax: ties, -inf columns, a row
  of -inf only. Their gradients (next test) == autodiff of
  ``jax.nn.logsumexp`` and ``max`` (without ties, where jax's ``max`` splits
  the gradient among the tied columns and this gives it to the first)."""
  rng = np.random.default_rng(4)
  x = (rng.standard_normal((3, 4, width)) * 6).astype(np.float32)
  x[0, 0] = 2.0                                              # every column tied
  x[0, 1, ::3] = -np.inf                                     # some columns -inf
  x[0, 2, 0] = 40.0
  x[1, 0, width // 2:] = x[1, 0].max() + 1                  # ties at the maximum
  x[2, 3] = -np.inf                                          # nothing to normalise
  lse, maximum, argmax = map(np.asarray, jax.jit(statistics)(jnp.asarray(x)))
  x64 = x.astype(np.float64)
  want_max = x64.max(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    want_lse = want_max + np.log(np.exp(x64 - np.where(np.isinf(want_max), 0,
                                                        want_max)[..., None]).sum(-1))
  want_lse[2, 3] = -np.inf
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
  np.testing.assert_array_equal(maximum, want_max)
  np.testing.assert_array_equal(argmax, x.argmax(axis=-1))


def test_softmax_statistics_gradients_are_the_softmax_and_the_argmax():
  rng = np.random.default_rng(5)
  finite = jnp.asarray(rng.standard_normal((3, 4, 300)) * 6, jnp.float32)   # no ties
  weights = jnp.asarray(rng.standard_normal((2, 3, 4)))
  ours = lambda v: jnp.sum(jnp.stack(losses.softmax_statistics(v)[:2]) * weights)
  autodiff = lambda v: jnp.sum(jnp.stack([jax.nn.logsumexp(v, -1), v.max(-1)]) * weights)
  np.testing.assert_allclose(jax.grad(ours)(finite), jax.grad(autodiff)(finite), rtol=1e-5,
                             atol=1e-6)


def test_correct_is_the_first_argmax_over_the_real_vocabulary_ties_included():
  """``token_terms`` takes the argmax part by part (text, then units); with
  ties inside a part and across the boundary it must still be np.argmax's."""
  layout = LAYOUT
  real, offset = layout.real_size, layout.speech_offset
  rng = np.random.default_rng(3)
  logits = rng.integers(-2, 3, size=(4, 9, real)).astype(np.float32)   # many ties
  logits[0, 0, :] = 1.0                                     # every column tied
  logits[0, 1, offset - 1] = logits[0, 1, offset] = 9.0     # tie across the boundary
  logits[0, 2, offset + 2] = logits[0, 2, offset + 5] = 9.0  # tie inside the units
  argmax = logits.argmax(axis=-1)
  targets = np.where(rng.uniform(size=argmax.shape) < 0.6, argmax,
                     rng.integers(0, real, argmax.shape)).astype(np.int32)
  targets[0, :3] = argmax[0, :3]
  terms = losses.token_terms(jnp.asarray(logits), jnp.asarray(targets), layout)
  np.testing.assert_array_equal(np.asarray(terms["correct"]), argmax == targets)
  assert np.asarray(terms["correct"])[0, :3].all()
  assert (argmax == targets).mean() > 0.5
