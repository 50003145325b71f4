"""What raises tokens/s of the cpu protocol's train step: process settings, and the code of
another commit, in one run.

    python -m experiments.benchmarks.bench_cpu_throughput [--rounds 3] [--steps 30]
        [--only NAME,...] [--baseline-ref COMMIT] [--model qwen-cpu] [--batch-size 8]
        [--seq-len 128] [--warmup-steps 10] [--json PATH] [--md PATH]

The step is the cpu protocol's (`slj compare --protocol cpu`): qwen-cpu, AdamW, float32,
8 x 128 tokens, one device, the jitted step of `slj train` with its state donated
(--model, --batch-size and --seq-len change its shape). Each variant below changes one
setting of the process that runs it:

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
  sophia_lambda      Sophia-Lambda instead of AdamW (refresh every 10th step): its refresh
                     and plain steps are timed apart, and their Hessian overhead, the mean
                     step over the plain one, is reported
  remat-full         QwenConfig.remat "full" (each block recomputed in the backward pass)
  remat-dots         QwenConfig.remat "dots" (the weight matmuls' outputs kept)

Every variant runs in its own process (XLA_FLAGS and GLIBC_TUNABLES are read once per
process). The variants take turns in `rounds` rounds, each round in a rotated order, so a
slow minute of a shared machine touches every variant alike; a variant's step time is the
median over its rounds of the round's median step. Results are ratios to `baseline` in the
same run: tokens/s ratio, and the largest difference of all its steps' training losses from
baseline's (the same batches and init: a setting that changes the trajectory beyond float
tolerance is not a candidate default).

--model-overrides JSON sets QwenConfig fields for every variant (e.g. '{"scan_layers": true}').
Besides the wall-clock step time, each step's CPU time (all threads of the process) is
recorded: on a machine shared with other work it is the steadier of the two (new / ref is
reported for both).

With --baseline-ref COMMIT every variant also runs on the library of COMMIT, checked out
in a temporary git worktree (removed afterwards), taking its turns in the same rounds: the
worker is this file's, importing `sophia_lambda_jax` (and the benchmark helpers) from that
checkout. Each variant then reports new / ref tokens/s and the largest difference of the
two trajectories' training losses.

Achieved FLOP/s uses the model FLOPs of `bench_train_step.model_flops_per_step`. It is
divided by two references, both measured in each variant's own process: a 1024^3 matmul in
the compute dtype (what the cores can do on a large matmul), and `shape ceiling`
(`bench_train_step.shape_ceiling`), the model's own forward matmul shapes at this batch: what
matmuls this small can reach, so achieved / shape ceiling says how far the step is from its
own matmuls.
"""

from __future__ import annotations

import argparse
import contextlib
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
    "sophia_lambda": {"optimizer": "sophia_lambda"},
    "remat-full": {"model_overrides": {"remat": "full"}},
    "remat-dots": {"model_overrides": {"remat": "dots"}},
}
ROOT = Path(__file__).resolve().parents[2]
REF_SUFFIX = "@ref"


