"""Sophia-Lambda ablation plan and report (with a fake trainer)."""

import json
import math
import statistics

import pytest

from compare_fakes import write_fake_run
from experiments import ablations


def test_every_family_changes_one_thing_against_the_baseline():
  from sophia_lambda_jax.compare import protocols

  specs = ablations.ablation_specs(2)
  by_label = {s.label: s for s in specs}
  base = by_label["baseline"]
  regime = protocols.CPU_REGIME_KWARGS["sophia_lambda"]
  assert base.optimizer == "sophia_lambda" and {s.optimizer for s in specs} == {"sophia_lambda"}
  assert base.fields["optimizer_kwargs"] == {**regime, "block_size": 64}
  assert set(base.group.split(",")) == set(ablations.FAMILIES)
  assert {s.fields["optimizer_kwargs"].get("block_size") for s in specs
          if s.group == "block_size"} == {1, 8, 256}

  def changed(label):
    kwargs = by_label[label].fields["optimizer_kwargs"]
    base_kwargs = base.fields["optimizer_kwargs"]
    return {k: v for k, v in kwargs.items() if k not in base_kwargs or base_kwargs[k] != v}

  assert changed("layer_scale_off") == {"layer_scale": None}
  assert changed("adaptive_interval") == {"adaptive_interval": True}
  other = not regime["bias_correction"]
  other_kwargs = {"bias_correction": other,
                  "rho": protocols.CPU_CALIBRATED_RHO["sophia_lambda"][other]}
  tag = "on" if other else "off"
  assert changed(f"adaptive_interval_bc_{tag}") == {"adaptive_interval": True, **other_kwargs}
  assert changed(f"bias_correction_{tag}") == other_kwargs
  hutch = by_label["hutchinson"]
  assert hutch.fields["hessian_estimator"] == "hutchinson" and changed("hutchinson") == {}
  assert [s.seed for s in specs if s.label == "hutchinson"] == [0, 1]
  # Same token budget and learning rate everywhere.
  keys = ("steps", "batch_size", "seq_len", "learning_rate", "model", "data")
  assert len({tuple(s.fields[k] for k in keys) for s in specs}) == 1


def test_ablation_main_writes_report_and_png(tmp_path, fake_trainer, capsys):
  trainer = fake_trainer(interval=True)
  rc = ablations.main(["--out", str(tmp_path), "--steps", "20"], trainer=trainer)
  assert rc == 0
  n_runs = len(ablations.ablation_specs(2, steps=20))
  assert len(trainer.calls) == n_runs
  md = (tmp_path / "ablations.md").read_text()
  for family in ablations.FAMILIES:
    assert f"## {family}" in md
  assert "block size 256" in md and "Hessian refreshes" in md
  assert (tmp_path / "ablations.png").read_bytes()[:4] == b"\x89PNG"
  families = json.loads((tmp_path / "ablations.json").read_text())
  assert set(families) == set(ablations.FAMILIES)
  again = fake_trainer()
  assert ablations.main(["--out", str(tmp_path), "--steps", "20"], trainer=again) == 0
  assert again.calls == []


def test_vs_default_is_the_paired_difference_with_its_standard_error(tmp_path):
  from sophia_lambda_jax.compare import runner

  # Final loss shifts per (variant, seed) against the default: block size 1 worse on both
  # seeds, layer scale off worse on one seed and better on the other.
  shifts = {"block_size_1": {0: 0.05, 1: 0.08}, "layer_scale_off": {0: 0.02, 1: -0.01}}
  specs = ablations.ablation_specs(2, steps=20)
  for spec in specs:
    write_fake_run(tmp_path / spec.run_name, spec, shift=shifts.get(spec.label, {}).get(
        spec.seed, 0.0))
  runner.write_plan(tmp_path, specs, "ablation")
  report = ablations.ablation_report(tmp_path)
  rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
          for line in report["markdown"].splitlines() if line.startswith("| ")}
  se = statistics.stdev([0.05, 0.08]) / math.sqrt(2)
  assert rows["block size 1"][2] == f"+0.0650 ± {se:.4f} (worse)"
  assert rows["layer scale off"][2] == f"+0.0050 ± {se:.4f} (within noise)"
  assert rows["block size 8"][2] == "+0.0000 ± 0.0000 (within noise)"
  assert rows[ablations._describe("baseline")][2] == "—"
  md = report["markdown"]
  assert "'vs default' is this configuration's loss minus the default's" in md
  assert "about 70 % (Student's t, 1 degree of freedom)" in md
  vs = report["families"]["block_size"]["block_size_1"]["vs_default"]
  assert vs["paired"] and vs["n"] == 2
  assert vs["by_seed"] == pytest.approx({0: 0.05, 1: 0.08})
  assert report["families"]["block_size"]["baseline"]["vs_default"] is None


def test_family_subset_and_bad_family(tmp_path, fake_trainer, capsys):
  trainer = fake_trainer()
  assert ablations.main(["--out", str(tmp_path), "--families", "layer_scale", "--list"],
                        trainer=trainer) == 0
  out = capsys.readouterr().out
  assert "baseline/seed0" in out and "layer_scale_off/seed0" in out
  assert "block_size_8" not in out
  with pytest.raises(SystemExit):
    ablations.main(["--out", str(tmp_path), "--families", "dropout"])
