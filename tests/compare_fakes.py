"""Synthetic compare runs for the compare-harness and ablation tests: run directories with the files
the training script writes (config.json, metrics.jsonl, summary.json), from a made-up but
deterministic loss curve, so tables and plots are tested without training anything."""

import json
import math
from pathlib import Path

import pytest

from sophia_lambda_jax.compare import runner
from sophia_lambda_jax.compare.protocols import RunSpec

# Made-up per-optimizer numbers: final-loss offset and step time.
OFFSETS = {"adamw": 0.0, "lion": 0.30, "sophia_lambda": -0.10, "sophia": 0.05,
           "lamvs": -0.02, "lavsm": 0.01, "stable_adamw": 0.0, "sophia_h": 0.2}
STEP_TIMES = {"adamw": 0.10, "lion": 0.09, "sophia_lambda": 0.11, "sophia": 0.12,
              "lamvs": 0.10, "lavsm": 0.10, "stable_adamw": 0.105, "sophia_h": 0.2}


def fake_loss(optimizer: str, seed: int, step: int, steps: int, shift: float = 0.0) -> float:
  """7 at step 0 falling to 4 + offset + shift at the end, plus a seed-dependent shift."""
  frac = step / steps
  return (4.0 + OFFSETS.get(optimizer, 0.0) + shift + 3.0 * (1 - frac) ** 2
          + 0.01 * (seed - 1))


def write_fake_run(run_dir: Path, spec: RunSpec, steps: int = 20, eval_every: int = 5,
                   finished: bool = True, interval: bool = False,
                   shift: float = 0.0) -> dict:
  """The files of one run; returns its summary (final_val_loss = the last evaluation)."""
  run_dir.mkdir(parents=True, exist_ok=True)
  opt, seed = spec.optimizer, spec.seed
  (run_dir / "config.json").write_text(json.dumps(dict(spec.fields, seed=seed,
                                                       out=str(run_dir))))
  lines, val = [], None
  last = steps if finished else steps // 2
  for step in range(1, last + 1):
    rec = {"step": step, "loss": fake_loss(opt, seed, step, steps, shift) + 0.05, "lr": 1e-3,
           "grad_norm": 1.0, "step_time_s": STEP_TIMES.get(opt, 0.1),
           "tokens_per_s": 1024 / STEP_TIMES.get(opt, 0.1)}
    if interval:
      rec.update(hessian_interval=10 * (1 + step // 10), hessian_refreshes=step // 10,
                 refresh=step % 10 == 0)
    if opt.startswith("sophia"):
      # Unclipped 20 % (embedding 10 %, mlp 40 %) in the second half, 99 % clipped before.
      late = step > steps / 2
      rec.update({"clip_fraction": 0.8 if late else 0.99,
                  "clip_fraction/embedding": 0.9 if late else 0.99,
                  "clip_fraction/mlp": 0.6 if late else 0.99})
    lines.append(rec)
    if step % eval_every == 0:
      val = fake_loss(opt, seed, step, steps, shift)
      lines.append({"step": step, "val_loss": val})
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  summary = {
      "final_val_loss": val, "final_train_loss": lines[-2]["loss"] if val else None,
      "steps": steps, "tokens": steps * 1024, "tokens_per_s": 1024 / STEP_TIMES.get(opt, 0.1),
      "wall_s": 10.0, "opt_state_bytes": 2_000_000 if opt != "lion" else 1_000_000,
      "peak_memory_bytes": 100_000_000 + seed, "device_peak_bytes_in_use": None,
      "hessian_overhead": ({"mean_over_other": 1.05, "refresh_over_other": 1.5}
                           if opt.startswith("sophia") else None),
  }
  if finished:
    (run_dir / "summary.json").write_text(json.dumps(summary))
  return summary


class FakeTrainer:
  """Stands in for run_training: writes a finished (or, when told, failing) run into
  config.out and counts its calls."""

  def __init__(self, fail_for=(), steps=20, interval=False):
    self.calls = []
    self.fail_for = set(fail_for)
    self.steps = steps
    self.interval = interval

  def __call__(self, config):
    out = Path(config.out)
    self.calls.append(str(out))
    if config.optimizer in self.fail_for:
      out.mkdir(parents=True, exist_ok=True)
      raise FloatingPointError(f"non-finite loss at step 3 ({config.optimizer})")
    spec = RunSpec(out.parent.name, config.optimizer, config.seed,
                   {"optimizer": config.optimizer, "learning_rate": config.learning_rate},
                   "test")
    # Tuned sweeps: the loss is lowest at lr 1e-3 and grows with the distance in decades.
    shift = (0.0 if config.learning_rate is None
             else 0.1 * abs(math.log10(config.learning_rate) + 3.0))
    summary = write_fake_run(out, spec, steps=self.steps, interval=self.interval, shift=shift)
    config.to_json(out / "config.json")  # the whole config, as run_training writes it
    return summary


@pytest.fixture
def fake_trainer():
  return FakeTrainer


@pytest.fixture
def fake_compare(tmp_path):
  """A compare root with plan.json: adamw, sophia_lambda, lion x 3 seeds (finished), and
  one failed lamvs run."""
  from sophia_lambda_jax.compare import protocols

  specs = protocols.cpu(3, ["adamw", "lion", "lamvs", "sophia_lambda"])
  for spec in specs:
    if spec.optimizer == "lamvs":
      if spec.seed == 0:
        d = tmp_path / spec.run_name
        d.mkdir(parents=True)
        (d / "failed.json").write_text(json.dumps({"error": "FloatingPointError: nan"}))
      continue
    write_fake_run(tmp_path / spec.run_name, spec, interval=spec.optimizer == "sophia_lambda")
  runner.write_plan(tmp_path, specs, "cpu")
  return tmp_path, specs
