"""experiments/benchmarks/bench_cpu_throughput.py: variants run in their own processes with
their own settings, on the same batches as baseline, and the table compares them."""

import pytest

from experiments.benchmarks import bench_cpu_throughput as bench


def test_variants_run_in_their_own_process_on_baseline_s_trajectory():
  result = bench.benchmark(rounds=1, steps=2, only=["no-donation", "hugetlb"])
  variants = result["variants"]
  assert list(variants) == ["baseline", "no-donation", "hugetlb"]
  for name, entry in variants.items():
    assert "error" not in entry, (name, entry)
    assert entry["tokens_per_s"] > 0 and entry["rounds"] == 1
    assert 0 < entry["fraction_of_shape_ceiling"] and 0 < entry["fraction_of_matmul"]
    # Neither setting changes the numerics: the same init and batches give the same losses.
    assert entry["max_loss_diff"] == 0.0
  assert variants["baseline"]["speedup"] == 1.0
  table = bench.markdown(result)
  assert table.count("\n| ") == 4  # header + 3 variants
  assert "| hugetlb |" in table


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
    (["--from-json", "/nonexistent.json"], "--from-json /nonexistent.json"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err
