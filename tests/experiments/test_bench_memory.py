"""experiments/benchmarks/bench_memory.py: the compiled step's memory figure and the table
by optimizer (compile only, qwen-tiny)."""

import json

import jax
import jax.numpy as jnp
import pytest

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


def test_cli_prints_the_table_with_ratios_to_adamw_and_the_split(capsys, tmp_path):
  path = tmp_path / "memory.json"
  assert bench_memory.main(["--model", "qwen-tiny", "--batch-size", "2", "--seq-len", "16",
                            "--optimizers", "adamw,sophia_lambda", "--model-overrides",
                            '{"remat": "full"}', "--split", "--json", str(path)]) == 0
  out = capsys.readouterr().out
  assert "| sophia_lambda |" in out and "36.8" in out and "not a device measurement" in out
  assert "sophia_lambda / adamw step memory:" in out and '{"remat": "full"}' in out
  result = json.loads(path.read_text())
  rows = result["optimizers"]
  assert result["model_overrides"] == {"remat": "full"} and result["refresh"]
  assert rows["adamw"]["ratio_to_adamw"] == 1.0
  adamw, sophia_lambda = rows["adamw"]["bytes"], rows["sophia_lambda"]["bytes"]
  assert rows["sophia_lambda"]["ratio_to_adamw"] == sophia_lambda["total"] / adamw["total"]
  # Its state (m and one curvature value per block of 64) is smaller than AdamW's (m, v).
  assert sophia_lambda["argument"] < adamw["argument"]
  # The split: the parts add up to each total; only the Sophia family has a refresh part.
  split = result["split"]["optimizers"]
  for name, row in split.items():
    assert sum(row["parts"].values()) == row["total"] == rows[name]["bytes"]["total"]
    assert row["parts"]["weights and state"] == rows[name]["bytes"]["argument"]
  assert split["adamw"]["parts"]["Sophia refresh"] == 0
  assert split["adamw"]["no_refresh_total"] is None
  assert split["sophia_lambda"]["parts"]["Sophia refresh"] == (
      sophia_lambda["total"] - split["sophia_lambda"]["no_refresh_total"])
  assert result["split"]["small_vocab"] == 128  # qwen-tiny's 1,024 / 8
  assert "| total GB | weights and state | Sophia refresh |" in out


def test_no_refresh_and_overrides_change_what_is_compiled():
  """Without the refresh the Sophia-Lambda step is smaller; a smaller vocabulary shrinks
  the arguments (the embedding and its state)."""
  full = bench_memory.memory_table("qwen-tiny", 2, 16, optimizers=["sophia_lambda"])
  bare = bench_memory.memory_table("qwen-tiny", 2, 16, optimizers=["sophia_lambda"],
                                   refresh=False, model_overrides={"vocab_size": 512})
  full, bare = full["optimizers"]["sophia_lambda"]["bytes"], bare
  assert not bare["refresh"] and bare["model_overrides"] == {"vocab_size": 512}
  bare = bare["optimizers"]["sophia_lambda"]["bytes"]
  assert bare["total"] < full["total"] and bare["argument"] < full["argument"]


def test_baseline_ref_measures_another_commit(capsys):
  assert bench_memory.main(["--model", "qwen-tiny", "--batch-size", "2", "--seq-len", "16",
                            "--optimizers", "adamw", "--baseline-ref", "HEAD"]) == 0
  out = capsys.readouterr().out
  assert out.count("| adamw |") == 1 and "Library of HEAD (" in out


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", "nope"], "'nope'"),
    (["--model-overrides", "[1]"], "--model-overrides must be a JSON object"),
    (["--model-overrides", '{"remat": "some"}'], "remat"),
    (["--baseline-ref", "no-such-commit"], "is not a commit"),
])
def test_cli_bad_arguments_are_one_line(capsys, argv, message):
  assert bench_memory.main(["--model", "qwen-tiny", "--seq-len", "16", *argv]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and message in err
