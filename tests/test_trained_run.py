"""Reading a trained run (sld_jax.trained_run): checkpoint paths that hold no
checkpoint are refused, naming what was expected. (Restoring parameters and
the layout check: tests/test_eval.py, test_transcribe.py.)"""

import pytest

from sld_jax import trained_run


def test_missing_or_empty_checkpoint_dirs_raise(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*expected a MODEL_DIR"):
    trained_run.locate_checkpoints(str(tmp_path / "nope"))
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no checkpoints in .*empty/checkpoints"):
    trained_run.locate_checkpoints(str(tmp_path / "empty"))
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"no checkpoints in .*junk \(found \['notes.txt'\]"):
    trained_run.locate_checkpoints(str(tmp_path / "junk"))
