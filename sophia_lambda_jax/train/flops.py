"""Model FLOPs of a train step and its model FLOPs utilisation (MFU); docs/design.md section 7.1.

Per token of a step's batch (L layers, T = seq_len, d_attn = num_heads * head_dim, A =
grad_accum):

    model      6 N + 12 L T d_attn                 forward 2 N + 4 L T d_attn, backward twice
    GNB        4 (N - N_head) + 8 L T d_attn       one extra backward below the head per
               on a refresh step                   micro-batch, from the step's own forward
    Hutchinson 3 (6 N + 12 L T d_attn) / A         forward-over-reverse of the last
               on a refresh step                   micro-batch's gradient: each product of
                                                   the gradient becomes three

N counts the weights that multiply each token: every block's projections and MLP, plus the
LM head's hidden x vocab (the embedding is a lookup; biases and norms are elementwise and
left out), so for a tied model N is the parameter count less biases and norms. Attention
is counted over the whole T x T score matrix, as PaLM's MFU does (Chowdhery et al. 2022,
appendix B), causal mask or not. The optimizer's own elementwise work (O(parameters) per
step, not per token) and rematerialisation are not model FLOPs.

MFU = model FLOPs of the step / step time / peak. Peaks: a table of accelerators' dense
bfloat16 FLOP/s per device (`BF16_PEAK_FLOPS`; float32 matmuls run as TF32 on NVIDIA GPUs,
half of it, and as bfloat16 passes on TPUs, the same); on CPU, the measured FLOP/s of a
square matmul in the compute dtype, the reference of experiments/benchmarks/
bench_train_step.py, timed once per process (about 0.3 s); other devices: no peak, no MFU.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Dense (not sparse) bfloat16 matrix FLOP/s of one chip from the vendors' datasheets
# (NVIDIA's tables print the sparse figure, twice these). The first pattern found in the
# lowercased `device_kind` wins, so the more specific ones come first.
BF16_PEAK_FLOPS = (
    ("h200 nvl", 835e12), ("h200", 989e12),
    ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12), ("tpu v5 lite", 197e12), ("tpu v5", 459e12), ("tpu v6 lite", 918e12),
)


def matmul_weights(model_config) -> int:
  """N: the weights that multiply each token (blocks' projections and MLP, the LM head)."""
  c = model_config
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size \
      + 3 * c.hidden_size * c.intermediate_size
  return c.num_layers * per_layer + c.hidden_size * c.vocab_size


def _attention_flops(model_config, seq_len: int) -> int:
  """Forward FLOPs per token of the scores and the weighted values: 4 L T d_attn."""
  c = model_config
  return 4 * c.num_layers * seq_len * c.num_heads * c.head_dim


def model_flops_per_token(model_config, seq_len: int) -> int:
  """Forward and backward: 6 N + 12 L T d_attn."""
  return 6 * matmul_weights(model_config) + 3 * _attention_flops(model_config, seq_len)


def estimate_flops_per_token(model_config, seq_len: int, estimator: str | None,
                             grad_accum: int = 1) -> float:
  """Extra FLOPs per token of a step's batch on a step that refreshes the curvature
  estimate (see the module docstring); 0 for first-order optimizers."""
  if estimator is None:
    return 0.0
  model = model_flops_per_token(model_config, seq_len)
  if estimator == "hutchinson":
    return 3 * model / grad_accum
  if estimator == "gnb":
    head = model_config.hidden_size * model_config.vocab_size
    return 4 * (matmul_weights(model_config) - head) + 2 * _attention_flops(model_config,
                                                                            seq_len)
  raise ValueError(f"estimator must be None, 'gnb' or 'hutchinson', got {estimator!r}")


_matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))


def matmul_flops_per_s(dtype: str, n: int = 1024, repeats: int = 20) -> float:
  """Best-of-`repeats` FLOP/s of a jitted (n, n) @ (n, n) matmul (2 n^3 FLOPs) in `dtype`,
  after one untimed call."""
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32).astype(dtype)
  jax.block_until_ready(_matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(_matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


@functools.cache
def _cpu_matmul_flops_per_s(dtype: str) -> float:
  return matmul_flops_per_s(dtype, repeats=5)


def device_peak_flops_per_s(device, compute_dtype: str) -> float | None:
  """Dense peak of one accelerator from `BF16_PEAK_FLOPS` in `compute_dtype` (float32: TF32
  on a GPU, half the bfloat16 figure; bfloat16 passes on a TPU), None when it is not in the
  table."""
  kind = device.device_kind.lower()
  for name, bfloat16 in BF16_PEAK_FLOPS:
    if name in kind:
      return bfloat16 / 2 if compute_dtype == "float32" and device.platform == "gpu" \
          else bfloat16
  return None


def peak_flops_per_s(compute_dtype: str) -> float | None:
  """Peak FLOP/s of all the run's devices: their table entries summed; on CPU the
  matmul reference of this process times the number of processes (the simulated devices
  of one process share its cores); None when a device's peak is unknown."""
  devices = jax.devices()
  if all(d.platform == "cpu" for d in devices):
    return _cpu_matmul_flops_per_s(compute_dtype) * jax.process_count()
  peaks = [device_peak_flops_per_s(d, compute_dtype) for d in devices]
  return None if None in peaks else float(sum(peaks))


class StepFlops(NamedTuple):
  """The FLOPs per token of a run's steps and the devices' peak (`step_flops`)."""
  model_per_token: float
  refresh_per_token: float  # extra on a step that refreshes the curvature estimate
  peak_flops_per_s: float | None

  def per_token(self, refreshed: bool) -> float:
    return self.model_per_token + (self.refresh_per_token if refreshed else 0.0)

  def mfu(self, tokens: int, seconds: float, refreshed: bool = False) -> float | None:
    """Model FLOPs of a step of `tokens` tokens over `seconds`, as a fraction of the peak."""
    if not self.peak_flops_per_s or seconds <= 0:
      return None
    return self.per_token(refreshed) * tokens / seconds / self.peak_flops_per_s

  def summary(self, steady: list[dict[str, Any]]) -> dict[str, float | None]:
    """`mfu`: the steps' model FLOPs over their time and the peak (the time-weighted mean
    of the records' mfu); `flops_per_token`: their mean FLOPs per token, each refresh
    counted on its step (the estimate's cost amortised over the refreshes made)."""
    timed = [r for r in steady if r.get("mfu") is not None and r.get("step_time_s")]
    seconds = sum(r["step_time_s"] for r in timed)
    refreshed = sum(bool(r.get("refresh")) for r in steady)
    per_token = self.model_per_token + (
        self.refresh_per_token * refreshed / len(steady) if steady else 0.0)
    return {"mfu": sum(r["mfu"] * r["step_time_s"] for r in timed) / seconds if seconds
            else None,
            "flops_per_token": per_token}


def step_flops(config, model_config, estimator: str | None) -> StepFlops:
  """The StepFlops of a `TrainConfig` training `model_config` with curvature `estimator`
  (its resolved optimizer's) on this process's devices."""
  return StepFlops(
      float(model_flops_per_token(model_config, config.seq_len)),
      float(estimate_flops_per_token(model_config, config.seq_len, estimator,
                                     config.grad_accum)),
      peak_flops_per_s(config.compute_dtype))
