"""train/metrics.py: the JSONL record and the TensorBoard events hold the same scalars."""

import io
import struct
from pathlib import Path

import pytest

from sophia_lambda_jax.train import metrics


def read_events(directory: Path):
  """(tag, step, value) of every scalar in the TFRecord event files under `directory`."""
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  scalars = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]  # skip the length's crc
      offset += 12 + length + 4  # and the record's crc
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        scalars.append((value.tag, event.step, value.simple_value))
  return scalars


def test_tensorboard_events_mirror_the_jsonl(tmp_path):
  pytest.importorskip("tensorboardX")
  logger = metrics.MetricsLogger(tmp_path, total_steps=3, start_step=0, enabled=True,
                                 log_every=1, stream=io.StringIO())
  for step in (1, 2, 3):
    logger.log_step({"step": step, "loss": 5.0 - step, "lr": 1e-3 * step, "refresh": True,
                     "hessian_interval": 10})
  logger.log_eval(3, 1.5)
  logger.close()
  records = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3, 3]
  events = read_events(tmp_path / "tensorboard")
  assert [(s, v) for t, s, v in events if t == "loss"] == [(1, 4.0), (2, 3.0), (3, 2.0)]
  assert [(s, v) for t, s, v in events if t == "val_loss"] == [(3, 1.5)]
  assert [s for t, s, _ in events if t == "hessian_interval"] == [1, 2, 3]
  assert not [t for t, _, _ in events if t == "refresh"]  # booleans are not scalars


def test_tensorboard_can_be_turned_off(tmp_path):
  logger = metrics.MetricsLogger(tmp_path, total_steps=1, start_step=0, enabled=True,
                                 log_every=1, tensorboard=False, stream=io.StringIO())
  logger.log_step({"step": 1, "loss": 1.0, "lr": 1e-3})
  logger.close()
  assert not (tmp_path / "tensorboard").exists()
