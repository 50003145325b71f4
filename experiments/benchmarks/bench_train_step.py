"""Train-step time of Sophia-Lambda against AdamW over full Hessian refresh cycles.

    python -m experiments.benchmarks.bench_train_step [--model qwen-cpu] [--batch-size 8]
        [--seq-len 256] [--cycles 12] [--compute-dtype bfloat16] [--data builtin]
        [--mesh data=1,fsdp=1]

Both optimizers run the real jitted step of `slj train` (`train.program.TrainProgram`: forward,
backward, global-norm clipping, the optimizer update, and for Sophia-Lambda the
Gauss-Newton-Bartlett estimate that reuses the step's forward pass), on the same model,
batch and mesh. Sophia-Lambda uses a fixed refresh interval of 10, so every cycle of 10
steps holds one refresh step (its first) and 9 plain ones.

After one warm-up cycle each, the two optimizers take turns step by step (AdamW then
Sophia-Lambda, then the other order) for `cycles` cycles, each step timed to completion:
steps taken a fraction of a second apart see the same state of a shared machine. A cycle's
time is the mean over its 10 positions of that position's median over the cycles (the
median drops steps that a burst of other work hit); the ratio of the two is the result.
The plain mean over all timed steps is reported too, as are the median refresh and plain
step times. Batches are on the device before timing (the loader is benchmarked in
bench_loader.py).

Achieved FLOP/s counts the model FLOPs of a step, 6 N + 12 L T d_attn per token
(`train.flops.model_flops_per_token`: N the weights that multiply each token, LM head
included, L layers, T the sequence length, d_attn = heads x head_dim; the extra backward of
a refresh is not counted), and is divided by the machine's measured FLOP/s of a jitted
square matmul in the compute dtype (`train.flops.matmul_flops_per_s`, the reference of
`slj train`'s MFU on CPU), and by the model's own
forward matmul shapes at this batch (`shape_ceiling`): small matmuls
cannot reach a large one's FLOP/s, so the second is the step's real ceiling.

With `time_budget_s` the timed cycles stop at the first cycle boundary after that many
seconds from the call (compiles and warm-up included; at least one cycle is timed), and
`cycles` in the result is the number timed. Each optimizer's entry also holds its compiled
step's memory (`train.program.compiled_memory`).

Goal: sophia_lambda mean step time <= 1.07 x adamw's.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sophia_lambda_jax import data as data_lib
from sophia_lambda_jax.train import mesh as mesh_lib
from sophia_lambda_jax.train.config import TrainConfig
from sophia_lambda_jax.train.flops import matmul_flops_per_s, model_flops_per_token
from sophia_lambda_jax.train.program import ModelFunctions, TrainProgram, compiled_memory

INTERVAL = 10


_matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))


def best_time(fn, *args, repeats: int = 20) -> float:
  """Fastest of `repeats` timed calls of fn(*args), after one untimed call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def shape_ceiling(model_config, batch: int, seq: int, dtype: str) -> dict:
  """FLOP/s of the model's forward matmuls (projections, MLP, tied head and attention) at
  this batch, each shape timed alone, FLOP-weighted: the ceiling for matmuls this small."""
  c = model_config
  m, h = batch * seq, c.hidden_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  # (count per forward, lhs shape, rhs shape): per layer q/k/v/o, gate/up/down; the head.
  shapes = [(c.num_layers, (m, h), (h, q)), (2 * c.num_layers, (m, h), (h, kv)),
            (c.num_layers, (m, q), (q, h)), (2 * c.num_layers, (m, h), (h, c.intermediate_size)),
            (c.num_layers, (m, c.intermediate_size), (c.intermediate_size, h)),
            (1, (m, h), (h, c.vocab_size))]
  key = jax.random.PRNGKey(0)
  flops = seconds = 0.0
  for count, a_shape, b_shape in shapes:
    a = jax.random.normal(key, a_shape).astype(dtype)
    b = jax.random.normal(key, b_shape).astype(dtype)
    flops += count * 2 * a_shape[0] * a_shape[1] * b_shape[1]
    seconds += count * best_time(_matmul, a, b)
  # Attention scores and values: per (batch, head) a (seq, head_dim) x (head_dim, seq) and
  # a (seq, seq) x (seq, head_dim) matmul.
  scores = jax.jit(lambda x, y: jnp.einsum("bqd,bkd->bqk", x, y,
                                           preferred_element_type=jnp.float32))
  x = jax.random.normal(key, (batch * c.num_heads, seq, c.head_dim)).astype(dtype)
  flops += 2 * c.num_layers * 2 * batch * c.num_heads * seq * seq * c.head_dim
  seconds += 2 * c.num_layers * best_time(scores, x, x)
  return {"flops_per_s": flops / seconds, "forward_matmul_flops": flops}


