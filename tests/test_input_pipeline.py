"""Step-indexed batches: ``batches(s)`` starts at step s's batch, and the data
position a checkpoint stores says where the data stands.

A shift that applies to fresh starts and resumes alike (``batches(s)``
yielding step s + 1's batch) leaves stop-and-resume equal to an uninterrupted
run (test_resume.py), so it is checked here against ``global_batch``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sld_jax import input_pipeline


@pytest.fixture
def source():
  return input_pipeline.SyntheticSource(text_size=16, speech_size=32,
                                        global_batch_size=4, sequence_length=32,
                                        seed=5, max_units=8)


def _assert_batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("start", [0, 1, 7])
def test_batches_from_a_step_are_that_steps_global_batches(source, start):
  for offset, batch in enumerate(itertools.islice(source.batches(start), 3)):
    _assert_batches_equal(batch, source.global_batch(start + offset))
  # Steps differ, and a step's batch is a pure function of (seed, step).
  assert not np.array_equal(source.global_batch(start)["decoder_target_tokens"],
                            source.global_batch(start + 1)["decoder_target_tokens"])
  _assert_batches_equal(source.global_batch(start), source.global_batch(start))


def test_process_shards_tile_the_global_batch(source):
  halves = [next(source.batches(3, index, 2)) for index in range(2)]
  joined = {name: np.concatenate([h[name] for h in halves]) for name in halves[0]}
  _assert_batches_equal(joined, source.global_batch(3))


def test_data_position_counts_steps_and_examples(source):
  position = source.position(12)
  assert position == {"step": 12, "examples": 12 * 4, "source": source.description()}
  source.check_resume(position, 12)
  with pytest.raises(ValueError, match="says step 12 but the state is at step 13"):
    source.check_resume(position, 13)
