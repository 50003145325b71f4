"""A training run's directory, read: its status.

A run directory is what `slj train --out DIR` writes (`train.loop`):

    config.json        the TrainConfig
    metrics.jsonl      one JSON line per logged step
    checkpoints/       orbax checkpoints, one folder per step
    summary.json       written when the run has finished
    failed.json        written by `slj compare` when the run raised
"""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY = "summary.json"
FAILED = "failed.json"


def run_status(run_dir) -> str:
  """'done' (summary.json written), 'failed' (failed.json written), 'partial' (started,
  not finished: will resume) or 'pending'."""
  run_dir = Path(run_dir)
  if (run_dir / SUMMARY).is_file():
    return "done"
  if (run_dir / FAILED).is_file():
    return "failed"
  if run_dir.is_dir() and any(run_dir.iterdir()):
    return "partial"
  return "pending"


def read_summary(run_dir) -> dict | None:
  """The run's summary.json, or None before the run has finished."""
  path = Path(run_dir) / SUMMARY
  if not path.is_file():
    return None
  with open(path) as f:
    return json.load(f)
