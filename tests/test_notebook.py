"""notebooks/quickstart.ipynb runs top to bottom: install check, data, train, plot, score,
transcribe a file.

The notebook is executed with nbclient in a ``python3`` kernel started in
``notebooks/`` (as Jupyter starts it), with the smoke experiment shortened:
``SLD_NOTEBOOK_STEPS`` and ``SLD_NOTEBOOK_WORK_DIR`` (read by its parameters
cell) and a cell injected after the cell tagged ``parameters`` (as papermill
does). The corpus comes from the tests' ``SLD_DATA_DIR`` (tests/conftest.py),
built there on first use; the kernel inherits the tests' XLA flags.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import nbformat
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOK = os.path.join(NOTEBOOK_DIR, "quickstart.ipynb")
TASK = "sld_embedded_digits_whisper_smoke"
STEPS = 4
SHOWN = 4
INJECTED = f"""
TRAIN_BINDINGS = TRAIN_BINDINGS + ["trainer.train.log_every = 2", "EVAL_EVERY = 0",
                                   "EVAL_BATCHES = 1", "trainer.train.tensorboard = False"]
EVAL_SPLITS = ["dev"]
EVAL_MAX_BATCHES = 1
SHOW_UTTERANCES = {SHOWN}
"""


def _read() -> nbformat.NotebookNode:
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  return notebook


def _parameters_index(notebook: nbformat.NotebookNode) -> int:
  tagged = [i for i, cell in enumerate(notebook.cells)
            if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"want one cell tagged 'parameters', found cells {tagged}"
  return tagged[0]


def test_committed_notebook_is_stripped_and_colab_ready():
  notebook = _read()
  assert notebook.nbformat == 4
  assert notebook.metadata.kernelspec.name == "python3"
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
  install = code[0].source
  for needed in ('REPO_URL = "https://', "git", "clone", "apt-get", "requirements.txt",
                 '"-e", "."', "google.colab"):
    assert needed in install, needed
  parameters = notebook.cells[_parameters_index(notebook)].source
  for name in ("TRAIN_STEPS", "MODEL_DIR", "EXPERIMENT", "SLD_NOTEBOOK_STEPS", "SLD_DATA_DIR"):
    assert name in parameters, name
  assert code.index(notebook.cells[_parameters_index(notebook)]) == 1


def _kernel_name() -> str:
  from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top
  if "python3" not in KernelSpecManager().find_kernel_specs():
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], check=True,
                   capture_output=True)
  return "python3"


def _texts(cell: nbformat.NotebookNode) -> str:
  parts = []
  for output in cell.get("outputs", []):
    if output.output_type == "stream":
      parts.append(output.text)
    elif "data" in output and "text/plain" in output.data:
      parts.append(output.data["text/plain"])
  return "".join(parts)


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  notebook = _read()
  notebook.cells.insert(_parameters_index(notebook) + 1, nbformat.v4.new_code_cell(
      INJECTED.strip(), metadata={"tags": ["injected-parameters"]}))
  work_dir = str(tmp_path / "work")
  monkeypatch.setenv("SLD_NOTEBOOK_STEPS", str(STEPS))
  monkeypatch.setenv("SLD_NOTEBOOK_WORK_DIR", work_dir)
  client = NotebookClient(notebook, kernel_name=_kernel_name(), timeout=900,
                          resources={"metadata": {"path": NOTEBOOK_DIR}})
  client.execute()   # raises CellExecutionError, naming the cell, if one fails

  errors = [o for cell in notebook.cells for o in cell.get("outputs", [])
            if o.output_type == "error"]
  assert not errors, errors
  text = "\n".join(_texts(cell) for cell in notebook.cells)
  assert "nothing to install" in text     # offline: the checkout's packages are importable
  assert re.search(r"^u\d+ u\d+ .* <speech_end> .* <text_end>$", text, re.MULTILINE), text

  # Training: the injected bindings took effect and the loss is a real number.
  model_dir = os.path.join(work_dir, "smoke")
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert [r["step"] for r in logged] == [2, 4]
  assert np.all(np.isfinite([r["loss"] for r in logged]))
  assert not os.path.exists(os.path.join(model_dir, "tensorboard"))

  # The curves: one PNG.
  images = [o for cell in notebook.cells for o in cell.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) == 1

  # Scoring: the WER line and the listing match what the eval wrote.
  directory = os.path.join(model_dir, "eval", f"step_{STEPS}", TASK, "dev")
  with open(os.path.join(directory, "metrics.json")) as f:
    metrics = json.load(f)
  with open(os.path.join(directory, "predictions.jsonl")) as f:
    predictions = [json.loads(line) for line in f]
  assert metrics["num_utterances"] == len(predictions) == 8   # one batch of BATCH_SIZE
  assert not os.path.exists(os.path.join(model_dir, "eval", f"step_{STEPS}", TASK, "test"))
  wer_line = re.search(r"^dev \(step (\d+)\): WER ([\d.]+)%  CER ([\d.]+)%  over (\d+) utt",
                       text, re.MULTILINE)
  assert wer_line, text[-3000:]
  assert int(wer_line.group(1)) == STEPS and int(wer_line.group(4)) == 8
  assert float(wer_line.group(2)) == pytest.approx(metrics["wer"], abs=0.005)
  assert float(wer_line.group(3)) == pytest.approx(metrics["cer"], abs=0.005)
  listing = text[wer_line.end():].splitlines()[1:]
  assert re.match(r"\s+id\s+reference\s+hypothesis\s+errors$", listing[0]), listing[:2]
  for line, p in zip(listing[1:SHOWN + 1], predictions):
    assert line.split()[0] == p["id"], (line, p)
    assert p["reference"] in line and line.endswith(str(p["word_errors"])), (line, p)
  assert predictions[SHOWN]["id"] not in text

  # Transcription of a file (an unseen voice, written at 22.05 kHz stereo): the run
  # directory alone gives the same hypothesis as the printed one.
  heard = re.search(r"^digits_22k_stereo.wav: '(.*)' \(([\d.]+) s, (\d+) speech tokens\)$", text,
                    re.MULTILINE)
  assert heard, text[-2000:]
  assert float(heard.group(2)) > 0.5 and int(heard.group(3)) > 5
  from sld_jax import transcribe as transcribe_lib  # pylint: disable=g-import-not-at-top
  score = transcribe_lib.transcribe(
      model_dir, transcribe_lib.collect_inputs([os.path.join(work_dir, "digits_22k_stereo.wav")]),
      progress=False)
  assert score.predictions[0]["hypothesis"] == heard.group(1)
