"""Tables from synthetic run directories: statistics, the papers' rows, orderings,
time to target, failed runs, and the files written."""

import json
import math
import statistics

import pytest

from sophia_lambda_jax.compare import paper_claims, tables

from compare_fakes import STEP_TIMES, fake_loss


def _val(opt, seed):
  return fake_loss(opt, seed, 20, 20)


def test_stat_is_mean_and_sample_std():
  s = tables.stat([1.0, 2.0, 4.0, None, float("nan")])
  assert s.n == 3
  assert math.isclose(s.mean, 7 / 3)
  assert math.isclose(s.std, statistics.stdev([1.0, 2.0, 4.0]))
  assert tables.stat([3.0]) == tables.Stat(3.0, None, 1)
  assert tables.stat([]).fmt() == "n/a"
  assert tables.stat([1.0, 3.0]).fmt(2) == f"2.00 ± {statistics.stdev([1.0, 3.0]):.2f} (n=2)"


def test_aggregates_over_seeds(fake_compare):
  root, _ = fake_compare
  plan, records = tables.load_results(root)
  aggs = tables.aggregate(records)
  for opt in ("adamw", "lion", "sophia_lambda"):
    vals = [_val(opt, s) for s in range(3)]
    a = aggs[opt]["final_val_loss"]
    assert a.n == 3
    assert math.isclose(a.mean, statistics.mean(vals))
    assert math.isclose(a.std, statistics.stdev(vals))
  lamvs = aggs["lamvs"]
  assert lamvs["finished"] == 0 and lamvs["runs"] == 3
  assert lamvs["failed"] == ["lamvs/seed0"]
  # sophia_lambda's overhead is mean_over_other - 1
  assert math.isclose(aggs["sophia_lambda"]["hessian_overhead"].mean, 0.05)
  assert aggs["adamw"]["hessian_overhead"].mean is None


def test_versus_adamw_pairs_runs_of_one_seed(fake_compare):
  root, _ = fake_compare
  _, records = tables.load_results(root)
  aggs = tables.aggregate(records)
  vs = tables.versus_adamw(aggs, "sophia_lambda")
  # The fake runs shift every optimizer's loss by the same amount per seed, so the per-seed
  # differences are identical: the unpaired SE would be std * sqrt(2/3), the paired one 0.
  assert vs["paired"] and vs["n"] == 3
  assert math.isclose(vs["diff"], -0.10, abs_tol=1e-9)
  assert vs["se"] == pytest.approx(0.0, abs=1e-12)
  assert vs["by_seed"] == pytest.approx({s: _val("sophia_lambda", s) - _val("adamw", s)
                                         for s in range(3)})
  assert vs["verdict"] == "better"
  assert tables.versus_adamw(aggs, "lion")["verdict"] == "worse"
  assert tables.versus_adamw(aggs, "adamw") is None