def model_flops_per_step(model_config, batch_size: int, seq_len: int) -> float:
  return model_flops_per_token(model_config, seq_len) * batch_size * seq_len


class _Runner:
  """One optimizer's compiled step, state and device-resident batches."""

  def __init__(self, config: TrainConfig, mesh, batches):
    self.model = ModelFunctions(config, mesh)
    self.program = TrainProgram(config, self.model, mesh)
    t0 = time.perf_counter()
    self.step_fn = self.program.compile()
    self.compile_s = time.perf_counter() - t0
    self.state = self.program.fresh_state()
    self.batches = [mesh_lib.global_batch(b, self.program.batch_sharding,
                                          self.program.batch_shape) for b in batches]
    self.t = 0

  def run(self, n: int) -> tuple[list[float], list[bool]]:
    """n steps, each timed to completion; returns step times and refresh flags."""
    times, refreshes = [], []
    for _ in range(n):
      batch = self.batches[self.t % len(self.batches)]
      t0 = time.perf_counter()
      self.state, metrics = self.step_fn(self.state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
      refreshes.append(bool(metrics.get("refresh", False)))
      self.t += 1
    return times, refreshes


def benchmark(model: str = "qwen-cpu", batch_size: int = 8, seq_len: int = 256,
              cycles: int = 12, compute_dtype: str = "bfloat16",
              data: str = "builtin", mesh: str = "data=1,fsdp=1",
              time_budget_s: float | None = None) -> dict:
  start = time.perf_counter()
  common = dict(model=model, batch_size=batch_size, seq_len=seq_len, steps=1000, data=data,
                mesh=mesh, compute_dtype=compute_dtype, eval_every=0)
  configs = {
      "adamw": TrainConfig(optimizer="adamw", **common),
      "sophia_lambda": TrainConfig(
          optimizer="sophia_lambda",
          optimizer_kwargs={"hessian_interval": INTERVAL, "adaptive_interval": False},
          **common),
  }
  device_mesh = mesh_lib.make_mesh(mesh)
  probe = ModelFunctions(configs["adamw"], device_mesh)
  loader = data_lib.TokenBatches(data_lib.resolve_data(data), "train", batch_size, seq_len,
                                 seed=0, vocab_size=probe.config.vocab_size)
  host_batches = [loader.batch(i) for i in range(4)]
  runners = {name: _Runner(c, device_mesh, host_batches) for name, c in configs.items()}
  for runner in runners.values():
    runner.run(INTERVAL)  # warm-up: the first refresh cycle (steps 0..9)

  times = {name: [] for name in runners}
  flags = {name: [] for name in runners}
  names = list(runners)
  timed = 0
  for cycle in range(cycles):
    if timed and time_budget_s is not None and time.perf_counter() - start > time_budget_s:
      break
    for step in range(cycle * INTERVAL, (cycle + 1) * INTERVAL):
      for name in (names if step % 2 == 0 else names[::-1]):
        t, f = runners[name].run(1)
        times[name] += t
        flags[name] += f
    timed += 1

  params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(probe.abstract_params)))
  flops_step = model_flops_per_step(probe.config, batch_size, seq_len)
  peak = matmul_flops_per_s(probe.config.dtype)
  ceiling = shape_ceiling(probe.config, batch_size, seq_len, probe.config.dtype)["flops_per_s"]
  result = {"model": model, "params": params, "batch_size": batch_size, "seq_len": seq_len,
            "compute_dtype": compute_dtype, "devices": device_mesh.size,
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "cycles": timed, "cycles_requested": cycles, "matmul_flops_per_s": peak,
            "shape_ceiling_flops_per_s": ceiling,
            "model_flops_per_step": flops_step}
  # Every cycle starts on a refresh: the warm-up left both runners at step 10.
  assert all(flags["sophia_lambda"][::INTERVAL]) and sum(flags["sophia_lambda"]) == timed
  for name in runners:
    by_position = np.asarray(times[name]).reshape(timed, INTERVAL)
    step_s = float(np.mean(np.median(by_position, axis=0)))
    entry = {"cycle_step_s": step_s, "mean_step_s": float(np.mean(times[name])),
             "compile_s": runners[name].compile_s,
             "tokens_per_s": batch_size * seq_len / step_s,
             "achieved_flops_per_s": flops_step / step_s,
             "fraction_of_matmul_flops": flops_step / step_s / peak,
             "fraction_of_shape_ceiling": flops_step / step_s / ceiling,
             "memory": compiled_memory(runners[name].step_fn)}
    refresh = [t for t, f in zip(times[name], flags[name]) if f]
    plain = [t for t, f in zip(times[name], flags[name]) if not f]
    if refresh:
      entry.update(refresh_step_s=float(np.median(refresh)),
                   plain_step_s=float(np.median(plain)), refresh_steps=len(refresh),
                   plain_steps=len(plain))
    result[name] = entry
  s, a = result["sophia_lambda"], result["adamw"]
  result["sophia_lambda_over_adamw"] = s["cycle_step_s"] / a["cycle_step_s"]
  result["sophia_lambda_over_adamw_plain_mean"] = s["mean_step_s"] / a["mean_step_s"]
  return result


