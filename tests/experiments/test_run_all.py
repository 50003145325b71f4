"""The benchmark collector: ratio functions, parsed output, goals, and the table."""

import sys
import textwrap

import pytest

from experiments.benchmarks import run_all


@pytest.mark.parametrize("value,goal,expected", [
    (0.5, "<= 0.55", True), (0.6, "<= 0.55", False), (1.2, ">= 1.0", True),
    (0.9, ">=1", False), (1.0, "< 1", False), (2.0, "> 1.5x", True), (1.0, None, None),
    (float("nan"), "<= 1", None), (1.0, "about 1", None)])
def test_check_goal(value, goal, expected):
  assert run_all.check_goal(value, goal) is expected


def test_normalise_accepts_the_documented_shapes():
  rows = run_all.normalise("bench_x", {"a": 0.5, "b": {"value": 2.0, "goal": ">= 1"},
                                       "c": [0.9, "<= 0.9"]})
  assert [(r.name, r.value, r.goal) for r in rows] == [
      ("a", 0.5, None), ("b", 2.0, ">= 1"), ("c", 0.9, "<= 0.9")]
  rows = run_all.normalise("bench_x", [{"name": "d", "value": 3, "goal": "> 2"}])
  assert rows[0] == run_all.Ratio("bench_x", "d", 3.0, "> 2")
  with pytest.raises(ValueError, match="bench_x"):
    run_all.normalise("bench_x", 1.0)


def test_run_bench_in_a_subprocess(tmp_path, monkeypatch):
  with_fn = tmp_path / "bench_fn.py"
  with_fn.write_text("def ratios():\n  return {'speed': {'value': 1.5, 'goal': '>= 1'}}\n")
  printing = tmp_path / "bench_print.py"
  printing.write_text("print('state ratio: 0.5x')\n")   # no ratios(): an error
  broken = tmp_path / "bench_broken.py"
  broken.write_text("def ratios():\n  raise SystemExit('no GPU')\n")
  assert run_all.has_ratios(with_fn) and not run_all.has_ratios(printing)
  assert run_all.discover(tmp_path) == [broken, with_fn, printing]
  rows, err, _ = run_all.run_bench(with_fn, 60, quick=True)
  assert err == "" and rows[0].value == 1.5 and rows[0].name == "speed"
  rows, err, _ = run_all.run_bench(printing, 60, quick=True)
  assert rows == [] and err == "defines no ratios()"
  rows, err, _ = run_all.run_bench(broken, 60, quick=True)
  assert rows == [] and "no GPU" in err
  table = run_all.format_table(
      [run_all.Ratio("bench_fn", "speed", 1.5, ">= 1"),
       run_all.Ratio("bench_z", "mem", 0.7, "<= 0.55")],
      {"bench_broken": err}, {"bench_fn": 1.0})
  assert "| bench_fn | speed | 1.500 | >= 1 | pass |" in table
  assert "| bench_z | mem | 0.700 | <= 0.55 | FAIL |" in table
  assert "bench_broken | (no ratios)" in table
