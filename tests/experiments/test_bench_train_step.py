"""experiments/benchmarks/bench_train_step.py on a tiny model: the timed steps line up with
Sophia-Lambda's refresh cycles, the reported ratio is the one of the cycle times, and a
spent time budget stops the timing at a cycle boundary. (Two and more timed cycles are
exercised by tests/experiments/test_gpu_check.py.)"""

import math

from experiments.benchmarks import bench_train_step


def test_benchmark_times_whole_refresh_cycles_within_its_budget():
  result = bench_train_step.benchmark(model="qwen-tiny", batch_size=2, seq_len=16,
                                      cycles=3, compute_dtype="float32", time_budget_s=0.0)
  assert result["cycles_requested"] == 3 and result["cycles"] == 1  # budget spent at once
  sophia, adamw = result["sophia_lambda"], result["adamw"]
  assert sophia["refresh_steps"] == 1
  assert sophia["plain_steps"] == bench_train_step.INTERVAL - 1
  assert "refresh_steps" not in adamw
  for entry in (sophia, adamw):
    assert entry["cycle_step_s"] > 0 and entry["mean_step_s"] > 0 and entry["compile_s"] > 0
    assert math.isclose(entry["tokens_per_s"], 2 * 16 / entry["cycle_step_s"])
    memory = entry["memory"]
    assert memory["total"] == (memory["argument"] + memory["output"] - memory["alias"]
                               + memory["temp"]) > 0
  assert math.isclose(result["sophia_lambda_over_adamw"],
                      sophia["cycle_step_s"] / adamw["cycle_step_s"])
  assert 0 < result["adamw"]["fraction_of_matmul_flops"]
  assert 0 < result["adamw"]["fraction_of_shape_ceiling"]


def test_shape_ceiling_counts_the_forward_matmuls():
  from sophia_lambda_jax.models import qwen

  c = qwen.get_config("qwen-tiny")
  out = bench_train_step.shape_ceiling(c, 2, 16, "float32")
  m, h = 32, c.hidden_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  expected = (2 * m * c.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size)
              + 2 * m * h * c.vocab_size + 2 * c.num_layers * 2 * 2 * c.num_heads * 16 * 16
              * c.head_dim)
  assert out["forward_matmul_flops"] == expected
  assert out["flops_per_s"] > 0
