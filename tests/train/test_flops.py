"""FLOPs per token against a hand count for qwen-tiny, the peak table and MFU arithmetic."""

import types

import jax
import pytest

from sophia_lambda_jax.models import qwen
from sophia_lambda_jax.train import flops
from sophia_lambda_jax.train.config import TrainConfig

TINY = qwen.get_config("qwen-tiny")  # vocab 1024, hidden 64, 2 layers, 4 x 16 heads,
SEQ = 32                             # 2 KV heads, SwiGLU 192, tied
# Per layer: q 64x64 + k, v 64x32 each + o 64x64 + gate, up, down 64x192 each.
LAYER = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 192  # 49,152
N = 2 * LAYER + 64 * 1024                                # + the head: 163,840
ATTENTION = 12 * 2 * SEQ * 4 * 16                         # 12 L T d_attn = 49,152
MODEL = 6 * N + ATTENTION                                 # 1,032,192


def test_qwen_tiny_flops_per_token_by_hand():
  assert (LAYER, N, MODEL) == (49_152, 163_840, 1_032_192)
  assert flops.matmul_weights(TINY) == N
  assert flops.model_flops_per_token(TINY, SEQ) == MODEL


def test_matmul_weights_are_the_model_s_kernels_and_tied_head():
  leaves = jax.tree_util.tree_flatten_with_path(
      qwen.abstract_params(qwen.get_config("qwen-cpu")))[0]
  kernels = sum(leaf.size for path, leaf in leaves
                if jax.tree_util.keystr(path).endswith(("['kernel']", "['embedding']")))
  assert flops.matmul_weights(qwen.get_config("qwen-cpu")) == kernels


def test_estimator_flops_by_hand():
  # GNB: one backward below the head: 4 (N - head) + 8 L T d_attn.
  gnb = 4 * 2 * LAYER + 8 * 2 * SEQ * 4 * 16
  assert gnb == 425_984
  assert flops.estimate_flops_per_token(TINY, SEQ, "gnb") == gnb
  # Each micro-batch pulls its own back: the same per token with 4 of them.
  assert flops.estimate_flops_per_token(TINY, SEQ, "gnb", grad_accum=4) == gnb
  # Hutchinson: forward-over-reverse of the last micro-batch's gradient, 3x its FLOPs.
  assert flops.estimate_flops_per_token(TINY, SEQ, "hutchinson") == 3 * MODEL
  assert flops.estimate_flops_per_token(TINY, SEQ, "hutchinson", grad_accum=2) == 3 * MODEL / 2
  assert flops.estimate_flops_per_token(TINY, SEQ, None) == 0
  with pytest.raises(ValueError, match="estimator"):
    flops.estimate_flops_per_token(TINY, SEQ, "exact")


def test_step_flops_of_a_config():
  config = TrainConfig(model="qwen-tiny", optimizer="sophia_lambda", seq_len=SEQ)
  counted = flops.step_flops(config, TINY, config.resolve_optimizer().estimator)
  assert counted.model_per_token == MODEL and counted.refresh_per_token == 425_984
  assert counted.peak_flops_per_s > 0  # CPU: the matmul reference
  adamw = flops.step_flops(TrainConfig(model="qwen-tiny", seq_len=SEQ), TINY, None)
  assert adamw.refresh_per_token == 0


def test_mfu_arithmetic_and_summary():
  counted = flops.StepFlops(model_per_token=1e6, refresh_per_token=5e5, peak_flops_per_s=1e12)
  # 1000 tokens x 1e6 FLOPs in 10 ms: 1e11 FLOP/s of a 1e12 peak.
  assert counted.mfu(1000, 0.01) == pytest.approx(0.1)
  assert counted.mfu(1000, 0.01, refreshed=True) == pytest.approx(0.15)
  steady = [{"step": 2, "mfu": 0.1, "step_time_s": 1.0},
            {"step": 3, "mfu": 0.4, "step_time_s": 3.0, "refresh": True}]
  summary = counted.summary(steady)
  assert summary["mfu"] == pytest.approx((0.1 * 1 + 0.4 * 3) / 4)
  assert summary["flops_per_token"] == pytest.approx(1e6 + 5e5 / 2)
  unknown = counted._replace(peak_flops_per_s=None)
  assert unknown.mfu(1000, 0.01) is None
  assert unknown.summary([{"step": 2, "mfu": None, "step_time_s": 1.0}])["mfu"] is None


@pytest.mark.parametrize("kind, platform, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "gpu", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "gpu", "bfloat16", 756e12),
    ("NVIDIA H200", "gpu", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", "float32", 156e12),  # TF32
    ("TPU v4", "tpu", "float32", 275e12),                  # bfloat16 passes
    ("Tesla T4", "gpu", "bfloat16", None),
])
def test_peak_table(kind, platform, dtype, peak):
  device = types.SimpleNamespace(device_kind=kind, platform=platform)
  assert flops.device_peak_flops_per_s(device, dtype) == peak


def test_cpu_peak_is_measured_once_per_process():
  first = flops.peak_flops_per_s("float32")
  assert first > 1e8 and flops.peak_flops_per_s("float32") == first
