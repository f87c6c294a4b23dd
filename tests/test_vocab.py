"""The shared id layout: positions of specials and units, classification, errors."""

import numpy as np
import pytest

from sld_jax.vocab import VocabLayout


def test_worked_example_from_docstring():
  layout = VocabLayout(text_size=5, speech_size=3)
  assert (layout.pad_id, layout.eos_id, layout.speech_end_id, layout.speech_offset) == (0, 1, 5, 6)
  assert layout.real_size == 9 and layout.size == 128
  ids = np.arange(10)
  np.testing.assert_array_equal(layout.is_text(ids), [0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(layout.is_speech(ids), [0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(layout.is_unit(ids), [0, 0, 0, 0, 0, 0, 1, 1, 1, 0])


def test_size_rounds_to_multiple_of_128():
  assert VocabLayout(text_size=1000, speech_size=6000).size == 7040
  assert VocabLayout(text_size=126, speech_size=1).size == 128
  assert VocabLayout(text_size=127, speech_size=1).size == 256
  assert VocabLayout(text_size=100, speech_size=28).size == 256


def test_units_round_trip_and_range_errors():
  layout = VocabLayout(text_size=10, speech_size=4)
  ids = layout.units_to_ids([0, 3, 2])
  np.testing.assert_array_equal(ids, [11, 14, 13])
  np.testing.assert_array_equal(layout.ids_to_units(ids), [0, 3, 2])
  with pytest.raises(ValueError, match="speech unit 4 is outside"):
    layout.units_to_ids([1, 4])
  with pytest.raises(ValueError, match="not a speech unit id"):
    layout.ids_to_units([11, 10])
  with pytest.raises(ValueError, match="targets: id 15 is outside"):
    layout.check_ids(np.array([[0, 1, 15]]), "targets")


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
