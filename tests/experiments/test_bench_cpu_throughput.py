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


def test_shape_ceiling_counts_the_forward_matmuls():
  from sophia_lambda_jax.models import qwen

  c = qwen.get_config("qwen-tiny")
  out = bench.shape_ceiling(c, 2, 16, "float32")
  m, h = 32, c.hidden_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  expected = (2 * m * c.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size)
              + 2 * m * h * c.vocab_size + 2 * c.num_layers * 2 * 2 * c.num_heads * 16 * 16
              * c.head_dim)
  assert out["forward_matmul_flops"] == expected
  assert out["flops_per_s"] > 0