def test_paired_standard_error_is_the_std_of_differences_over_root_n():
  def agg(optimizer, by_seed):
    return {"optimizer": optimizer, "final_val_loss": tables.stat(by_seed.values()),
            "final_val_loss_by_seed": by_seed, "unclipped_fraction": None}

  adamw = {0: 4.30, 1: 4.25, 2: 4.35}
  ours = {0: 4.20, 1: 4.30, 2: 4.19}
  aggs = {"adamw": agg("adamw", adamw), "x": agg("lion", ours)}
  diffs = [ours[s] - adamw[s] for s in range(3)]
  vs = tables.versus_adamw(aggs, "x")
  assert vs["diff"] == pytest.approx(statistics.mean(diffs))
  assert vs["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
  assert vs["verdict"] == "within noise"  # |-0.07| < 2 * 0.062
  # No two seeds in common: the unpaired difference of means.
  aggs["x"] = agg("lion", {5: 4.20, 6: 4.22})
  vs = tables.versus_adamw(aggs, "x")
  assert not vs["paired"]
  assert vs["se"] == pytest.approx(math.sqrt(statistics.variance(adamw.values()) / 3
                                             + statistics.variance([4.20, 4.22]) / 2))


def test_difference_to_any_base_and_its_cell_and_caption():
  def agg(optimizer, by_seed):
    return {"optimizer": optimizer, "final_val_loss": tables.stat(by_seed.values()),
            "final_val_loss_by_seed": by_seed, "unclipped_fraction": None}

  base = {0: 6.26, 1: 6.28}
  aggs = {"adamw": agg("adamw", {0: 6.30, 1: 6.35}), "baseline": agg("sophia_lambda", base),
          "block_size_1": agg("sophia_lambda", {0: 6.31, 1: 6.34}),
          "layer_scale_off": agg("sophia_lambda", {0: 6.39, 1: 6.40})}
  d = tables.difference(aggs, "block_size_1", "baseline")
  assert d["paired"] and d["n"] == 2
  assert d["diff"] == pytest.approx(0.055)
  assert d["se"] == pytest.approx(statistics.stdev([0.05, 0.06]) / math.sqrt(2))
  assert d["verdict"] == "worse"  # 0.055 > 2 * 0.005
  assert tables.difference_cell(d, 4) == "+0.0550 ± 0.0050 (worse)"
  # versus_adamw is the difference to AdamW's label.
  assert tables.versus_adamw(aggs, "baseline") == tables.difference(aggs, "baseline", "adamw")
  # The caption names the column, the base and what 2 SE covers at the seeds paired.
  text = tables.difference_caption([d], "vs default", "the default", "ablations.json")
  assert "'vs default' is this configuration's loss minus the default's" in text
  assert "ablations.json" in text and "about 70 % (Student's t, 1 degree of freedom)" in text
  three = {"n": 3, "paired": True}
  assert "about 82 % (Student's t, 2 degrees of freedom)" in tables.difference_caption(
      [three], "vs AdamW", "AdamW")
  # Without per-seed values (aggregates stored before they were kept): unpaired, and a
  # single seed gives no standard error.
  for label in ("baseline", "layer_scale_off"):
    aggs[label] = dict(aggs[label], final_val_loss_by_seed={})
  d = tables.difference(aggs, "layer_scale_off", "baseline")
  assert not d["paired"]
  assert d["se"] == pytest.approx(math.sqrt(statistics.variance(base.values()) / 2
                                            + statistics.variance([6.39, 6.40]) / 2))
  assert d["verdict"] == "worse"
  assert "sqrt(s_a²/n_a + s_b²/n_b)" in tables.difference_caption([d], "vs default",
                                                                   "the default")
  aggs["one"] = agg("sophia_lambda", {0: 6.5})
  assert tables.difference_cell(tables.difference(aggs, "one", "baseline"), 3) == (
      "+0.230 (single seed)")


def test_time_to_target_sums_step_times():
  metrics = [{"step": s, "loss": 5.0, "step_time_s": 0.5} for s in range(1, 11)]
  metrics += [{"step": 4, "val_loss": 4.8}, {"step": 8, "val_loss": 4.4},
              {"step": 10, "val_loss": 4.3}]
  assert tables.time_to_target(metrics, 4.5) == pytest.approx(4.0)   # reached at step 8
  assert tables.time_to_target(metrics, 4.0) is None
  assert tables.val_curve(metrics)[0] == (4, 4.8, 2.0)


def test_torn_metrics_line_is_ignored(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
  assert tables.read_metrics(path) == [{"step": 1, "loss": 3.0}]


def test_paper_tables_show_claim_ours_and_protocol(fake_compare):
  root, _ = fake_compare
  report = tables.build_report(root)
  md = report["markdown"]
  for claim in paper_claims.SOPHIA_LAMBDA_TABLE1 + paper_claims.LAVSM_TABLE1:
    assert f"| {claim.method} | {claim.val_loss:.3f} |" in md
  adamw = tables.stat([_val("adamw", s) for s in range(3)])
  assert f"| AdamW | 4.927 | {adamw.fmt(3)} | - | 31.5 (1.00x) |" in md
  assert "| 20.0 ± 0.0 % | 36.8 (1.17x) |" in md  # Sophia-Lambda: in band
  assert "LAVSM | 4.899 | n/a | cpu (not run)" in md  # no Sophia row: no unclipped column
  # Sophia-Lambda paper ordering: SL < LAMVS < AdamW < Sophia; ours lacks LAMVS and Sophia.
  assert "Paper ordering: Sophia-Lambda < LAMVS < AdamW < Sophia" in md
  assert "Our ordering:   Sophia-Lambda < AdamW" in md
  # The text's memory claim beside what Table 1 itself gives (1 - 36.8 / 39.7 GB).
  assert "26% less memory than Sophia (the paper's own Table 1 says 7.3%;" in md


def test_unclipped_fraction_column_band_and_roles(fake_compare, tmp_path, fake_trainer):
  root, _ = fake_compare
  report = tables.build_report(root)
  agg = report["aggregates"]["sophia_lambda"]
  assert agg["unclipped_fraction"]["mean"] == pytest.approx(0.2)
  assert agg["unclipped_fraction_by_role"]["embedding"]["mean"] == pytest.approx(0.1)
  assert agg["unclipped_fraction_by_role"]["mlp"]["mean"] == pytest.approx(0.4)
  assert "unclipped_fraction" not in report["aggregates"]["adamw"]
  assert "10-50 % unclipped" in report["markdown"]
  sophia_row = next(l for l in report["markdown_summary"].splitlines()
                    if l.startswith("| Sophia-Lambda |"))
  assert "| 20.0 ± 0.0 % |" in sophia_row and "out of band" not in sophia_row
  # 1 % unclipped is outside the band and says so.
  out = {"unclipped_fraction": tables.stat([0.01, 0.012])}
  assert tables.unclipped_cell(out).endswith("% (out of band)")
  assert tables.unclipped_cell({"unclipped_fraction": None}) == "-"


def test_ordering_verdict_when_every_row_is_measured(tmp_path, fake_trainer):
  from sophia_lambda_jax.compare import runner

  assert runner.main(["--protocol", "cpu", "--out", str(tmp_path), "--no-plots"],
                      trainer=fake_trainer()) == 0
  sections = {sec.splitlines()[0]: sec for sec in
              (tmp_path / "results.md").read_text().split("### ")[1:]}
  sophia_lambda = next(v for k, v in sections.items() if k.startswith("Sophia-Lambda"))
  lavsm = next(v for k, v in sections.items() if k.startswith("LAVSM"))
  # Fake offsets: Sophia-Lambda -0.10 < LAMVS -0.02 < AdamW 0 < Sophia 0.05, the paper's
  # order; but LAVSM (+0.01) comes after AdamW and StableAdamW (0), against the paper.
  assert "The paper's ordering reproduces." in sophia_lambda
  assert "does not reproduce" in lavsm
  assert "Our ordering:   LAMVS < " in lavsm and lavsm.index("LAVSM < Lion") > 0


def test_summary_table_has_every_cost_column(fake_compare):
  root, _ = fake_compare
  report = tables.build_report(root)
  header = report["markdown_summary"].splitlines()[0]
  for col in ("Val loss", "vs AdamW", "tokens/s", "time to", "Opt-state MB",
              "Hessian overhead", "Peak memory GB"):
    assert col in header
  target = statistics.mean(_val("adamw", s) for s in range(3))
  assert math.isclose(report["target_loss"], target)
  rows = {r.split("|")[1].strip(): r for r in report["markdown_summary"].splitlines()[2:]}
  assert "5.0%" in rows["Sophia-Lambda"]
  assert "0/3 (1 failed)" in rows["LAMVS"]
  assert "not reached (3/3)" in rows["Lion"]
  # adamw reaches its own mean at its last eval (step 20): 20 steps x 0.10 s, for seeds 0-1
  assert tables.time_to_target(
      tables.read_metrics(root / "adamw/seed0/metrics.jsonl"), target) == pytest.approx(
          20 * STEP_TIMES["adamw"])


def test_write_report_is_deterministic_json(fake_compare):
  root, _ = fake_compare
  tables.write_report(root)
  first = (root / "results.json").read_text()
  tables.write_report(root)
  assert (root / "results.json").read_text() == first
  data = json.loads(first)
  assert data["protocol"] == "cpu"
  assert {r["status"] for r in data["runs"]} == {"done", "failed", "pending"}
  assert data["aggregates"]["adamw"]["final_val_loss"]["n"] == 3
  assert (root / "results.md").read_text().startswith("# Optimizer comparison")


def test_root_without_plan_is_read_from_run_directories(fake_compare):
  root, _ = fake_compare
  (root / "plan.json").unlink()
  _, records = tables.load_results(root)
  assert {r.spec.label for r in records} == {"adamw", "lion", "sophia_lambda"}


def test_empty_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="plan.json"):
    tables.load_results(tmp_path)


def test_claims_are_the_papers_numbers():
  sl = {c.optimizer: (c.val_loss, c.memory_gb) for c in paper_claims.SOPHIA_LAMBDA_TABLE1}
  assert sl == {"adamw": (4.927, 31.5), "sophia": (5.091, 39.7), "lamvs": (4.822, 37.2),
                "sophia_lambda": (4.675, 36.8)}
  lv = {c.optimizer: c.val_loss for c in paper_claims.LAVSM_TABLE1}
  assert lv == {"lamvs": 4.822, "lavsm": 4.899, "stable_adamw": 4.919, "adamw": 4.927,
                "lion": 6.114}
  with pytest.raises(ValueError, match="table"):
    paper_claims.claim_for("table2", "adamw")


def _agg(optimizer, unclipped=None):
  return {"optimizer": optimizer,
          "unclipped_fraction": tables.Stat(unclipped, None, 1) if unclipped is not None
          else None}


def test_the_paper_tables_take_an_in_band_configuration_over_one_outside_the_band():
  aggs = {"sophia": _agg("sophia", 0.58), "sophia/rho0.2": _agg("sophia", 0.31),
          "adamw": _agg("adamw")}
  assert tables._label_of(aggs, "sophia") == "sophia/rho0.2"
  assert tables._label_of(aggs, "adamw") == "adamw"
  # With none in band, the first in table order stands for the optimizer (and is marked).
  aggs["sophia/rho0.2"] = _agg("sophia", 0.7)
  assert tables._label_of(aggs, "sophia") == "sophia"
  assert tables._label_of(aggs, "lion") is None


def test_an_archive_gives_the_same_tables_and_restores_finished_runs(fake_compare, tmp_path):
  root, _ = fake_compare
  archive = tmp_path / "archive"
  # Evaluations every 5 steps of 20: windows of 5 keep the elapsed time at each of them and
  # the second-half unclipped fractions.
  assert tables.archive_runs(root, archive, every=5) == 9
  full, thin = tables.build_report(root), tables.build_report(archive)
  for label, agg in full["aggregates"].items():
    if not agg["finished"]:
      continue
    for key in ("final_val_loss", "unclipped_fraction", "time_to_target_s",
                "steps_to_target"):
      assert thin["aggregates"][label].get(key) == pytest.approx(agg.get(key)), (label, key)
  records = tables.read_metrics(archive / "adamw/seed0/metrics.jsonl")
  assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20]
  assert sum(r["step_time_s"] for r in records if "loss" in r) == pytest.approx(
      20 * STEP_TIMES["adamw"])
  _, restored = tables.load_results(archive)
  assert sum(r.status == "done" for r in restored) == 9


def test_report_names_the_commit_and_the_sweep_extensions(fake_compare):
  root, _ = fake_compare
  plan = json.loads((root / "plan.json").read_text())
  plan["code"] = {"commit": "5ec54f627502afc278855b059fe8dc36a4fc7d13", "dirty": False}
  plan["extensions"] = {"adamw": [0.012]}
  (root / "plan.json").write_text(json.dumps(plan))
  report = tables.write_report(root)
  data = json.loads((root / "results.json").read_text())
  assert data["code"]["commit"].startswith("5ec54f6")
  assert data["extensions"] == {"adamw": [0.012]}
  assert "Runs made by commit 5ec54f627502." in report["markdown"]


def test_report_without_a_recorded_commit_says_nothing_about_one(fake_compare):
  root, _ = fake_compare
  plan = json.loads((root / "plan.json").read_text())
  plan.pop("code", None)
  (root / "plan.json").write_text(json.dumps(plan))
  data = tables.build_report(root)
  assert data["code"] is None and "commit" not in data["markdown"]
