"""Forward+backward throughput of the Flax Qwen2 against transformers' PyTorch Qwen2.

    python -m experiments.benchmarks.bench_model [--model qwen-cpu] [--batch-size 8]
        [--seq-len 256] [--steps 10] [--repeats 3] [--compute-dtype float32] [--scan]

Both sides run the same config and the same weights (the JAX model is exported with
`to_hf` and loaded by `Qwen2ForCausalLM.from_pretrained`), the same batch, and the same
loss (mean next-token cross-entropy over batch x seq tokens: optax's
`softmax_cross_entropy_with_integer_labels`, `torch.nn.functional.cross_entropy`), and
compute the gradient of every parameter: JAX with one jitted `jax.value_and_grad`,
PyTorch with `loss.backward()` (eager, SDPA attention, `torch.set_num_threads` = the CPU
count). The losses of both are
printed so a mismatch shows. Timing alternates the two frameworks in `repeats` rounds of
`steps` steps and reports the median step time of each, so a teammate's job that slows the
machine for a while hurts both about equally. JAX compile time (lower + compile) is
reported separately and is not part of the step time.

Goal: JAX tokens/s >= 1.0 x PyTorch's on qwen-cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sophia_lambda_jax.models import hf, qwen


def _jax_step(config: qwen.QwenConfig, seed: int):
  model = qwen.Qwen(config, rngs=nnx.Rngs(seed))
  graphdef, params = qwen.split_params(model)

  def loss_fn(params, ids):
    logits = qwen.apply(graphdef, params, ids[:, :-1])
    # optax's integer-label cross-entropy; -take_along_axis(log_softmax(logits)) computes
    # the same loss but its gradient is a scatter into the logits, much slower on XLA:CPU
    # (see docs/decisions.md, 2026-11-23: the benchmark's loss is optax's integer-label
    # cross-entropy).
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  return model, params, jax.jit(jax.value_and_grad(loss_fn))


def _torch_step(model, torch):
  def step(ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.item()
  return step


def measure(model_name: str = "qwen-cpu", batch_size: int = 8, seq_len: int = 256,
            steps: int = 10, repeats: int = 3, compute_dtype: str = "float32",
            scan_layers: bool = False, seed: int = 0) -> dict:
  """Step times and tokens/s of both frameworks; see the module docstring."""
  import torch  # only the benchmark needs torch
  import transformers

  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  config = qwen.get_config(model_name, compute_dtype=compute_dtype, scan_layers=scan_layers)
  ids = np.random.default_rng(seed).integers(0, config.vocab_size,
                                             size=(batch_size, seq_len + 1)).astype(np.int32)
  tokens = batch_size * seq_len

  model, params, jax_step = _jax_step(config, seed)
  ids_jax = jnp.asarray(ids)
  start = time.perf_counter()
  compiled = jax_step.lower(params, ids_jax).compile()
  compile_s = time.perf_counter() - start
  jax_loss, grads = compiled(params, ids_jax)
  jax.block_until_ready(grads)

  with tempfile.TemporaryDirectory() as tmp:
    hf.to_hf(model, tmp)
    torch_model = transformers.Qwen2ForCausalLM.from_pretrained(
        tmp, dtype=torch.bfloat16 if compute_dtype == "bfloat16" else torch.float32,
        attn_implementation="sdpa")
  torch_model.train()
  torch_step = _torch_step(torch_model, torch)
  ids_torch = torch.tensor(ids, dtype=torch.long)
  start = time.perf_counter()
  torch_loss = torch_step(ids_torch)  # first call: allocator and kernel warm-up
  torch_first_s = time.perf_counter() - start

  def time_jax():
    start = time.perf_counter()
    for _ in range(steps):
      out = compiled(params, ids_jax)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps

  def time_torch():
    start = time.perf_counter()
    for _ in range(steps):
      torch_step(ids_torch)
    return (time.perf_counter() - start) / steps

  jax_times, torch_times = [], []
  for _ in range(repeats):
    jax_times.append(time_jax())
    torch_times.append(time_torch())
  jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
  return {
      "model": model_name, "params": qwen.count_params(config), "batch_size": batch_size,
      "seq_len": seq_len, "tokens_per_step": tokens, "compute_dtype": compute_dtype,
      "scan_layers": scan_layers, "steps": steps, "repeats": repeats, "threads": threads,
      "jax_compile_s": compile_s, "torch_first_step_s": torch_first_s,
      "jax_step_s": jax_s, "torch_step_s": torch_s,
      "jax_step_s_all": jax_times, "torch_step_s_all": torch_times,
      "jax_tokens_per_s": tokens / jax_s, "torch_tokens_per_s": tokens / torch_s,
      "speedup": torch_s / jax_s,
      "jax_loss": float(jax_loss), "torch_loss": float(torch_loss),
      "jax": jax.__version__, "torch": torch.__version__,
      "transformers": transformers.__version__,
  }


def ratios() -> dict:
  """For experiments.benchmarks.run_all."""
  quick = bool(os.environ.get("SLJ_BENCH_QUICK"))
  r = measure(steps=3 if quick else 10, repeats=2 if quick else 3)
  return {
      "qwen-cpu fwd+bwd tokens/s, JAX / PyTorch": {"value": r["speedup"], "goal": ">= 1.0"},
      "qwen-cpu JAX compile s": r["jax_compile_s"],
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="qwen-cpu", choices=sorted(qwen.PRESETS))
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
  parser.add_argument("--repeats", type=int, default=3, help="alternating timing rounds")
  parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--scan", action="store_true", help="scanned layers")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args(argv)
  r = measure(args.model, args.batch_size, args.seq_len, args.steps, args.repeats,
              args.compute_dtype, args.scan)
  print(f"{r['model']} ({r['params']:,} params), batch {r['batch_size']} x seq "
        f"{r['seq_len']} = {r['tokens_per_step']} tokens/step, {r['compute_dtype']}, "
        f"{'scanned' if r['scan_layers'] else 'unrolled'} layers, {r['threads']} threads")
  print(f"  loss  JAX {r['jax_loss']:.5f}  PyTorch {r['torch_loss']:.5f}  (same weights)")
  print(f"  JAX     {r['jax_step_s'] * 1e3:8.1f} ms/step  {r['jax_tokens_per_s']:10,.0f} "
        f"tokens/s   (compile {r['jax_compile_s']:.2f} s, not included)")
  print(f"  PyTorch {r['torch_step_s'] * 1e3:8.1f} ms/step  {r['torch_tokens_per_s']:10,.0f} "
        f"tokens/s   (first step {r['torch_first_step_s']:.2f} s, not included)")
  print(f"JAX / PyTorch tokens/s: {r['speedup']:.2f}x (goal >= 1.0)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(r, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
