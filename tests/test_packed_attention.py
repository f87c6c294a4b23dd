"""cuDNN's packed layout describes the same attention as the dense packed mask.

The cuDNN kernel needs a Hopper GPU (``benchmarks/accelerator_step.py
--check_attention`` compares it there); what runs on CPU is the part that
can be wrong without one: segment ids -> (offsets, lengths), checked against
a naive loop, and the mask those offsets describe, checked against
``masks.decoder_attention_mask`` at every real query. The host-side offsets
(``host_segment_starts``) are checked the same way, and their path from the
trainer's ``shard_batch`` to the kernel runs on CPU with the kernel replaced
by the attention its offsets describe.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax import input_pipeline
from sld_jax import losses
from sld_jax import optim
from sld_jax import partitioning
from sld_jax import trainer as trainer_lib
from sld_jax.lm import SpeechTextLM
from sld_jax.model import masks
from sld_jax.model import packed_attention
from sld_jax.model.config import DecoderConfig
from sld_jax.model.config import decoder_config
from sld_jax.vocab import VocabLayout

import tiny_train


def _packed_rows(rng, batch, length, max_len=9):
  """seqio-style packed segment ids: 1, 2, ... then trailing 0 padding."""
  rows = np.zeros((batch, length), np.int32)
  for row in range(batch):
    start, segment = 0, 1
    fill = rng.integers(length // 2, length + 1)
    while start < fill:
      size = min(int(rng.integers(1, max_len)), fill - start)
      rows[row, start:start + size] = segment
      start, segment = start + size, segment + 1
  return rows


def _naive_layout(row, max_segments):
  offsets, lengths = [], []
  for position, value in enumerate(row):
    if position == 0 or value != row[position - 1]:
      offsets.append(position)
      lengths.append(0)
    lengths[-1] += 1
  count = len(offsets)
  offsets = (offsets + [-1] * (max_segments + 1))[:max_segments + 1]
  lengths = (lengths + [-1] * max_segments)[:max_segments]
  return offsets, lengths, count


def test_segment_layout_equals_a_naive_walk():
  rng = np.random.default_rng(0)
  segments = _packed_rows(rng, 6, 40)
  segments[0] = 1                                   # one segment, no padding
  max_segments = 12
  offsets, lengths, count = packed_attention.segment_layout(jnp.asarray(segments), max_segments)
  for row in range(len(segments)):
    want_offsets, want_lengths, want_count = _naive_layout(list(segments[row]), max_segments)
    assert int(count[row]) == want_count
    if want_count <= max_segments:
      np.testing.assert_array_equal(offsets[row], want_offsets)
      np.testing.assert_array_equal(lengths[row], want_lengths)
  assert int(count[0]) == 1 and list(np.asarray(lengths[0][:2])) == [40, -1]


def test_segment_layout_of_the_docstring_example():
  offsets, lengths, count = packed_attention.segment_layout(
      jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1] * 7]), 4)
  np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])
  np.testing.assert_array_equal(lengths, [[3, 2, 2, -1], [7, -1, -1, -1]])
  np.testing.assert_array_equal(count, [3, 1])


def test_layout_mask_equals_the_dense_packed_mask_at_real_queries():
  rng = np.random.default_rng(1)
  length = 48
  segments = _packed_rows(rng, 5, length)
  offsets, lengths, count = packed_attention.segment_layout(jnp.asarray(segments), 32)
  assert int(count.max()) <= 32
  described = np.asarray(packed_attention.layout_mask(offsets, lengths, length))
  dense = np.asarray(masks.decoder_attention_mask(length, jnp.asarray(segments)))
  real = segments > 0
  assert real.sum() > 0 and (~real).sum() > 0
  for row in range(len(segments)):
    np.testing.assert_array_equal(described[row, 0][real[row]], dense[row, 0][real[row]])
  # Padding attends to padding only (causally), so its outputs are defined.
  pad_rows = ~real
  for row in range(len(segments)):
    queries = np.flatnonzero(pad_rows[row])
    if len(queries):
      assert not described[row, 0][np.ix_(queries, np.flatnonzero(real[row]))].any()
      assert described[row, 0, queries, queries].all()


def test_rows_with_more_segments_than_the_bound_are_counted():
  segments = jnp.asarray([np.arange(1, 11, dtype=np.int32)])       # 10 one-token segments
  _, _, count = packed_attention.segment_layout(segments, 4)
  assert int(count[0]) == 10                  # > 4: packed_attention takes the dense path


def test_config_names_the_packed_implementation_and_its_bound():
  config = DecoderConfig(vocab_size=64, dropout_rate=0.0, attention_implementation="cudnn_packed")
  assert config.max_segments_per_row == 16
  with pytest.raises(ValueError, match="max_segments_per_row must be >= 1"):
    DecoderConfig(vocab_size=64, max_segments_per_row=0)


def test_slots_round_up_to_powers_of_two_or_to_a_multiple():
  counts = (1, 3, 8, 9, 12, 13, 16, 17, 40)
  assert [packed_attention.slots_for(n) for n in counts] == [8, 8, 8, 16, 16, 16, 16, 32, 64]
  assert [packed_attention.slots_for(n, 4) for n in counts] == [8, 8, 8, 12, 12, 16, 16, 20, 40]
  assert [packed_attention.slots_for(n, 3) for n in counts] == [8, 8, 9, 9, 12, 15, 18, 18, 42]
  with pytest.raises(ValueError, match="segment_slot_multiple must be >= 0"):
    DecoderConfig(vocab_size=64, segment_slot_multiple=-1)


@pytest.mark.parametrize("multiple, want_slots", [(0, 16), (4, 12)])
def test_host_features_declare_the_configured_slots(multiple, want_slots):
  segments = _packed_rows(np.random.default_rng(5), 3, 96, max_len=20)
  count = packed_attention.host_segment_count(segments)
  assert 9 <= count <= 12, count
  decoder = functools.partial(decoder_config, size="tiny", num_layers=1, embed_dim=32,
                              mlp_dim=64, max_length=96, dropout_rate=0.0,
                              attention_implementation="cudnn_packed",
                              segment_slot_multiple=multiple)
  model = SpeechTextLM(VocabLayout(40, 20), decoder=decoder)
  features = model.host_features({"decoder_segment_ids": segments})
  starts = features["decoder_segment_starts"]
  assert starts.shape == (3, want_slots + 1)
  np.testing.assert_array_equal(
      starts, packed_attention.host_segment_starts(segments, want_slots))


def test_host_segment_starts_equal_a_naive_walk():
  rng = np.random.default_rng(2)
  segments = _packed_rows(rng, 6, 64, max_len=5)
  count = packed_attention.host_segment_count(segments)
  starts = packed_attention.host_segment_starts(segments)
  slots = packed_attention.slots_for(count)
  assert count > 8 and starts.shape == (6, slots + 1) and starts.dtype == np.int32
  lengths = np.asarray(packed_attention.lengths_from_starts(jnp.asarray(starts), 64))
  for row in range(len(segments)):
    want_offsets, want_lengths, _ = _naive_layout(list(segments[row]), slots)
    np.testing.assert_array_equal(starts[row], want_offsets)
    np.testing.assert_array_equal(lengths[row], want_lengths)
  np.testing.assert_array_equal(packed_attention.host_segment_starts(segments, 2 * slots)[:, :slots + 1],
                                starts)
  with pytest.raises(ValueError, match=f"a row has {count} segments, more than the 4 slots"):
    packed_attention.host_segment_starts(segments, 4)


def test_host_segment_starts_reach_the_packed_kernel_from_the_trainer(monkeypatch):
  """cudnn_packed on a (2, 2, 2) CPU mesh, the cuDNN call replaced by the
  attention its offsets describe: the trainer's batches carry the host's
  offsets to every layer (no in-graph fallback is traced), and the metrics
  equal the written-out attention's."""
  declared = []

  def described_attention(query, key, value, offsets, lengths, scale):
    declared.append(offsets.shape)
    mask = packed_attention.layout_mask(offsets, lengths, query.shape[1])
    return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale)

  monkeypatch.setattr(packed_attention, "cudnn_packed_attention", described_attention)
  source = input_pipeline.SyntheticSource(text_size=16, speech_size=48, global_batch_size=8,
                                          sequence_length=64, max_units=10)
  mesh = partitioning.make_mesh(2, 2, 2, devices=jax.devices()[:8])

  def trainer(attention):
    decoder = functools.partial(decoder_config, size="tiny", num_layers=2, num_heads=4,
                                embed_dim=32, mlp_dim=64, max_length=64, dropout_rate=0.0,
                                attention_dropout_rate=0.0, attention_implementation=attention)
    model = SpeechTextLM(source.layout, decoder=decoder,
                         loss_config=losses.LossConfig(method="sld"))
    schedule = optim.learning_rate_schedule(total_steps=10, peak_value=1e-3)
    return trainer_lib.Trainer(model, optim.make_optimizer(schedule), schedule, mesh, seed=1,
                               compiler_options=tiny_train.FAST_COMPILE)

  batch = source.global_batch(0)
  packed, einsum = trainer("cudnn_packed"), trainer("einsum")
  sharded = packed.shard_batch(batch)
  slots = packed_attention.slots_for(packed_attention.host_segment_count(
      batch["decoder_segment_ids"]))
  assert sharded["decoder_segment_starts"].shape == (8, slots + 1)
  assert "decoder_segment_starts" not in einsum.shard_batch(batch)
  params = einsum.init_state().params
  with jax.default_matmul_precision("highest"):
    got, want = packed.evaluate(params, [batch]), einsum.evaluate(params, [batch])
  assert declared and set(declared) == {(8, slots + 1)}
  for name in ("loss", "ce_text", "ce_speech", "kl_speech"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
