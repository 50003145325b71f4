"""experiments/benchmarks/bench_cpu_throughput.py: variants run in their own processes with
their own settings, on the same batches as baseline, and the table compares them."""

import subprocess

import pytest

from experiments.benchmarks import bench_cpu_throughput as bench


def test_variants_run_in_their_own_process_against_another_commit():
  """Sophia-Lambda beside the baseline, both also on the committed library (HEAD, a
  temporary git worktree): every variant runs twice, the table compares the two, the
  refresh steps are timed apart, and the worktree is gone afterwards."""
  result = bench.benchmark(rounds=1, steps=10, only=["sophia_lambda"], baseline_ref="HEAD",
                           warmup_steps=1)
  variants = result["variants"]
  assert list(variants) == ["baseline", "sophia_lambda"]
  for name, entry in variants.items():
    assert "error" not in entry, (name, entry)
    assert entry["tokens_per_s"] > 0 and entry["rounds"] == 1
    assert 0 < entry["fraction_of_shape_ceiling"] and 0 < entry["fraction_of_matmul"]
  assert variants["baseline"]["speedup"] == 1.0 and variants["baseline"]["max_loss_diff"] == 0
  sophia = variants["sophia_lambda"]
  assert sophia["max_loss_diff"] is None  # another optimizer: no trajectory to compare
  # Steps 1..10 timed, the refresh at step 10 among them.
  assert sophia["refresh_step_s"] > 0 and sophia["plain_step_s"] > 0
  assert sophia["hessian_overhead"] > 0.5
  assert list(result["reference"]) == ["baseline", "sophia_lambda"]
  for name, ref in result["reference"].items():
    assert "error" not in ref, (name, ref)
    assert ref["new_over_ref"] == variants[name]["tokens_per_s"] / ref["tokens_per_s"]
    assert ref["max_loss_diff"] is not None
  assert "hessian_overhead" in result["reference"]["sophia_lambda"]
  assert len(result["baseline_commit"]) == 40
  listed = subprocess.run(["git", "-C", str(bench.ROOT), "worktree", "list"],
                          capture_output=True, text=True).stdout
  assert "slj-ref-" not in listed
  table = bench.markdown(result)
  assert table.count("\n| ") == 3 + 3  # header + 2 variants, twice
  assert "## Against HEAD" in table and "Hessian overhead" in table


def test_variant_environment():
  env = bench._variant_env("data=2")
  assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"].split()
  assert "GLIBC_TUNABLES" not in bench._variant_env("baseline")
  assert bench._variant_env("hugetlb")["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="unknown variant"):
    bench.benchmark(rounds=1, only=["turbo"])



@pytest.mark.parametrize("argv, message", [
    (["--only", "turbo"], "unknown variant"),
    (["--rounds", "0"], "--rounds and --steps must be >= 1"),
    (["--baseline-ref", "no-such-commit"], "is not a commit"),
    (["--from-json", "/nonexistent.json"], "--from-json /nonexistent.json"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err
