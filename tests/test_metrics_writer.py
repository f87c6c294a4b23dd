"""MetricsWriter.truncate_after: what a resumed run keeps of metrics.jsonl."""

import json
import os

from sld_jax.metrics_writer import MetricsWriter


def test_truncate_after_keeps_earlier_steps_and_drops_a_torn_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 2, "loss": 3.0}\n{"step": 4, "loss": 2.0}\n'
            '{"step": 6, "loss": 1.0}\n{"step": 8, "lo')          # killed mid-write
  writer = MetricsWriter(path)
  assert writer.truncate_after(4) == 2                               # step 6 and the torn line
  writer.write(6, {"loss": 1.5})
  rows = [json.loads(line) for line in open(path)]
  assert [(r["step"], r["loss"]) for r in rows] == [(2, 3.0), (4, 2.0), (6, 1.5)]
  assert os.listdir(tmp_path) == ["metrics.jsonl"]                   # no temporary left


def test_truncate_after_ends_a_kept_last_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 2, "loss": 3.0}\n{"step": 4, "loss": 2.0}\n{"step": 6, "loss": 1.0}')
  writer = MetricsWriter(path)
  assert writer.truncate_after(6) == 0          # nothing after step 6, but the line is ended
  writer.write(8, {"loss": 0.5})
  assert [json.loads(line)["step"] for line in open(path)] == [2, 4, 6, 8]
