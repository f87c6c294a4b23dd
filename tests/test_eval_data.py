"""Eval splits are scored in full: over-long utterances keep their transcript
and the first ``L - 2 - len(text)`` units, with counts (sld_jax.eval_data)."""

import numpy as np

from sld_jax import eval_data
from sld_jax import model_inputs

TASK = "sld_embedded_digits_whisper_smoke"


def test_every_dev_utterance_is_kept_and_truncations_are_counted():
  import tasks  # pylint: disable=g-import-not-at-top
  layout = tasks.get_layout(TASK)
  full = eval_data.task_eval_batches(TASK, "dev", sequence_length=128, batch_size=8)
  short = eval_data.task_eval_batches(TASK, "dev", sequence_length=32, batch_size=8)
  rows = lambda batches: sum(int(eval_data.real_rows(b).sum()) for b in batches)
  assert rows(full) == rows(short) == 30            # nothing dropped
  assert eval_data.truncation_counts(full).tolist() == [0, 0]
  truncated, units = eval_data.truncation_counts(short).tolist()
  assert 0 < truncated <= 30 and units >= truncated
  by_id = {}
  for batch in full:
    for row in np.flatnonzero(eval_data.real_rows(batch)):
      by_id[batch["id"][row]] = batch["decoder_target_tokens"][row]
  seen = 0
  for index, batch in enumerate(short):
    lengths = eval_data.prompt_lengths(batch, layout, f"batch {index}")
    eval_data.make_prompts(batch, lengths, 32, layout)   # fits, consistent with the inputs
    for row in np.flatnonzero(eval_data.real_rows(batch)):
      whole = by_id[batch["id"][row]]
      whole = whole[whole > 0]
      cut = batch["decoder_target_tokens"][row]
      cut = cut[cut > 0]
      dropped = int(batch["truncated_units"][row])
      units = int(model_inputs.speech_lengths(whole, layout)) - 1
      text = len(whole) - units - 1                   # transcript + <text_end>
      assert len(cut) <= 32
      assert dropped == max(0, units - (32 - 1 - text))   # keeps L - 2 - len(text) units
      np.testing.assert_array_equal(cut, np.concatenate([whole[:units - dropped],
                                                         whole[units:]]))
      assert int(batch["speech_length"][row]) == units - dropped + 1
      seen += 1
  assert seen == 30
