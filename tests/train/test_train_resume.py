"""Checkpoint/resume: SIGKILL and restart is bitwise identical; mismatched configs refused;
a NaN stops the run and keeps the last good checkpoint."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from checkpoint_arrays import restore_arrays
from sophia_lambda_jax import train
from sophia_lambda_jax.train.checkpoint import Checkpointer
from sophia_lambda_jax.train.metrics import read_metrics
from train_helpers import losses, run_train, subprocess_env, train_command

STEPS = 10


def _flags(token_data, out):
  return {"model": "qwen-tiny", "optimizer": "sophia_lambda", "steps": STEPS,
          "batch-size": 4, "seq-len": 32, "data": token_data, "mesh": "data=1,fsdp=2",
          "out": out, "checkpoint-every": 2, "keep-checkpoints": 2, "eval-every": 0,
          "compute-dtype": "float32", "hessian-interval": 3, "tensorboard": "false",
          "log-every": 1}


def _complete_steps(out: Path) -> list[int]:
  directory = out / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


def _logged_steps(out: Path) -> int:
  path = out / "metrics.jsonl"
  if not path.exists():
    return 0
  return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


@pytest.fixture(scope="module")
def runs(token_data, compile_cache, tmp_path_factory):
  """An uninterrupted run and one killed with SIGKILL mid-run, then restarted."""
  root = tmp_path_factory.mktemp("resume")
  env = subprocess_env(2, compile_cache)
  reference, killed = root / "reference", root / "killed"
  ref_proc = subprocess.Popen(train_command(_flags(token_data, reference)), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  victim = subprocess.Popen(train_command(_flags(token_data, killed)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  # Kill once a checkpoint is complete and the run is at least two steps past it (the next
  # asynchronous save may be in flight).
  while time.monotonic() < deadline and victim.poll() is None:
    done = _complete_steps(killed)
    if done and _logged_steps(killed) >= done[-1] + 2:
      break
    time.sleep(0.005)
  assert victim.poll() is None, "the run finished before it could be killed"
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  killed_at = _logged_steps(killed)
  resumed_from = _complete_steps(killed)[-1]
  assert 0 < resumed_from < STEPS
  restart = run_train(_flags(token_data, killed), env)
  ref_out = ref_proc.communicate(timeout=300)[0]
  assert ref_proc.returncode == 0, ref_out[-3000:]
  return {"reference": reference, "killed": killed, "resumed_from": resumed_from,
          "killed_at": killed_at, "restart_stdout": restart.stdout}


def test_sigkill_and_restart_ends_bitwise_identical(runs):
  assert f"resumed at step {runs['resumed_from']}" in runs["restart_stdout"]
  reference = restore_arrays(runs["reference"] / "checkpoints")
  restarted = restore_arrays(runs["killed"] / "checkpoints")
  assert sorted(reference) == sorted(restarted)
  assert any("params" in k for k in reference) and any("opt_state" in k for k in reference)
  for key in reference:  # params, optimizer state, step and RNG
    np.testing.assert_array_equal(restarted[key], reference[key], err_msg=key)
  assert int(reference["00000.step"]) == STEPS
  # The metrics were cut back to the checkpoint and continue without duplicates.
  records = [r for r in read_metrics(runs["killed"] / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert losses(runs["killed"]) == losses(runs["reference"])
  # keep_checkpoints=2: only the two newest survive.
  assert _complete_steps(runs["reference"]) == [STEPS - 2, STEPS]


@pytest.mark.parametrize("change, field", [
    ({"optimizer": "sophia"}, "optimizer"),
    ({"model_overrides": {"num_layers": 3}}, "model_overrides"),
    ({"optimizer_kwargs": {"hessian_interval": 3, "rho": 0.02}}, "optimizer_kwargs"),
    ({"batch_size": 8}, "batch_size"),
])
def test_resuming_with_a_different_config_is_refused(runs, token_data, change, field):
  out = runs["reference"]
  saved = json.loads((out / "config.json").read_text())
  before = _complete_steps(out)
  config = train.TrainConfig.from_dict({**saved, **change})
  with pytest.raises(ValueError, match=f"refusing to resume(.|\n)*{field}: checkpoint has"):
    train.run_training(config)
  assert _complete_steps(out) == before  # nothing was written


def test_nan_loss_stops_and_keeps_last_good_checkpoint(token_data, tmp_path):
  # A learning rate of 1e30 makes the parameters overflow after the first update.
  config = train.TrainConfig(
      model="qwen-tiny", optimizer="adamw", learning_rate=1e30, warmup_steps=0, steps=6,
      batch_size=8, seq_len=32, data=str(token_data), out=str(tmp_path), mesh="data=1,fsdp=1",
      eval_every=0, checkpoint_every=1, compute_dtype="float32", tensorboard=False)
  with pytest.raises(FloatingPointError, match=r"non-finite .* at step (\d+)") as info:
    train.run_training(config)
  bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
  assert 1 < bad_step <= 6 and "last good checkpoint is step" in str(info.value)
  records = read_metrics(tmp_path / "metrics.jsonl")
  assert records[-1]["nonfinite"] and records[-1]["step"] == bad_step
  assert all(np.isfinite(r["loss"]) for r in records[:-1])
  latest = Checkpointer(tmp_path / "checkpoints", keep=2).latest_step()
  assert latest == bad_step - 1  # nothing after the last finite step was saved
  saved = restore_arrays(tmp_path / "checkpoints")
  assert all(np.isfinite(v).all() for v in saved.values())
