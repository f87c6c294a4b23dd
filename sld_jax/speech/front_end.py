"""Audio -> speech ids and text ids -> text, from a run's recorded assets.

``FrontEnd`` rebuilds the discretisation a run was trained on from
``MODEL_DIR/assets/`` (``sld_jax.run_assets``): the feature extractor with
its recorded name and settings, the k-means codebook, unit merging and the
unit-piece model, the same steps ``sld_jax.speech.prepare`` ran on the
training data::

  a.wav (any rate, stereo)  -> mono float32 at 16 kHz      (audio.load_audio)
                            -> features [T, D]             (extractor)
                            -> units [T] in [0, K)         (codebook.assign)
                            -> merged / unit pieces        (as recorded)
                            -> vocabulary ids              (layout.units_to_ids)

``TextDecoder`` turns text ids back into a string with the recorded text
model (SentencePiece, or GPT-2 BPE files).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from sld_jax import run_assets
from sld_jax.speech import audio as audio_lib
from sld_jax.speech import features as features_lib
from sld_jax.speech import kmeans
from sld_jax.speech import units as units_lib
from sld_jax.vocab import VocabLayout


class FrontEnd:
  """A run's audio front end (``FrontEnd(run_assets.load(model_dir))``).

  Raises:
    run_assets.MissingAssetsError: the run has no audio front end (trained on
      synthetic ids or imported units) or a file is missing.
    run_assets.AssetsMismatchError: a recorded file changed, or the extractor
      built here differs from the recorded one (name, dimension, rate).
  """

  def __init__(self, assets: run_assets.RunAssets):
    speech = assets.speech
    where = assets.path(run_assets.MANIFEST)
    if not speech or not speech.get("codebook"):
      kind = (speech or {}).get("extractor", assets.manifest.get("source", {}).get("kind"))
      raise run_assets.MissingAssetsError(
          f"{where}: this run has no audio front end (trained on {kind!r} data without a "
          "codebook); only runs trained on audio discretised by sld_jax.speech.prepare can "
          "transcribe audio")
    assets.check_files()
    self.layout: VocabLayout = assets.layout
    self.sample_rate = int(speech["sample_rate"])
    self.extractor = features_lib.get_extractor(speech["extractor"],
                                                **speech.get("extractor_kwargs", {}))
    self.codebook = kmeans.Codebook.load(assets.path(speech["codebook"]))
    built = {"dim": self.extractor.dim, "frame_rate_hz": self.extractor.frame_rate_hz,
             "codebook_dim": self.codebook.dim}
    recorded = {"dim": speech.get("feature_dim", self.extractor.dim),
                "frame_rate_hz": speech.get("frame_rate_hz", self.extractor.frame_rate_hz),
                "codebook_dim": speech.get("feature_dim", self.extractor.dim)}
    if built != recorded:
      raise run_assets.AssetsMismatchError(
          f"{where}: the {speech['extractor']!r} extractor built here gives {built}, the run "
          f"recorded {recorded}: the features would not be those its codebook was fit on")
    self.merge_repeats = bool(speech["merge_repeats"])
    self.pieces = None
    if speech.get("unit_pieces"):
      self.pieces = units_lib.UnitPieceModel(assets.path(speech["unit_pieces"]),
                                             self.codebook.num_clusters)

  @property
  def frame_rate_hz(self) -> float:
    return float(self.extractor.frame_rate_hz)

  def load(self, path: str) -> np.ndarray:
    """Mono float32 at the run's sample rate (``audio.AudioError`` names a bad file)."""
    return audio_lib.load_audio(path, target_sample_rate=self.sample_rate)

  def speech_ids(self, waveform: np.ndarray) -> np.ndarray:
    """[N] vocabulary ids of the speech tokens of one waveform."""
    units = self.codebook.assign(self.extractor(waveform))
    if self.merge_repeats:
      units = units_lib.merge_repeats(units)
    if self.pieces is not None:
      units = self.pieces.encode(units)
    return self.layout.units_to_ids(units)


class TextDecoder:
  """Text ids -> string with the run's recorded text model."""

  def __init__(self, assets: run_assets.RunAssets):
    text = assets.text
    if not text:
      raise run_assets.MissingAssetsError(
          f"{assets.path(run_assets.MANIFEST)}: no text model recorded; hypotheses cannot be "
          "turned into text")
    layout = assets.layout
    if text["kind"] == "sentencepiece":
      from sld_jax import seqio_vocab  # pylint: disable=g-import-not-at-top
      processor = seqio_vocab.check_text_model(assets.path(text["file"]))
      self._decode = lambda ids: processor.DecodeIds(
          [i for i in ids if 2 <= i < layout.text_size])
    elif text["kind"] == "gpt2":
      from sld_jax import gpt2_vocab  # pylint: disable=g-import-not-at-top
      vocabulary = gpt2_vocab.Gpt2SpeechTextVocabulary(
          os.path.join(assets.directory, text["dir"]), layout.speech_size)
      self._decode = vocabulary.decode
    else:
      raise run_assets.MissingAssetsError(f"{assets.path(run_assets.MANIFEST)}: unknown text "
                                          f"model kind {text['kind']!r}")

  def __call__(self, ids: Sequence[int]) -> str:
    return self._decode([int(i) for i in ids])
