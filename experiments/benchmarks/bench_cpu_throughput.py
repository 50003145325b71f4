"""What raises tokens/s of the cpu protocol's train step: process settings, in one run.

    python -m experiments.benchmarks.bench_cpu_throughput [--rounds 3] [--steps 30]
        [--only NAME,...] [--json PATH] [--md PATH]

The step is the cpu protocol's (`slj compare --protocol cpu`): qwen-cpu, AdamW, float32,
8 x 128 tokens, one device, the jitted step of `slj train` with its state donated. Each
variant below changes one setting of the process that runs it:

  baseline           the jitted step of `slj train`, in a process without GLIBC_TUNABLES
  hugetlb            GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for
                     malloc; read by glibc at process start, so only the environment can set
                     it). `slj train` and `slj compare` set it by default (sophia_lambda_jax.cli)
  no-donation        the state argument not donated (what donation is worth)
  onednn             XLA_FLAGS --xla_cpu_use_onednn=true (oneDNN matmuls)
  xnnpack            XLA_FLAGS --xla_cpu_use_xnnpack=true (XNNPACK matmuls)
  concurrency-sched  XLA_FLAGS --xla_cpu_enable_concurrency_optimized_scheduler=true
  eigen-1-thread     XLA_FLAGS --xla_cpu_multi_thread_eigen=false
  data=2             two host devices (--xla_force_host_platform_device_count=2), the batch
                     split over mesh data=2: each core runs half the batch
  bfloat16           compute_dtype bfloat16 (changes the numerics: for reference, not a
                     candidate default)

Every variant runs in its own process (XLA_FLAGS and GLIBC_TUNABLES are read once per
process). The variants take turns in `rounds` rounds, each round in a rotated order, so a
slow minute of a shared machine touches every variant alike; a variant's step time is the
median over its rounds of the round's median step. Results are ratios to `baseline` in the
same run: tokens/s ratio, and the largest difference of all its steps' training losses from
baseline's (the same batches and init: a setting that changes the trajectory beyond float
tolerance is not a candidate default).

Achieved FLOP/s uses the model FLOPs of `bench_train_step.model_flops_per_step`. It is
divided by two references, both measured in each variant's own process: a 1024^3 matmul in
the compute dtype (what the cores can do on a large matmul), and `shape ceiling`
(`bench_train_step.shape_ceiling`), the model's own forward matmul shapes at this batch: what
matmuls this small can reach, so achieved / shape ceiling says how far the step is from its
own matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WARMUP_STEPS = 10
BATCH, SEQ = 8, 128  # the cpu protocol's (compare.protocols.CPU_BATCH, CPU_SEQ)
_DEVICE_COUNT = "--xla_force_host_platform_device_count"

VARIANTS: dict[str, dict] = {
    "baseline": {},
    "hugetlb": {"env": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}},
    "no-donation": {"donate": False},
    "onednn": {"xla_flags": ["--xla_cpu_use_onednn=true"]},
    "xnnpack": {"xla_flags": ["--xla_cpu_use_xnnpack=true"]},
    "concurrency-sched": {
        "xla_flags": ["--xla_cpu_enable_concurrency_optimized_scheduler=true"]},
    "eigen-1-thread": {"xla_flags": ["--xla_cpu_multi_thread_eigen=false"]},
    "data=2": {"xla_flags": [f"{_DEVICE_COUNT}=2"], "mesh": "data=2,fsdp=1"},
    "bfloat16": {"compute_dtype": "bfloat16"},
}


def worker(name: str, steps: int) -> dict:
  """Run one variant in this process (its environment already set) and return its figures."""
  import jax
  import numpy as np

  from experiments.benchmarks.bench_train_step import (matmul_flops_per_s,
                                                         model_flops_per_step, shape_ceiling)
  from sophia_lambda_jax import data as data_lib
  from sophia_lambda_jax.compare.protocols import cpu_fields
  from sophia_lambda_jax.train import mesh as mesh_lib
  from sophia_lambda_jax.train.config import TrainConfig
  from sophia_lambda_jax.train.program import ModelFunctions, TrainProgram

  variant = VARIANTS[name]
  fields = cpu_fields(steps=1000, eval_every=0, optimizer="adamw",
                      compute_dtype=variant.get("compute_dtype", "float32"),
                      mesh=variant.get("mesh", "data=1,fsdp=1"))
  assert (fields["batch_size"], fields["seq_len"]) == (BATCH, SEQ)
  config = TrainConfig(**fields)
  mesh = mesh_lib.make_mesh(config.mesh)
  model = ModelFunctions(config, mesh)
  program = TrainProgram(config, model, mesh)
  step_fn = program.compile(donate=variant.get("donate", True))
  loader = data_lib.TokenBatches(data_lib.resolve_data(config.data), "train", BATCH, SEQ,
                                 seed=0, vocab_size=model.config.vocab_size)
  total = WARMUP_STEPS + steps
  batches = [mesh_lib.global_batch(loader.batch(i), program.batch_sharding,
                                   program.batch_shape) for i in range(total)]
  state = program.fresh_state()
  times, losses = [], []
  for i in range(total):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batches[i])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  step_s = float(np.median(times[WARMUP_STEPS:]))
  params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(model.abstract_params)))
  flops_step = model_flops_per_step(model.config, BATCH, SEQ, params)
  return {"variant": name, "step_s": step_s, "tokens_per_s": BATCH * SEQ / step_s,
          "achieved_flops_per_s": flops_step / step_s, "losses": losses,
          "devices": int(mesh.size), "dtype": str(np.dtype(model.config.dtype)),
          "matmul_flops_per_s": matmul_flops_per_s(model.config.dtype),
          "shape_ceiling_flops_per_s": shape_ceiling(model.config, BATCH, SEQ,
                                                     model.config.dtype)["flops_per_s"]}


def _variant_env(name: str) -> dict:
  variant = VARIANTS[name]
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)  # baseline is the process without it
  env.update(variant.get("env", {}))
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT)]
  flags += variant.get("xla_flags", [])
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env.setdefault("JAX_PLATFORMS", "cpu")
  root = str(Path(__file__).resolve().parents[2])
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_variant(name: str, steps: int) -> dict:
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.bench_cpu_throughput", "--worker", name,
       "--steps", str(steps)], env=_variant_env(name), capture_output=True, text=True)
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"variant": name, "error": " | ".join(tail)}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(rounds: int = 3, steps: int = 30, only: list[str] | None = None) -> dict:
  import numpy as np

  names = ["baseline"] + [n for n in (only or VARIANTS) if n != "baseline"]
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    raise ValueError(f"--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
  runs: dict[str, list[dict]] = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      runs[name].append(run_variant(name, steps))
      print(f"round {r + 1}/{rounds} {name}: "
            + (f"{runs[name][-1]['tokens_per_s']:.0f} tok/s" if "error" not in runs[name][-1]
               else runs[name][-1]["error"]), file=sys.stderr, flush=True)
  base_losses = np.asarray(runs["baseline"][0]["losses"])
  table = {}
  for name, results in runs.items():
    ok = [r for r in results if "error" not in r]
    if not ok:
      table[name] = {"error": results[0]["error"]}
      continue
    entry = {k: float(np.median([r[k] for r in ok]))
             for k in ("step_s", "achieved_flops_per_s", "matmul_flops_per_s",
                       "shape_ceiling_flops_per_s")}
    entry["tokens_per_s"] = BATCH * SEQ / entry["step_s"]
    entry["fraction_of_matmul"] = entry["achieved_flops_per_s"] / entry["matmul_flops_per_s"]
    entry["fraction_of_shape_ceiling"] = (entry["achieved_flops_per_s"]
                                          / entry["shape_ceiling_flops_per_s"])
    entry["rounds"] = len(ok)
    entry["max_loss_diff"] = float(np.max(np.abs(np.asarray(ok[0]["losses"]) - base_losses)))
    entry["dtype"] = ok[0]["dtype"]
    entry["devices"] = ok[0]["devices"]
    table[name] = entry
  base = table["baseline"]
  for entry in table.values():
    if "error" not in entry:
      entry["speedup"] = base["step_s"] / entry["step_s"]
      entry["fraction_of_baseline_shape_ceiling"] = (entry["achieved_flops_per_s"]
                                                     / base["shape_ceiling_flops_per_s"])
  return {"step": f"qwen-cpu AdamW {BATCH}x{SEQ} (cpu protocol)", "rounds": rounds,
          "timed_steps": steps, "warmup_steps": WARMUP_STEPS, "cpu_count": os.cpu_count(),
          "variants": table}


def markdown(result: dict) -> str:
  lines = [f"# CPU train-step throughput: {result['step']}", "",
           f"{result['cpu_count']} cores; {result['rounds']} rounds of {result['timed_steps']} "
           "timed steps per variant, each in its own process; medians. Speed-up and loss "
           "difference are against `baseline` in the same run.", "",
           "| variant | tokens/s | speed-up | achieved GFLOP/s | / 1024^3 matmul | "
           "/ shape ceiling | / baseline's shape ceiling | max train-loss diff |",
           "|---|---|---|---|---|---|---|---|"]
  for name, e in result["variants"].items():
    if "error" in e:
      lines.append(f"| {name} | error: {e['error'][:80]} | | | | | | |")
      continue
    lines.append(
        f"| {name} | {e['tokens_per_s']:.0f} | {e['speedup']:.3f}x | "
        f"{e['achieved_flops_per_s'] / 1e9:.2f} | {e['fraction_of_matmul']:.3f} "
        f"({e['matmul_flops_per_s'] / 1e9:.0f}) | {e['fraction_of_shape_ceiling']:.3f} "
        f"({e['shape_ceiling_flops_per_s'] / 1e9:.0f}) | "
        f"{e['fraction_of_baseline_shape_ceiling']:.3f} | {e['max_loss_diff']:.2e} |")
  lines += ["", "Figures in parentheses: the reference's GFLOP/s measured in that variant's "
            f"own process ({result['variants']['baseline'].get('dtype', '')} unless the variant "
            "says), so a setting that speeds up matmuls raises its own ceiling too; the "
            "baseline column divides every variant by the baseline process's ceiling."]
  return "\n".join(lines) + "\n"


def ratios() -> dict:
  """For experiments.benchmarks.run_all (a short run: 2 rounds of the main candidates)."""
  r = benchmark(rounds=2, steps=20, only=["hugetlb", "no-donation", "data=2"])["variants"]
  out = {"baseline achieved / shape-ceiling FLOP/s":
         {"value": r["baseline"]["fraction_of_shape_ceiling"]}}
  for name in ("hugetlb", "no-donation", "data=2"):
    if "error" not in r[name]:
      out[f"{name} / baseline tokens/s"] = {"value": r[name]["speedup"]}
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=30, help="timed steps per process")
  parser.add_argument("--only", help="comma-separated variants (baseline is always run)")
  parser.add_argument("--json", help="write the result here")
  parser.add_argument("--md", help="write the markdown table here")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--from-json", help="only rewrite the markdown of an earlier --json")
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker, args.steps)))
    return 0
  if args.rounds < 1 or args.steps < 1:
    parser.error(f"--rounds and --steps must be >= 1, got {args.rounds} and {args.steps}")
  if args.from_json:
    try:
      result = json.loads(Path(args.from_json).read_text())
      result["variants"]["baseline"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      parser.error(f"--from-json {args.from_json}: not a result of this benchmark ({e})")
    for entry in result["variants"].values():  # figures added since that run
      if "error" not in entry:
        entry["fraction_of_baseline_shape_ceiling"] = (
            entry["achieved_flops_per_s"]
            / result["variants"]["baseline"]["shape_ceiling_flops_per_s"])
  else:
    try:
      result = benchmark(args.rounds, args.steps, args.only.split(",") if args.only else None)
    except ValueError as e:
      parser.error(str(e))
  text = markdown(result)
  print(text)
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2))
  if args.md:
    Path(args.md).write_text(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
