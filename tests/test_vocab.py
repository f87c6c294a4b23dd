"""The shared id layout: positions of specials and units, classification, errors."""

import numpy as np
import pytest

from sld_jax.vocab import VocabLayout


def test_worked_example_from_docstring():
  layout = VocabLayout(text_size=5, speech_size=3)
  assert (layout.pad_id, layout.eos_id, layout.speech_end_id, layout.speech_offset) == (0, 1, 5, 6)
  assert layout.real_size == 9 and layout.size == 128
  assert layout.mask_id == 9   # <time_mask>: input-only, outside every softmax
  ids = np.arange(10)
  np.testing.assert_array_equal(layout.is_text(ids), [0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(layout.is_speech(ids), [0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(layout.is_unit(ids), [0, 0, 0, 0, 0, 0, 1, 1, 1, 0])


def test_size_rounds_to_multiple_of_128():
  assert VocabLayout(text_size=1000, speech_size=6000).size == 7040
  assert VocabLayout(text_size=125, speech_size=1).size == 128
  # real_size 128: <time_mask> needs row 128, so the table grows to 256.
  assert VocabLayout(text_size=126, speech_size=1).size == 256
  assert VocabLayout(text_size=127, speech_size=1).size == 256
  assert VocabLayout(text_size=100, speech_size=28).size == 256


def test_mask_id_is_distinct_input_only_and_keeps_every_other_id():
  for layout in (VocabLayout(text_size=14, speech_size=128),      # the digits smoke task
                 VocabLayout(text_size=50259, speech_size=6000),  # GPT-2 BPE + K = 6000
                 VocabLayout(text_size=126, speech_size=1)):
    mask = layout.mask_id
    assert mask not in (layout.pad_id, layout.eos_id, layout.unk_id, layout.speech_end_id)
    assert layout.real_size <= mask < layout.size
    assert not (layout.is_text(mask) or layout.is_speech(mask) or layout.is_unit(mask))
    assert layout.speech_end_id == layout.text_size  # nothing before it moved
  # GPT-2 mode: the table keeps its 56320 rows; <time_mask> takes a rounding row.
  assert VocabLayout(text_size=50259, speech_size=6000).mask_id == 56260
  assert VocabLayout(text_size=50259, speech_size=6000).size == 56320
  with pytest.raises(ValueError, match="outside the vocabulary"):
    VocabLayout(text_size=5, speech_size=3).check_ids([9], "targets")


def test_units_round_trip_and_range_errors():
  layout = VocabLayout(text_size=10, speech_size=4)
  ids = layout.units_to_ids([0, 3, 2])
  np.testing.assert_array_equal(ids, [11, 14, 13])
  np.testing.assert_array_equal(layout.ids_to_units(ids), [0, 3, 2])
  with pytest.raises(ValueError, match="speech unit 4 is outside"):
    layout.units_to_ids([1, 4])
  with pytest.raises(ValueError, match="not a speech unit id"):
    layout.ids_to_units([11, 10])
  with pytest.raises(ValueError, match=r"targets: id 15 at position \(0, 2\) is outside"):
    layout.check_ids(np.array([[0, 1, 15]]), "targets")


def test_check_ids_names_the_first_bad_id_and_its_position():
  layout = VocabLayout(text_size=9, speech_size=9)   # real_size 19
  layout.check_ids(np.array([[0, 1, 18]]))
  layout.check_ids([])
  with pytest.raises(ValueError, match=r"id 19 at position \(0, 2\).*\[0, 19\)"):
    layout.check_ids(np.array([[0, 1, 19]]))
  with pytest.raises(ValueError, match=r"decoder_target_tokens: id -1 at position \(1, 0\)"):
    layout.check_ids(np.array([[3, 4], [-1, 2]]), "decoder_target_tokens")
  with pytest.raises(ValueError, match=r"must be integers"):
    layout.check_ids(np.array([[1.0]]))


def test_invalid_layouts():
  with pytest.raises(ValueError, match="text_size"):
    VocabLayout(text_size=2, speech_size=5)
  with pytest.raises(ValueError, match="speech_size"):
    VocabLayout(text_size=10, speech_size=0)


def test_classification_works_on_jax_arrays():
  import jax.numpy as jnp
  layout = VocabLayout(text_size=5, speech_size=3)
  ids = jnp.array([[0, 1, 5, 8, 9]])
  np.testing.assert_array_equal(np.asarray(layout.is_speech(ids)), [[0, 0, 1, 1, 0]])