def worker(name: str, steps: int, shape: dict | None = None,
           warmup_steps: int = WARMUP_STEPS) -> dict:
  """Run one variant in this process (its environment already set) and return its figures.

  shape: TrainConfig fields that change the step (model, batch_size, seq_len,
  model_overrides); default the cpu protocol's."""
  import jax
  import numpy as np

  from experiments.benchmarks.bench_train_step import (matmul_flops_per_s,
                                                         model_flops_per_step, shape_ceiling)
  from sophia_lambda_jax import data as data_lib
  from sophia_lambda_jax.compare.protocols import cpu_fields
  from sophia_lambda_jax.train import mesh as mesh_lib
  from sophia_lambda_jax.train.config import TrainConfig
  try:
    from sophia_lambda_jax.train.program import ModelFunctions, TrainProgram
  except ImportError:  # a --baseline-ref commit from before train/program.py split off
    from sophia_lambda_jax.train.loop import ModelFunctions, TrainProgram

  variant = VARIANTS[name]
  shape = dict(shape or {})
  overrides = {**shape.pop("model_overrides", {}), **variant.get("model_overrides", {})}
  fields = cpu_fields(steps=1000, eval_every=0, optimizer=variant.get("optimizer", "adamw"),
                      compute_dtype=variant.get("compute_dtype", "float32"),
                      mesh=variant.get("mesh", "data=1,fsdp=1"), model_overrides=overrides,
                      **shape)
  batch, seq = fields["batch_size"], fields["seq_len"]
  config = TrainConfig(**fields)
  mesh = mesh_lib.make_mesh(config.mesh)
  model = ModelFunctions(config, mesh)
  program = TrainProgram(config, model, mesh)
  step_fn = program.compile(donate=variant.get("donate", True))
  loader = data_lib.TokenBatches(data_lib.resolve_data(config.data), "train", batch, seq,
                                 seed=0, vocab_size=model.config.vocab_size)
  total = warmup_steps + steps
  batches = [mesh_lib.global_batch(loader.batch(i), program.batch_sharding,
                                   program.batch_shape) for i in range(total)]
  state = program.fresh_state()
  times, cpu_times, losses, refreshes = [], [], [], []
  for i in range(total):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = step_fn(state, batches[i])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
    losses.append(float(metrics["loss"]))
    refreshes.append(bool(metrics.get("refresh", False)))
  timed, flags = times[warmup_steps:], refreshes[warmup_steps:]
  step_s = float(np.median(timed))
  try:
    flops_step = model_flops_per_step(model.config, batch, seq)
  except TypeError:  # a --baseline-ref commit whose count also took the parameter count
    params = sum(x.size for x in jax.tree.leaves(state.params))
    flops_step = model_flops_per_step(model.config, batch, seq, params)
  result = {"variant": name, "step_s": step_s, "tokens_per_s": batch * seq / step_s,
            "cpu_step_s": float(np.median(cpu_times[warmup_steps:])),
            "achieved_flops_per_s": flops_step / step_s, "losses": losses,
            "devices": int(mesh.size), "dtype": str(np.dtype(model.config.dtype)),
            "model": config.model, "batch_size": batch, "seq_len": seq,
            "matmul_flops_per_s": matmul_flops_per_s(model.config.dtype),
            "shape_ceiling_flops_per_s": shape_ceiling(model.config, batch, seq,
                                                       model.config.dtype)["flops_per_s"]}
  if any(flags) and not all(flags):
    refresh_s = float(np.median([t for t, f in zip(timed, flags) if f]))
    plain_s = float(np.median([t for t, f in zip(timed, flags) if not f]))
    share = sum(flags) / len(flags)
    result.update(refresh_step_s=refresh_s, plain_step_s=plain_s,
                  hessian_overhead=(share * refresh_s + (1 - share) * plain_s) / plain_s)
  return result


def _variant_env(name: str, root: Path = ROOT) -> dict:
  # Imported here, not at the top: a worker runs this file on another commit's library.
  from experiments.benchmarks import baseline_ref as baseline_ref_lib

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
  return baseline_ref_lib.env_with_root(root, env)


def run_variant(name: str, steps: int, shape: dict | None = None,
                warmup_steps: int = WARMUP_STEPS, root: Path = ROOT) -> dict:
  """One variant in its own process, on the library under `root`."""
  argv = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--steps",
          str(steps), "--warmup-steps", str(warmup_steps)]
  for flag, value in (shape or {}).items():
    argv += [f"--{flag.replace('_', '-')}",
             json.dumps(value) if isinstance(value, dict) else str(value)]
  proc = subprocess.run(argv, env=_variant_env(name, root), capture_output=True, text=True)
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"variant": name, "error": " | ".join(tail)}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _entry(results: list[dict], reference_losses) -> dict:
  import numpy as np

  ok = [r for r in results if "error" not in r]
  if not ok:
    return {"error": results[0]["error"]}
  entry = {k: float(np.median([r[k] for r in ok]))
           for k in ("step_s", "cpu_step_s", "achieved_flops_per_s", "matmul_flops_per_s",
                     "shape_ceiling_flops_per_s")}
  entry["tokens_per_s"] = ok[0]["batch_size"] * ok[0]["seq_len"] / entry["step_s"]
  entry["fraction_of_matmul"] = entry["achieved_flops_per_s"] / entry["matmul_flops_per_s"]
  entry["fraction_of_shape_ceiling"] = (entry["achieved_flops_per_s"]
                                        / entry["shape_ceiling_flops_per_s"])
  entry["rounds"] = len(ok)
  entry["max_loss_diff"] = None if reference_losses is None else float(
      np.max(np.abs(np.asarray(ok[0]["losses"]) - np.asarray(reference_losses))))
  for key in ("refresh_step_s", "plain_step_s", "hessian_overhead"):
    if key in ok[0]:
      entry[key] = float(np.median([r[key] for r in ok]))
  entry["dtype"] = ok[0]["dtype"]
  entry["devices"] = ok[0]["devices"]
  return entry


