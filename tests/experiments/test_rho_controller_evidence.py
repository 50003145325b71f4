"""The rho-controller evidence: its run matrix, staged and restartable runs, and the report
(paired differences, band, rho, the default rule), with a fake trainer."""

import json
import math
from pathlib import Path

import pytest

from compare_fakes import FakeTrainer
from experiments import rho_controller


def test_matrix_is_the_three_settings_on_seeds_10_to_12():
  from sophia_lambda_jax.compare import protocols

  specs = rho_controller.controller_specs()
  assert {s.seed for s in specs} == {10, 11, 12}
  assert {s.optimizer for s in specs} == {"sophia_lambda", "sophia"}
  rhos = {(s.phase, s.optimizer): set() for s in specs}
  for s in specs:
    rhos[(s.phase, s.optimizer)].add(s.fields["optimizer_kwargs"]["rho"])
    assert s.fields["optimizer_kwargs"]["bias_correction"] is True
  for opt in ("sophia_lambda", "sophia"):
    assert rhos[("a", opt)] == {"auto", 0.2}
    assert rhos[("b", opt)] == {"auto", 0.2, 0.4}
    assert rhos[("c", opt)] == {"auto", 0.1, 0.2, 0.4}
  by_stage = {s.phase: s.fields for s in specs if s.optimizer == "sophia_lambda"}
  cpu = protocols.cpu_fields()
  assert (by_stage["a"]["steps"], by_stage["a"]["batch_size"]) == (cpu["steps"], 8)
  assert (by_stage["b"]["steps"], by_stage["b"]["learning_rate"]) == (3000, 1e-3)
  assert (by_stage["c"]["steps"], by_stage["c"]["batch_size"], by_stage["c"]["seq_len"]) == (
      300, 32, 128)
  # A pair differs in rho only.
  pairs = {}
  for s in specs:
    fields = dict(s.fields, optimizer_kwargs={k: v for k, v in s.fields["optimizer_kwargs"]
                                              .items() if k != "rho"})
    pairs.setdefault((s.phase, s.optimizer), []).append(json.dumps(fields, sort_keys=True))
  assert all(len(set(v)) == 1 for v in pairs.values())
  assert len({s.run_name for s in specs}) == len(specs) == 3 * 2 * (2 + 3 + 4)
  for s in specs:
    s.train_config("unused")


class RhoFake:
  """The compare fake, plus what the report reads of the rho controller: a rho per step and
  a final loss that depends on the configuration (auto 0.05 better than fixed in stage a,
  0.05 worse in b, the same in c, with a seed-dependent spread)."""

  def __init__(self):
    self.inner = FakeTrainer()
    self.calls = self.inner.calls

  def __call__(self, config):
    summary = self.inner(config)
    out = Path(config.out)
    rho = config.optimizer_kwargs["rho"]
    stage = "c" if config.batch_size == 32 else ("b" if config.learning_rate else "a")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
      if "loss" in r:
        r["rho"] = min(0.04 * 2 ** r["step"], 0.3) if rho == "auto" else rho
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if rho == "auto":
      summary["final_val_loss"] += ({"a": -0.05, "b": 0.05, "c": 0.0}[stage]
                                    + 0.003 * (config.seed - 10) ** 2)
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


def test_stages_run_separately_and_the_report_pairs_seeds(tmp_path, capsys):
  argv = ["--out", str(tmp_path), "--set", "steps=20"]
  first = RhoFake()
  assert rho_controller.main(argv + ["--stages", "a"], trainer=first) == 0
  assert len(first.calls) == 12
  md = (tmp_path / "results.md").read_text()
  assert "## (a)" in md and "## (b)" not in md and "not all settings finished" in md

  rest = RhoFake()
  assert rho_controller.main(argv + ["--stages", "b,c"], trainer=rest) == 0
  assert len(rest.calls) == 18 + 24
  report = json.loads((tmp_path / "results.json").read_text())
  rows = {r["label"]: r for stage in report["stages"].values()
          for entry in stage.values() for r in entry["rows"]}
  diffs = [0.0, 0.003, 0.012]
  mean = sum(diffs) / 3
  se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
  a = rows["a/sophia_lambda/rho0.2"]["vs_auto"]
  assert a["mean"] == pytest.approx(-0.05 + mean) and a["se"] == pytest.approx(se)
  assert a["verdict"] == "auto better" and a["n"] == 3
  assert rows["b/sophia/rho0.4"]["vs_auto"]["verdict"] == "auto worse"
  assert rows["c/sophia_lambda/rho0.1"]["vs_auto"]["verdict"] == "within noise"
  assert rows["a/sophia_lambda/auto"]["vs_auto"] is None
  # The fake logs 20 % unclipped (embedding 10 %, mlp 40 %) in the second half.
  assert rows["b/sophia/auto"]["unclipped"]["mean"] == pytest.approx(0.2)
  assert rows["b/sophia/auto"]["unclipped_by_role"] == pytest.approx(
      {"embedding": 0.1, "mlp": 0.4})
  assert rows["c/sophia/auto"]["final_rho"]["mean"] == pytest.approx(0.3)
  assert rows["c/sophia/rho0.4"]["final_rho"]["mean"] == pytest.approx(0.4)
  assert rows["a/sophia/auto"]["hessian_overhead"] == pytest.approx(0.05)
  assert report["stages"]["c"]["sophia"]["best_fixed_rho"] in (0.1, 0.2, 0.4)
  # Fixed rho 0.2 is worse than auto in (a): it cannot replace the default.
  assert report["fixed_beats_auto_everywhere"]["sophia_lambda"] == {"0.2": False}
  md = (tmp_path / "results.md").read_text()
  for stage in "abc":
    assert f"## ({stage})" in md
  assert "better than auto beyond 2 standard errors in all three settings: no" in md
  assert "Best fixed rho of x0.5 / x1 / x2 around 0.2" in md
  assert f"Made with `python -m experiments.rho_controller --out {tmp_path} --set steps=20" in md
  for png in ("rho.png", "clip_fraction.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"

  again = RhoFake()
  assert rho_controller.main(argv, trainer=again) == 0
  assert again.calls == []


def test_paired_difference_and_its_verdicts():
  pd = rho_controller.paired_difference
  assert pd({10: 1.0, 11: 1.1, 12: 0.9}, {10: 1.2, 11: 1.3, 12: 1.1})["verdict"] == "auto better"
  assert pd({10: 1.0, 11: 1.1}, {11: 1.0, 12: 0.0}) == {
      "n": 1, "mean": pytest.approx(0.1), "se": None, "verdict": "one seed"}
  assert pd({10: 1.0}, {11: 1.0})["verdict"] == "n/a"
  noisy = pd({10: 1.0, 11: 1.2, 12: 0.9}, {10: 1.1, 11: 1.0, 12: 1.0})
  assert noisy["verdict"] == "within noise"


def test_list_and_bad_stages(tmp_path, capsys):
  assert rho_controller.main(["--out", str(tmp_path), "--stages", "c", "--list"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 24 and all(line.startswith("c/") for line in out)
  assert not (tmp_path / "plan.json").exists()
  for bad in (["--stages", "d"], ["--stages", ""], ["--seeds", "x"]):
    with pytest.raises(SystemExit) as exit_info:
      rho_controller.main(["--out", str(tmp_path)] + bad)
    assert exit_info.value.code == 2
