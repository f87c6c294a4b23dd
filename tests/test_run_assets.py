"""Run assets without training: synthetic runs, comparisons, tampered files."""

from __future__ import annotations

import json
import os

import pytest

from sld_jax import file_hashes
from sld_jax import input_pipeline
from sld_jax import run_assets
from sld_jax.model.config import decoder_config
from sld_jax.speech import front_end


def _write(directory, manifest, files=None):
  os.makedirs(directory, exist_ok=True)
  for name, content in (files or {}).items():
    with open(os.path.join(directory, name), "wb") as f:
      f.write(content)
  manifest = {**manifest, "sha256": {name: file_hashes.sha256(os.path.join(directory, name))
                                     for name in (files or {})}}
  with open(os.path.join(directory, run_assets.MANIFEST), "w") as f:
    json.dump(manifest, f)


def test_synthetic_run_records_its_layout_and_has_no_audio_front_end(tmp_path):
  source = input_pipeline.SyntheticSource(text_size=16, speech_size=48)
  config = decoder_config(vocab_size=source.layout.size, size="tiny")
  recorded = run_assets.record(str(tmp_path), source, config)
  loaded = run_assets.load(str(tmp_path))
  assert loaded.layout == source.layout == recorded.layout
  assert loaded.manifest["model"]["vocab_size"] == 128
  assert loaded.speech is None and loaded.text is None
  with pytest.raises(run_assets.MissingAssetsError, match="no audio front end"):
    front_end.FrontEnd(loaded)
  # Resuming on the same source passes; on another layout it is refused.
  run_assets.record(str(tmp_path), source, config)
  with pytest.raises(run_assets.AssetsMismatchError,
                     match=r"layout.speech_size: 48 \(recorded\) != 64"):
    run_assets.record(str(tmp_path), input_pipeline.SyntheticSource(16, 64), config)


def test_missing_assets_name_the_directory(tmp_path):
  with pytest.raises(run_assets.MissingAssetsError,
                     match=f"{tmp_path}/assets/assets.json not found"):
    run_assets.load(str(tmp_path))
  assert run_assets.load_if_present(str(tmp_path)) is None


def test_changed_or_missing_files_are_refused(tmp_path):
  directory = os.path.join(tmp_path, run_assets.ASSETS_SUBDIR)
  manifest = {"format_version": 1, "layout": {"text_size": 5, "speech_size": 3}}
  _write(directory, manifest, {"codebook.npz": b"centers", "text.model": b"pieces"})
  assets = run_assets.load(str(tmp_path))
  assets.check_files()
  with open(os.path.join(directory, "codebook.npz"), "wb") as f:
    f.write(b"other centers")
  with pytest.raises(run_assets.AssetsMismatchError,
                     match="codebook.npz has changed since it was recorded"):
    assets.check_files()
  with open(os.path.join(directory, "codebook.npz"), "wb") as f:
    f.write(b"centers")
  os.remove(os.path.join(directory, "text.model"))
  with pytest.raises(run_assets.MissingAssetsError, match="text.model is missing"):
    assets.check_files()


def test_differences_list_each_field(tmp_path):
  base = {"format_version": 1, "layout": {"text_size": 5, "speech_size": 3},
          "speech": {"extractor": "whisper", "merge_repeats": True}, "sha256": {"a": "0" * 64}}
  other = json.loads(json.dumps(base))
  other["speech"]["merge_repeats"] = False
  other["sha256"]["a"] = "1" * 64
  other["source"] = {"task": "elsewhere"}   # where the data came from does not matter
  differences = run_assets.describe_differences(run_assets.RunAssets("r", base),
                                                run_assets.RunAssets("o", other))
  assert differences == ["sha256.a: 000000000000... (recorded) != 111111111111...",
                         "speech.merge_repeats: true (recorded) != false"]
