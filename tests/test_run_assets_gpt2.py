"""Run assets of the GPT-2 text task on imported units: BPE files copied, text
decoded from the run directory alone, no audio front end (units came from elsewhere)."""

from __future__ import annotations

import gin
import pytest
import seqio

from sld_jax import input_pipeline
from sld_jax import run_assets
from sld_jax.speech import front_end
import tasks
from tasks import registry
import test_gpt2_task as gpt2_task


@pytest.fixture
def bound(tmp_path, monkeypatch):
  monkeypatch.delenv(registry.GPT2_DIR_ENV, raising=False)
  gin.clear_config()
  tasks.register_librispeech_tasks()
  tokenizer_dir = str(tmp_path / "gpt2")
  gpt2_task._train_tokenizer(tokenizer_dir)   # pylint: disable=protected-access
  gpt2_task._bind(gpt2_task._prepare_units(tmp_path), tokenizer_dir)  # pylint: disable=protected-access
  yield
  gin.clear_config()
  tasks.register_librispeech_tasks()


def test_gpt2_task_run_decodes_text_from_its_own_directory(bound, tmp_path):
  del bound
  model_dir = str(tmp_path / "run")
  run_assets.record(model_dir, input_pipeline.SeqioSource(gpt2_task.TASK))
  assets = run_assets.load(model_dir)
  assets.check_files()
  vocabulary = seqio.get_mixture_or_task(gpt2_task.TASK).output_features["targets"].vocabulary
  assert assets.layout == vocabulary.layout
  assert assets.text == {"kind": "gpt2", "dir": "gpt2"}
  assert "gpt2/tokenizer.json" in assets.manifest["sha256"]
  assert assets.speech["extractor"] == "units" and assets.speech["codebook"] is None
  ids = vocabulary.encode("the quick brown fox") + [1, 0]
  assert front_end.TextDecoder(assets)(ids) == vocabulary.decode(ids) == "the quick brown fox"
  with pytest.raises(run_assets.MissingAssetsError, match="no audio front end"):
    front_end.FrontEnd(assets)
