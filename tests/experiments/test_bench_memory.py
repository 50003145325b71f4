"""experiments/benchmarks/bench_memory.py: the compiled step's memory figure and the table
by optimizer (compile only, qwen-tiny)."""

import json

import jax
import jax.numpy as jnp

from experiments.benchmarks import bench_memory
from sophia_lambda_jax.train.loop import compiled_memory


def test_compiled_memory_counts_donated_inputs_once():
  x = jnp.zeros((1000,), jnp.float32)
  plain = compiled_memory(jax.jit(lambda a: a * 2).lower(x).compile())
  donated = compiled_memory(
      jax.jit(lambda a: a * 2, donate_argnums=0).lower(x).compile())
  for m in (plain, donated):
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
    assert m["argument"] >= 4000 and m["output"] >= 4000
  assert donated["alias"] >= 4000 and donated["total"] <= plain["total"] - 4000


def test_cli_prints_the_table_with_ratios_to_adamw(capsys, tmp_path):
  path = tmp_path / "memory.json"
  assert bench_memory.main(["--model", "qwen-tiny", "--batch-size", "2", "--seq-len", "16",
                            "--optimizers", "adamw,sophia_lambda", "--json",
                            str(path)]) == 0
  out = capsys.readouterr().out
  assert "| sophia_lambda |" in out and "36.8" in out and "not a device measurement" in out
  assert "sophia_lambda / adamw step memory:" in out
  rows = json.loads(path.read_text())["optimizers"]
  assert rows["adamw"]["ratio_to_adamw"] == 1.0
  adamw, sophia_lambda = rows["adamw"]["bytes"], rows["sophia_lambda"]["bytes"]
  assert rows["sophia_lambda"]["ratio_to_adamw"] == sophia_lambda["total"] / adamw["total"]
  # Its state (m and one curvature value per block of 64) is smaller than AdamW's (m, v).
  assert sophia_lambda["argument"] < adamw["argument"]


def test_cli_bad_optimizer_is_one_line(capsys):
  assert bench_memory.main(["--model", "qwen-tiny", "--seq-len", "16", "--optimizers",
                            "nope"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "'nope'" in err
