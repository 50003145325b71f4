"""experiments/gpu_check.py: the smoke run end to end (subprocess, as on a device machine),
and its parts that decide what is reported: peak lookup, the unclipped fraction, budgets,
the missing-package line."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_a_complete_report(tmp_path):
  out = tmp_path / "check"
  # One CPU device, as the check sees one GPU (the tests' 8 simulated devices only split
  # the cores).
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--smoke", "--out",
                         str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "report.json").read_text())
  assert report["smoke"] and report["finished"]
  assert report["environment"]["python"] == sys.version.split()[0]
  sections = report["sections"]
  assert {name: s["status"] for name, s in sections.items()} == {
      "throughput": "done", "memory": "done", "comparison": "done"}

  tp = sections["throughput"]
  assert tp["device_kind"] == "cpu"
  assert tp["mfu"] == {"adamw": None, "sophia_lambda": None}
  assert tp["peak_bf16_flops_per_s"] is None and "'cpu'" in tp["peak_note"]
  assert tp["goals"]["adamw_mfu"] == {"value": None, "goal": ">= 0.45", "pass": None}
  ratio = tp["goals"]["sophia_lambda_over_adamw"]
  assert ratio["value"] > 0 and ratio["pass"] == (ratio["value"] <= 1.07)
  assert tp["cycles_timed"] == tp["cycles_requested"] == gpu_check.SMOKE.cycles
  for row in tp["optimizers"].values():
    tokens = gpu_check.SMOKE.batch_size * gpu_check.SMOKE.seq_len
    assert math.isclose(row["tokens_per_s"], tokens / (row["step_ms"] / 1e3))

  rows = sections["memory"]["table"]["optimizers"]
  assert list(rows) == ["adamw", "sophia", "lamvs", "sophia_lambda"]
  assert rows["adamw"]["ratio_to_adamw"] == 1.0
  for name, row in rows.items():
    assert row["gb"] > 0 and math.isclose(row["ratio_to_adamw"] * rows["adamw"]["gb"],
                                          row["gb"])
    assert row["paper_gb"] == {"adamw": 31.5, "sophia": 39.7, "lamvs": 37.2,
                               "sophia_lambda": 36.8}[name]
  # AdamW's and Sophia-Lambda's steps are section 1's, the other two compiled here.
  assert rows["sophia_lambda"]["source"] == "section 1's compiled step"
  assert rows["lamvs"]["source"] == "compiled here"
  assert "not a device measurement" in sections["memory"]["table"]["measurement"]
  attention = sections["memory"]["attention"]
  assert attention["kernel"] == "xla" and "GPUs only" in attention["note"]

  runs = sections["comparison"]["runs"]
  assert list(runs) == ["adamw", "sophia", "sophia_lambda"]
  assert runs["adamw"]["unclipped_fraction"] is None
  for name in ("sophia", "sophia_lambda"):
    fraction = runs[name]["unclipped_fraction"]
    assert 0.0 <= fraction <= 1.0
    assert runs[name]["unclipped_in_band"] == (0.10 <= fraction <= 0.50)
  for run in runs.values():
    assert math.isfinite(run["final_val_loss"])
    assert run["steps"] == gpu_check.SMOKE.compare_steps[0]
  assert not (out / "runs" / "adamw" / "checkpoints").exists()

  md = (out / "report.md").read_text()
  for text in ("MFU", "device kind 'cpu'", "| sophia_lambda |", "x AdamW", "31.5",
               "Attention: the model uses `xla` here (cpu)",
               "unclipped fraction", "Python " + sys.version.split()[0], "Verdict:"):
    assert text in md, text


def test_attention_check_compares_the_kernels_on_a_gpu(monkeypatch):
  """On a GPU backend the check compares cuDNN's attention with the XLA one (here a
  stand-in for cuDNN: the XLA attention itself) and renders the comparison."""
  import jax

  from sophia_lambda_jax.models import qwen

  monkeypatch.setattr(qwen.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(qwen, "_cudnn_compiles", lambda *shapes: True)
  monkeypatch.setattr(qwen, "cudnn_attention", jax.jit(qwen.causal_attention))
  result = gpu_check.attention_check(gpu_check.SMOKE)
  assert result["kernel"] == "cudnn" and result["cudnn_compiles"]
  assert result["shape_q"] == [2, 32, 4, 16]
  # The same attention compiled twice: bfloat16 rounding apart.
  assert result["output_max_abs_diff"] == 0 and max(result["grads_max_rel_diff"]) < 0.01
  assert result["gradient_memory_gb"]["cudnn"] > 0
  report = {"smoke": True, "started": "", "finished": "", "elapsed_s": 1, "budget_s": 1,
            "command": "", "environment": {}, "sections": {"memory": {
                "status": "done", "table": {"optimizers": {}, "skipped": {}, "grad_accum": 1,
                                            "model": "qwen-tiny", "batch_size": 4,
                                            "seq_len": 32, "compute_dtype": "bfloat16",
                                            "formula": "", "measurement": "",
                                            "device_kind": "gpu"},
                "batch_note": "", "attention": result}}}
  assert "cuDNN against the XLA attention" in gpu_check.render_markdown(report)


def test_bf16_peak_by_device_kind():
  assert gpu_check.bf16_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
  assert gpu_check.bf16_peak("NVIDIA H100 PCIe")[0] == 756e12
  assert gpu_check.bf16_peak("NVIDIA H200")[0] == 989e12
  assert gpu_check.bf16_peak("NVIDIA H200 NVL")[0] == 835e12
  assert gpu_check.bf16_peak("NVIDIA A100-SXM4-80GB")[0] == 312e12
  peak, why = gpu_check.bf16_peak("Tesla T4")
  assert peak is None and "'Tesla T4'" in why


def test_unclipped_fraction_averages_the_second_half():
  records = [{"step": s, "clip_fraction": 0.9 if s <= 5 else 0.6} for s in range(1, 11)]
  records.append({"step": 10, "val_loss": 3.0})
  assert math.isclose(gpu_check.unclipped_fraction(records, 10), 0.4)
  assert gpu_check.unclipped_fraction([{"step": 9, "loss": 1.0}], 10) is None


def test_deadlines_share_the_budget_in_order():
  d = gpu_check.section_deadlines(100.0, 300.0, ["throughput", "comparison"])
  assert math.isclose(d["comparison"], 400.0)
  assert math.isclose(d["throughput"] - 115.0, 285.0 / 2)


def test_sections_past_their_deadline_skip_their_work(tmp_path):
  from experiments.benchmarks import bench_memory

  table = bench_memory.memory_table("qwen-tiny", 2, 16, deadline=time.perf_counter() - 1)
  assert table["optimizers"] == {} and set(table["skipped"]) == set(bench_memory.OPTIMIZERS)
  ctx = gpu_check.Context(gpu_check.SMOKE, tmp_path, time.perf_counter() - 1, {})
  result = gpu_check.comparison(ctx)
  assert result["runs"] == {} and set(result["skipped"]) == set(gpu_check.COMPARE_OPTIMIZERS)
  assert result["verdict"].startswith("no verdict")
  assert not (tmp_path / "runs").exists()


def test_a_missing_package_is_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(gpu_check, "REQUIRED_MODULES",
                      {"json": "json", "no_such_module_for_gpu_check": "no-such-package"})
  assert gpu_check.main(["--out", str(tmp_path / "x")]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "no-such-package" in err and "json" not in err.split(":")[1]
  assert not (tmp_path / "x").exists()


def test_unknown_section_is_a_usage_error(tmp_path):
  with pytest.raises(SystemExit) as e:
    gpu_check.main(["--out", str(tmp_path), "--sections", "throughput,speed"])
  assert e.value.code == 2


def test_comparison_steps_are_sized_from_section_1(tmp_path):
  plan = gpu_check.FULL
  measured = {"throughput": {
      "model": plan.model, "batch_size": plan.batch_size, "seq_len": plan.seq_len,
      "optimizers": {"adamw": {"step_ms": 40.0, "compile_s": 20.0},
                     "sophia_lambda": {"step_ms": 50.0, "compile_s": 30.0}}}}

  def steps(seconds_left, sections):
    ctx = gpu_check.Context(plan, tmp_path, time.perf_counter() + seconds_left, sections)
    return gpu_check._compare_steps(ctx, runs=3)[0]

  # 100 s per run, less 30 s compile and the overhead, at the slower 50 ms per step.
  expected = int((100 - 30 - gpu_check.RUN_OVERHEAD_S) / 0.05) // 10 * 10
  assert steps(300, measured) in (expected, expected - 10)
  assert steps(30, measured) == plan.compare_steps[0]
  assert steps(1e6, measured) == plan.compare_steps[2]
  assert steps(300, {}) == plan.compare_steps[1]
