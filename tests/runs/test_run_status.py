"""runs.run_status and runs.read_summary: what a run directory says about its run."""

import json

from sophia_lambda_jax import runs


def test_status_of_run_directories(tmp_path):
  d = tmp_path / "x/seed0"
  assert runs.run_status(d) == "pending"
  d.mkdir(parents=True)
  assert runs.run_status(d) == "pending"
  (d / "metrics.jsonl").write_text("{}\n")
  assert runs.run_status(d) == "partial"
  (d / runs.FAILED).write_text("{}")
  assert runs.run_status(d) == "failed"
  (d / "summary.json").write_text("{}")
  assert runs.run_status(d) == "done"


def test_summary_only_once_the_run_has_finished(tmp_path):
  assert runs.read_summary(tmp_path) is None
  (tmp_path / "summary.json").write_text(json.dumps({"final_val_loss": 4.5}))
  assert runs.read_summary(tmp_path) == {"final_val_loss": 4.5}