def benchmark(rounds: int = 3, steps: int = 30, only: list[str] | None = None,
              baseline_ref: str | None = None, shape: dict | None = None,
              warmup_steps: int = WARMUP_STEPS) -> dict:
  from experiments.benchmarks import baseline_ref as baseline_ref_lib

  names = ["baseline"] + [n for n in (only or VARIANTS) if n != "baseline"]
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    raise ValueError(f"--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
  with contextlib.ExitStack() as stack:
    roots = {"": ROOT}
    ref_commit = None
    if baseline_ref:
      roots[REF_SUFFIX], ref_commit = stack.enter_context(baseline_ref_lib.checkout(
          baseline_ref))
    runs = {n + suffix: [] for n in names for suffix in roots}
    order_all = list(runs)
    for r in range(rounds):
      order = order_all[r % len(order_all):] + order_all[:r % len(order_all)]
      for key in order:
        name, suffix = key.removesuffix(REF_SUFFIX), REF_SUFFIX if key.endswith(REF_SUFFIX) \
            else ""
        runs[key].append(run_variant(name, steps, shape, warmup_steps, roots[suffix]))
        print(f"round {r + 1}/{rounds} {key}: "
              + (f"{runs[key][-1]['tokens_per_s']:.0f} tok/s" if "error" not in runs[key][-1]
                 else runs[key][-1]["error"]), file=sys.stderr, flush=True)
  first = runs["baseline"][0]
  if "error" in first:
    raise RuntimeError(f"baseline failed: {first['error']}")
  # A variant without its own optimizer runs baseline's (AdamW): its losses are comparable.
  table = {n: _entry(runs[n], first["losses"] if VARIANTS[n].get("optimizer") is None else None)
           for n in names}
  base = table["baseline"]
  for entry in table.values():
    if "error" not in entry:
      entry["speedup"] = base["step_s"] / entry["step_s"]
      entry["fraction_of_baseline_shape_ceiling"] = (entry["achieved_flops_per_s"]
                                                     / base["shape_ceiling_flops_per_s"])
  overrides = (shape or {}).get("model_overrides")
  result = {"step": f"{first['model']} {first['batch_size']}x{first['seq_len']}"
                    + (f", model overrides {json.dumps(overrides)}" if overrides else "")
                    + (" (cpu protocol)" if not shape else ""),
            "rounds": rounds, "timed_steps": steps, "warmup_steps": warmup_steps,
            "cpu_count": os.cpu_count(), "variants": table}
  if baseline_ref:
    reference = {}
    for n in names:
      ref_runs, own = runs[n + REF_SUFFIX], [r for r in runs[n] if "error" not in r]
      ref = _entry(ref_runs, own[0]["losses"] if own else ref_runs[0].get("losses", []))
      if "error" not in ref and "error" not in table[n]:
        ref["new_over_ref"] = table[n]["tokens_per_s"] / ref["tokens_per_s"]
        ref["new_over_ref_cpu_time"] = ref["cpu_step_s"] / table[n]["cpu_step_s"]
      reference[n] = ref
    result.update(baseline_ref=baseline_ref, baseline_commit=ref_commit, reference=reference)
  return result


def _diff(value) -> str:
  return "" if value is None else f"{value:.2e}"


def markdown(result: dict) -> str:
  lines = [f"# CPU train-step throughput: {result['step']}", "",
           f"{result['cpu_count']} cores; {result['rounds']} rounds of {result['timed_steps']} "
           f"timed steps per variant after {result.get('warmup_steps', WARMUP_STEPS)}, each "
           "in its own process; medians. Speed-up and loss difference are against "
           "`baseline` in the same run (no loss difference for another optimizer).", "",
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
        f"{e['fraction_of_baseline_shape_ceiling']:.3f} | {_diff(e['max_loss_diff'])} |")
  lines += ["", "Figures in parentheses: the reference's GFLOP/s measured in that variant's "
            f"own process ({result['variants']['baseline'].get('dtype', '')} unless the variant "
            "says), so a setting that speeds up matmuls raises its own ceiling too; the "
            "baseline column divides every variant by the baseline process's ceiling."]
  overheads = {n: e for n, e in result["variants"].items() if "hessian_overhead" in e}
  if "reference" in result:
    lines += ["", f"## Against {result['baseline_ref']} ({result['baseline_commit'][:12]})", "",
              "The same variants on the library of that commit (temporary git worktree), "
              "interleaved with the working tree's in the same rounds.", "",
              "| variant | tokens/s | ref tokens/s | new / ref | new / ref by CPU time | "
              "max train-loss diff | Hessian overhead new / ref |",
              "|---|---|---|---|---|---|---|"]
    for name, ref in result["reference"].items():
      new = result["variants"][name]
      if "error" in ref or "error" in new:
        why = ref.get("error") or new.get("error")
        lines.append(f"| {name} | error: {why[:80]} | | | | | |")
        continue
      overhead = (f"{new['hessian_overhead']:.3f} / {ref['hessian_overhead']:.3f}"
                  if "hessian_overhead" in new and "hessian_overhead" in ref else "")
      lines.append(f"| {name} | {new['tokens_per_s']:.0f} | {ref['tokens_per_s']:.0f} | "
                   f"{ref['new_over_ref']:.3f}x | {ref['new_over_ref_cpu_time']:.3f}x | "
                   f"{_diff(ref['max_loss_diff'])} | {overhead} |")
  if overheads:
    lines += ["", "Hessian overhead: the mean step over the plain (no refresh) step, from the "
              "median refresh and plain steps: " + "; ".join(
                  f"{n} {e['hessian_overhead']:.3f} (refresh {e['refresh_step_s'] * 1e3:.1f} "
                  f"ms, plain {e['plain_step_s'] * 1e3:.1f} ms)" for n, e in overheads.items())
              + "."]
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
  parser.add_argument("--baseline-ref", help="also run every variant on the library of this "
                      "commit (a temporary git worktree), interleaved")
  parser.add_argument("--model", help="model preset (default the cpu protocol's, qwen-cpu)")
  parser.add_argument("--batch-size", type=int, help="sequences per step (default 8)")
  parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
  parser.add_argument("--model-overrides", help="JSON object of QwenConfig fields for every "
                      "variant")
  parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS,
                      help="untimed steps per process before the timed ones")
  parser.add_argument("--json", help="write the result here")
  parser.add_argument("--md", help="write the markdown table here")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--from-json", help="only rewrite the markdown of an earlier --json")
  args = parser.parse_args(argv)
  shape = {k: v for k, v in (("model", args.model), ("batch_size", args.batch_size),
                             ("seq_len", args.seq_len)) if v is not None}
  if args.model_overrides:
    try:
      shape["model_overrides"] = json.loads(args.model_overrides)
    except ValueError:
      shape["model_overrides"] = None
    if not isinstance(shape["model_overrides"], dict):
      parser.error(f"--model-overrides must be a JSON object of QwenConfig fields, got "
                   f"{args.model_overrides!r}")
  if args.worker:
    print(json.dumps(worker(args.worker, args.steps, shape, args.warmup_steps)))
    return 0
  if args.rounds < 1 or args.steps < 1 or args.warmup_steps < 0:
    parser.error(f"--rounds and --steps must be >= 1 and --warmup-steps >= 0, got "
                 f"{args.rounds}, {args.steps} and {args.warmup_steps}")
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
      result = benchmark(args.rounds, args.steps, args.only.split(",") if args.only else None,
                         args.baseline_ref, shape, args.warmup_steps)
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