def ratios() -> dict:
  """For experiments.benchmarks.run_all."""
  r = benchmark()
  return {
      "sophia_lambda / adamw train-step time (refresh cycle)": {
          "value": r["sophia_lambda_over_adamw"], "goal": "<= 1.07"},
      "adamw achieved / matmul FLOP/s": {
          "value": r["adamw"]["fraction_of_matmul_flops"]},
      "adamw achieved / its own matmul shapes' FLOP/s": {
          "value": r["adamw"]["fraction_of_shape_ceiling"]},
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="qwen-cpu")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--cycles", type=int, default=12, help="timed refresh cycles")
  parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--data", default="builtin")
  parser.add_argument("--mesh", default="data=1,fsdp=1")
  parser.add_argument("--json", help="also write the result to this file")
  args = parser.parse_args(argv)
  result = benchmark(args.model, args.batch_size, args.seq_len, args.cycles,
                     args.compute_dtype, args.data, args.mesh)
  print(json.dumps(result, indent=2))
  a, s = result["adamw"], result["sophia_lambda"]
  print(f"\n{args.model} batch {args.batch_size} x {args.seq_len}, {args.compute_dtype}, "
        f"{result['devices']} device(s) ({result['backend']})")
  print(f"adamw          {a['cycle_step_s'] * 1e3:8.1f} ms/step  {a['tokens_per_s']:9.0f} tok/s")
  print(f"sophia_lambda  {s['cycle_step_s'] * 1e3:8.1f} ms/step  {s['tokens_per_s']:9.0f} tok/s"
        f"  (refresh {s['refresh_step_s'] * 1e3:.1f} ms, plain {s['plain_step_s'] * 1e3:.1f} ms)")
  print(f"sophia_lambda / adamw step time: {result['sophia_lambda_over_adamw']:.3f}x "
        f"(goal <= 1.07; plain means: "
        f"{result['sophia_lambda_over_adamw_plain_mean']:.3f}x)")
  print(f"achieved / matmul FLOP/s (adamw): {a['fraction_of_matmul_flops']:.3f}x "
        f"({a['achieved_flops_per_s'] / 1e9:.2f} of {result['matmul_flops_per_s'] / 1e9:.2f} "
        f"GFLOP/s); / its own matmul shapes: {a['fraction_of_shape_ceiling']:.3f}x "
        f"(of {result['shape_ceiling_flops_per_s'] / 1e9:.2f} GFLOP/s)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
