"""Sophia-family diagnostics of a training run: the clip fraction per parameter role and
rho in metrics.jsonl, the unclipped fraction of the second half, the final rho and the
band verdict in summary.json (a warning line when out of band), the
`hessian_estimator` field that swaps the curvature estimator of one optimizer, MFU per step
and in the summary, and a run's learning rates under the wsd schedule."""

import json

import pytest

from sophia_lambda_jax.train import TrainConfig, run_training
from sophia_lambda_jax.train.metrics import read_metrics, unclipped_fractions


def _config(token_data, out, optimizer="sophia_lambda", optimizer_kwargs=(), **kw):
  kw = {"steps": 4, **kw}
  return TrainConfig(model="qwen-tiny", data=str(token_data), batch_size=2,
                     seq_len=16, eval_batches=1, tensorboard=False, out=str(out),
                     optimizer=optimizer,
                     optimizer_kwargs={"hessian_interval": 2, **dict(optimizer_kwargs)},
                     compute_dtype="float32", **kw)


def test_clip_fraction_by_role_and_unclipped_summary(token_data, tmp_path):
  summary = run_training(_config(token_data, tmp_path))
  records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
  roles = {k.split("/", 1)[1] for k in records[-1] if k.startswith("clip_fraction/")}
  assert {"embedding", "attention", "mlp", "norm"} <= roles
  for r in records:
    assert 0.0 <= r["clip_fraction"] <= 1.0
    # The overall fraction lies between the per-role extremes.
    per_role = [r[f"clip_fraction/{role}"] for role in roles]
    assert min(per_role) - 1e-6 <= r["clip_fraction"] <= max(per_role) + 1e-6
  late = [1 - r["clip_fraction"] for r in records if r["step"] > 2]
  assert summary["unclipped_fraction"] == pytest.approx(sum(late) / len(late))
  assert set(summary["unclipped_fraction_by_role"]) == roles
  assert json.loads((tmp_path / "summary.json").read_text())["unclipped_fraction"] == \
      pytest.approx(summary["unclipped_fraction"])
  # Sophia-Lambda's default rho="auto": the controller's rho of every update is logged.
  rhos = [r["rho"] for r in records]
  assert rhos[0] == pytest.approx(0.04) and len(set(rhos)) == len(rhos)
  assert summary["final_rho"] == rhos[-1]
  assert summary["hessian_skipped"] == 0 and {r["hessian_skipped"] for r in records} == {0}


def test_a_fixed_rho_out_of_the_band_ends_with_one_warning_line(token_data, tmp_path, capsys):
  summary = run_training(_config(token_data, tmp_path, optimizer="sophia",
                                 optimizer_kwargs={"rho": 1e-4}))
  assert summary["unclipped_fraction"] < 0.1 and summary["unclipped_in_band"] is False
  assert summary["final_rho"] == pytest.approx(1e-4)
  lines = [line for line in capsys.readouterr().err.splitlines() if "band" in line]
  assert len(lines) == 1 and lines[0].startswith("warning: ")
  assert "rho 0.0001 is fixed: pass --rho auto" in lines[0]


def test_unclipped_fractions_use_the_second_half_only():
  records = [{"step": s, "loss": 1.0, "clip_fraction": 0.9 if s <= 5 else 0.6,
              "clip_fraction/mlp": 0.5} for s in range(1, 11)] + [{"step": 10, "val_loss": 2}]
  assert unclipped_fractions(records, 10) == pytest.approx({"all": 0.4, "mlp": 0.5})
  assert unclipped_fractions([{"step": 3, "loss": 1.0}], 4) == {}


def test_hessian_estimator_field_swaps_the_estimator(token_data, tmp_path):
  config = _config(token_data, tmp_path / "hutch", hessian_estimator="hutchinson")
  assert config.resolved_hessian_estimator() == "hutchinson"
  summary = run_training(config)
  assert summary["final_val_loss"] > 0 and summary["unclipped_fraction"] is not None
  with pytest.raises(ValueError, match="second-order optimizers only"):
    TrainConfig(optimizer="adamw", hessian_estimator="gnb")
  with pytest.raises(ValueError, match=r"for 'sophia_h' must be one of \['hutchinson'\]"):
    TrainConfig(optimizer="sophia_h", hessian_estimator="gnb")
  with pytest.raises(ValueError, match="unknown optimizer 'bogus'"):
    TrainConfig(optimizer="bogus")


def test_the_final_evaluation_covers_the_whole_validation_split(token_data, tmp_path):
  from sophia_lambda_jax import data

  config = _config(token_data, tmp_path, eval_every=2, final_eval_batches=None)
  summary = run_training(config)
  evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
  split = data.TokenBatches(str(token_data), "val", batch_size=2, seq_len=16,
                            vocab_size=1024).num_batches
  assert split > 1
  assert [(r["step"], r["val_batches"]) for r in evals] == [(2, 1), (4, split)]
  assert summary["final_val_batches"] == split
  assert summary["final_val_loss"] == evals[-1]["val_loss"]


def test_mfu_per_step_and_in_the_summary_and_the_wsd_schedule(token_data, tmp_path):
  from sophia_lambda_jax.models import qwen
  from sophia_lambda_jax.train import flops

  config = _config(token_data, tmp_path, steps=5, schedule="wsd", decay_fraction=0.4)
  summary = run_training(config)
  records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
  # One process measures its CPU peak once: the test's count is the loop's.
  counted = flops.step_flops(config, qwen.get_config("qwen-tiny"), "gnb")
  assert counted.refresh_per_token > 0
  for r in records:
    assert r["mfu"] == pytest.approx(counted.mfu(config.batch_tokens, r["step_time_s"],
                                                 r["refresh"]))
  assert any(r["refresh"] for r in records) and not all(r["refresh"] for r in records)
  steady = [r for r in records if not r.get("warmup")]
  assert summary["mfu"] == pytest.approx(
      sum(r["mfu"] * r["step_time_s"] for r in steady) / sum(r["step_time_s"] for r in steady))
  refreshed = sum(r["refresh"] for r in steady) / len(steady)
  assert summary["flops_per_token"] == pytest.approx(
      counted.model_per_token + refreshed * counted.refresh_per_token)
  # wsd, no warmup (5 // 10 steps), the last 2 steps decaying linearly to 0.1 of the peak:
  # the lr of the updates at steps 0..4.
  peak = records[0]["lr"]
  assert [r["lr"] for r in records] == pytest.approx([peak] * 4 + [peak * (1 + 0.1) / 2])
