"""Device memory of one train step per optimizer, from XLA's analysis of the compiled step.

    python -m experiments.benchmarks.bench_memory [--model qwen-134m] [--batch-size 8]
        [--seq-len 2048] [--grad-accum 1] [--compute-dtype bfloat16]
        [--optimizers adamw,sophia,lamvs,sophia_lambda] [--json PATH]

Each optimizer's jitted step of `slj train` (`train.program.TrainProgram`: forward, backward,
clipping, the update, and for the Sophia family the Gauss-Newton-Bartlett estimate) is
compiled ahead of time for the given model and batch and never run, so this needs no data
and no accelerator. Its memory is

    argument + output - alias + temp bytes

of `compiled.memory_analysis()`: the step's inputs (state and batch), its outputs (new
state and metrics) less the output buffers that reuse donated inputs (the state is donated,
so new and old state share buffers), plus XLA's scratch (activations, gradients, the
logits). That is the step's peak as XLA's buffer assignment plans it, per optimizer,
which a process's peak-memory counter cannot give (it cannot be reset between optimizers
compiled in one process). On a GPU or TPU it is the device's plan; on CPU the same program
is compiled for the host, so the figure is labelled an XLA estimate, not a device
measurement.

Defaults: `qwen-134m`, bfloat16 compute with float32 master weights, 8 sequences of 2048
tokens. The papers give only the global batch (512 x 2048, "on an NVIDIA A100 GPU") and no
micro-batch; 8 x 2048 is the per-device micro-batch of the paper protocol
(`slj compare --protocol paper`, grad_accum 64), the most an 80 GB GPU holds. The table
sets each optimizer beside the memory column of the Sophia-Lambda paper's Table 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import jax

from sophia_lambda_jax.train import mesh as mesh_lib
from sophia_lambda_jax.train.config import TrainConfig
from sophia_lambda_jax.train.program import ModelFunctions, TrainProgram, compiled_memory

# The Sophia-Lambda paper's Table 1, "Memory (GB)" (134M Qwen, batch 512 x 2048, A100).
PAPER_MEMORY_GB = {"adamw": 31.5, "sophia": 39.7, "lamvs": 37.2, "sophia_lambda": 36.8}
OPTIMIZERS = tuple(PAPER_MEMORY_GB)
PAPER_MICRO_BATCH = 8
PAPER_SEQ_LEN = 2048
FORMULA = "argument + output - alias + temp"
GB = 1e9


def step_config(optimizer: str, model: str = "qwen-134m", batch_size: int = PAPER_MICRO_BATCH,
                seq_len: int = PAPER_SEQ_LEN, grad_accum: int = 1,
                compute_dtype: str = "bfloat16", mesh: str = "data=1,fsdp=1") -> TrainConfig:
  return TrainConfig(model=model, optimizer=optimizer, batch_size=batch_size, seq_len=seq_len,
                     grad_accum=grad_accum, compute_dtype=compute_dtype, mesh=mesh,
                     eval_every=0)


def compiled_step_memory(config: TrainConfig) -> dict:
  """Compile (only) the train step of `config`: {"bytes": compiled_memory(...), "compile_s"}."""
  device_mesh = mesh_lib.make_mesh(config.mesh)
  program = TrainProgram(config, ModelFunctions(config, device_mesh), device_mesh)
  t0 = time.perf_counter()
  compiled = program.compile()
  return {"bytes": compiled_memory(compiled), "compile_s": time.perf_counter() - t0}


def measurement_label(backend: str) -> str:
  if backend == "cpu":
    return "XLA estimate, not a device measurement (step compiled for the CPU)"
  return f"XLA buffer assignment of the step compiled for the {backend} device"


def memory_table(model: str = "qwen-134m", batch_size: int = PAPER_MICRO_BATCH,
                 seq_len: int = PAPER_SEQ_LEN, grad_accum: int = 1,
                 compute_dtype: str = "bfloat16", optimizers: Sequence[str] = OPTIMIZERS,
                 known: dict[str, dict] | None = None,
                 deadline: float | None = None) -> dict:
  """Step memory of each optimizer in GB and as a ratio to AdamW's.

  known: optimizer -> {"bytes": compiled_memory(...), "source": text} for steps already compiled
    with these shapes elsewhere (gpu_check passes the throughput section's); they are not
    compiled again.
  deadline: time.perf_counter() value after which no further step is compiled (the
    optimizers left are listed under "skipped").
  """
  rows, skipped = {}, {}
  for name in optimizers:
    if known and name in known:
      rows[name] = dict(known[name])
      continue
    if deadline is not None and time.perf_counter() > deadline:
      skipped[name] = "time budget spent before its compile"
      continue
    measured = compiled_step_memory(step_config(name, model, batch_size, seq_len, grad_accum,
                                                compute_dtype))
    rows[name] = dict(measured, source="compiled here")
  base = rows.get("adamw", {}).get("bytes")
  for name, row in rows.items():
    total = row["bytes"]["total"] if row["bytes"] else None
    row["gb"] = None if total is None else total / GB
    row["ratio_to_adamw"] = None if total is None or not base else total / base["total"]
    if name in PAPER_MEMORY_GB:
      row["paper_gb"] = PAPER_MEMORY_GB[name]
      row["paper_ratio_to_adamw"] = PAPER_MEMORY_GB[name] / PAPER_MEMORY_GB["adamw"]
  backend = jax.default_backend()
  return {"model": model, "batch_size": batch_size, "seq_len": seq_len,
          "grad_accum": grad_accum, "compute_dtype": compute_dtype, "backend": backend,
          "device_kind": jax.devices()[0].device_kind, "formula": FORMULA,
          "measurement": measurement_label(backend), "optimizers": rows, "skipped": skipped}


def format_table(result: dict) -> str:
  """Markdown: GB and x AdamW per optimizer beside the paper's column."""
  lines = ["| Optimizer | Step memory GB | x AdamW | Paper GB | Paper x AdamW | "
           "temp / argument / output / alias GB | Compile s |", "|---|---|---|---|---|---|---|"]
  for name, row in result["optimizers"].items():
    b = row["bytes"]
    parts = " / ".join(f"{b[k] / GB:.3g}" for k in ("temp", "argument", "output", "alias")) \
        if b else "n/a"
    lines.append("| " + " | ".join([
        name, "n/a" if row["gb"] is None else f"{row['gb']:.3g}",
        "n/a" if row["ratio_to_adamw"] is None else f"{row['ratio_to_adamw']:.2f}x",
        f"{row['paper_gb']:.1f}" if "paper_gb" in row else "",
        f"{row['paper_ratio_to_adamw']:.2f}x" if "paper_gb" in row else "", parts,
        f"{row['compile_s']:.0f}" if "compile_s" in row else row.get("source", "")]) + " |")
  for name, why in result["skipped"].items():
    lines.append(f"| {name} | skipped: {why} | | | | | |")
  accum = f", grad_accum {result['grad_accum']}" if result["grad_accum"] > 1 else ""
  lines.append("")
  lines.append(f"{result['model']}, {result['batch_size']} x {result['seq_len']} tokens"
               f"{accum}, {result['compute_dtype']} compute, float32 master weights; "
               f"{result['formula']} of compiled.memory_analysis(); "
               f"{result['measurement']} ({result['device_kind']}).")
  return "\n".join(lines)


def ratios() -> dict:
  """For experiments.benchmarks.run_all: each optimizer's step memory / AdamW's (qwen-134m,
  8 x 2048, the default table)."""
  result = memory_table("qwen-134m", PAPER_MICRO_BATCH, PAPER_SEQ_LEN, 1, "bfloat16",
                        list(OPTIMIZERS))
  return {f"{name} / adamw step memory": row["ratio_to_adamw"]
          for name, row in result["optimizers"].items()
          if name != "adamw" and row["ratio_to_adamw"] is not None}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.bench_memory",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="qwen-134m")
  parser.add_argument("--batch-size", type=int, default=PAPER_MICRO_BATCH)
  parser.add_argument("--seq-len", type=int, default=PAPER_SEQ_LEN)
  parser.add_argument("--grad-accum", type=int, default=1)
  parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                      help="comma-separated optimizer names")
  parser.add_argument("--json", help="also write the result to this file")
  args = parser.parse_args(argv)
  optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
  try:
    result = memory_table(args.model, args.batch_size, args.seq_len, args.grad_accum,
                          args.compute_dtype, optimizers)
  except ValueError as e:
    print(f"bench_memory: error: {e}", file=sys.stderr)
    return 2
  print(format_table(result))
  for name, row in result["optimizers"].items():
    if name != "adamw" and row["ratio_to_adamw"] is not None:
      print(f"{name} / adamw step memory: {row['ratio_to_adamw']:.3f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
