"""rho calibration plan and report (with a fake trainer)."""

import json

from experiments import calibrate_rho


def test_plan_sweeps_rho_with_and_without_bias_correction():
  specs = calibrate_rho.calibration_specs(1, ["sophia_lambda"], steps=20)
  kwargs = [s.fields["optimizer_kwargs"] for s in specs]
  assert len(specs) == 2 * len(calibrate_rho.RHOS["sophia_lambda"])
  assert {(k["rho"], k["bias_correction"]) for k in kwargs} == {
      (rho, bc) for rho in calibrate_rho.RHOS["sophia_lambda"] for bc in (False, True)}
  assert len({s.run_name for s in specs}) == len(specs)
  assert {s.fields["learning_rate"] for s in specs} == {None}   # the cpu protocol's default


def test_report_picks_the_in_margin_rho_with_the_lowest_loss(tmp_path, fake_trainer):
  # The fake runs are 20 % unclipped (inside the margin) with the lowest loss at lr 1e-3...
  assert calibrate_rho.main(["--out", str(tmp_path), "--optimizers", "sophia",
                             "--set", "steps=20"], trainer=fake_trainer()) == 0
  report = json.loads((tmp_path / "calibration.json").read_text())
  assert all(abs(r["unclipped"] - 0.2) < 1e-9 for r in report["rows"])
  # ...and equal losses, so the first rho of each setting wins and bias correction ties.
  assert report["chosen"]["sophia"]["in_band_rho"] == calibrate_rho.RHOS["sophia"][0]
  assert report["protocol"]["sophia"]["rho"] == calibrate_rho.RHOS["sophia"][0]
  md = (tmp_path / "calibration.md").read_text()
  assert "15-45 % unclipped" in md and "Protocol settings" in md


def test_unknown_optimizer_is_one_usage_error(tmp_path, capsys):
  import pytest

  with pytest.raises(SystemExit) as exit_info:
    calibrate_rho.main(["--out", str(tmp_path), "--optimizers", "adamw"])
  assert exit_info.value.code == 2
  assert "--optimizers must be a non-empty subset" in capsys.readouterr().err
