"""Helpers shared by the training tests (subprocess runs, reading metrics)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def subprocess_env(devices: int, cache: Path) -> dict[str, str]:
  """Environment of a child training process with `devices` simulated CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  root = str(Path(__file__).resolve().parents[2])
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  return env


def train_command(flags: dict[str, object]) -> list[str]:
  """`python -m sophia_lambda_jax.cli train --flag value ...`."""
  argv = [sys.executable, "-m", "sophia_lambda_jax.cli", "train"]
  for name, value in flags.items():
    argv += [f"--{name}", str(value)]
  return argv


def run_train(flags: dict[str, object], env: dict[str, str],
              timeout: float = 300) -> subprocess.CompletedProcess:
  result = subprocess.run(train_command(flags), env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result


def losses(out: Path) -> list[float]:
  from sophia_lambda_jax.train.metrics import read_metrics

  return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]
