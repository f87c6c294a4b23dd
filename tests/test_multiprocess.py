"""Two processes on one machine (jax.distributed over localhost, gloo CPU
collectives) train like one process with all the devices.

Each process drives 4 CPU devices and reads its half of every global batch;
the mesh is (data=8). Both processes must report the same final loss and the
same checksum of their own copy of the parameters, and the parameters must
match a one-process run on 8 devices (rtol 1e-5: only the all-reduce order
differs).
"""

from __future__ import annotations

import itertools
import logging
import re
import socket
import subprocess

import jax
import numpy as np
import pytest

from sld_jax import distributed
from sld_jax import input_pipeline

import tiny_train

STEPS = 4
FINISHED = re.compile(r"process (\d): finished at step (\d+); loss ([-\d.e+]+); "
                      r"params checksum ([-\d.e+]+)")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _finished_line(stderr: str) -> tuple[int, int, float, float]:
  match = FINISHED.search(stderr)
  assert match, stderr[-4000:]
  process, step, loss, checksum = match.groups()
  return int(process), int(step), float(loss), float(checksum)


def test_two_processes_agree_with_each_other_and_with_one(tmp_path):
  shared_dir = str(tmp_path / "two_processes")
  port = _free_port()
  env = tiny_train.subprocess_env(4)
  processes = [
      subprocess.Popen(
          tiny_train.train_command(shared_dir, STEPS, flags=[
              f"--coordinator_address=localhost:{port}", "--num_processes=2",
              f"--process_id={index}"]),
          cwd=tiny_train.REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE, text=True)
      for index in range(2)]
  outputs = []
  try:
    for process in processes:
      _, stderr = process.communicate(timeout=300)
      outputs.append(stderr)
      assert process.returncode == 0, stderr[-6000:]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()

  reports = sorted(_finished_line(stderr) for stderr in outputs)
  assert [r[0] for r in reports] == [0, 1]
  assert reports[0][1:] == reports[1][1:], reports   # step, loss and checksum agree
  assert reports[0][1] == STEPS
  assert "process 1 of 2; 4 local of 8 devices" in outputs[1]

  single_dir = str(tmp_path / "one_process")
  tiny_train.run(tiny_train.train_command(single_dir, STEPS), tiny_train.subprocess_env(8))
  two, one = tiny_train.read_metrics(shared_dir), tiny_train.read_metrics(single_dir)
  assert [line["step"] for line in two] == [line["step"] for line in one]
  np.testing.assert_allclose([line["loss"] for line in two], [line["loss"] for line in one],
                             rtol=1e-5)
  assert [line["num_target_tokens"] for line in two] == [
      line["num_target_tokens"] for line in one]
  # atol: the attention key bias has a zero gradient in exact arithmetic;
  # Adam turns its rounding noise into ~1e-6 updates.
  for a, b in zip(jax.tree.leaves(tiny_train.checkpointed_params(shared_dir, STEPS)),
                  jax.tree.leaves(tiny_train.checkpointed_params(single_dir, STEPS))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_initialize_decides_from_flags_and_environment(monkeypatch):
  for name in ("SLD_COORDINATOR_ADDRESS", "SLD_NUM_PROCESSES", "SLD_PROCESS_ID",
               "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
               "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.detected_cluster() is None
  assert distributed.initialize("auto") is False           # one process: nothing to do
  assert distributed.initialize("off", "localhost:1", 2, 0) is False
  with pytest.raises(ValueError, match="--num_processes"):
    distributed.initialize("auto", coordinator_address="localhost:1234")
  monkeypatch.setenv("SLD_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="coordinator_address"):
    distributed.initialize("auto")
  monkeypatch.setenv("SLD_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="SLD_NUM_PROCESSES"):
    distributed.initialize("auto")
  monkeypatch.delenv("SLD_NUM_PROCESSES")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.detected_cluster() is None
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.detected_cluster() == "SLURM_NTASKS"
  with pytest.raises(ValueError, match="mode"):
    distributed.initialize("sometimes")


def test_each_of_two_processes_resumes_its_shards_of_a_sharded_task_exactly(caplog):
  """Process p of 2 reads its own shards of the prepared smoke task (seqio
  FileDataSource), and its batches from step s are those of an
  uninterrupted run, across epoch boundaries (files and examples reshuffled
  per epoch with the seed)."""
  source = input_pipeline.SeqioSource(task_name="sld_embedded_digits_whisper_smoke",
                                      global_batch_size=4, sequence_length=96, seed=3)
  steps, resume_at = 30, 17   # about 10 steps per epoch per process
  with caplog.at_level(logging.INFO):
    straight = [list(itertools.islice(source.batches(0, p, 2), steps)) for p in range(2)]
  assert "Sharding at the data source: 1 of 2" in caplog.text
  assert "Sharding at the data source: 2 of 2" in caplog.text
  assert "uncached FunctionDataset" not in caplog.text
  for process in range(2):
    resumed = list(itertools.islice(source.batches(resume_at, process, 2),
                                    steps - resume_at))
    for want, got in zip(straight[process][resume_at:], resumed, strict=True):
      for name in input_pipeline.FEATURES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # The processes read different examples.
  first = [b["decoder_target_tokens"].tobytes() for b in straight[0]]
  second = [b["decoder_target_tokens"].tobytes() for b in straight[1]]
  assert not set(first) & set(second)
