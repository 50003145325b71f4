"""Device memory of one train step per optimizer, from XLA's analysis of the compiled step.

    python -m experiments.benchmarks.bench_memory [--model qwen-134m] [--batch-size 8]
        [--seq-len 2048] [--grad-accum 1] [--compute-dtype bfloat16]
        [--model-overrides JSON] [--no-refresh] [--split] [--baseline-ref COMMIT]
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

--model-overrides sets QwenConfig fields (e.g. '{"remat": "none", "vocab_size": 8192}');
--no-refresh compiles the Sophia family's step without the GNB refresh and its fallback
(the optimizer receives zeros for the curvature), so the refresh's share can be told apart.
--split compiles the extra steps that apportion each optimizer's total (`split_table`):

    weights and state    argument bytes: parameters, optimizer state and the batch
    Sophia refresh       the step less the same step without the refresh
    head and loss        AdamW's scratch less that of the same step with an 8,192-token
                         vocabulary (the logits, the head's gradient and their copies)
    attention            twice AdamW's step less that of 2B sequences of S/2 tokens: the
                         part quadratic in the sequence length (the attention scores)
    rest                 what remains: activations kept for the backward pass, gradients,
                         the optimizer's scratch

--baseline-ref COMMIT measures the library of that commit instead (a temporary git
worktree, `baseline_ref`), with this file's options: the "before" of a change.

Defaults: `qwen-134m`, bfloat16 compute with float32 master weights, 8 sequences of 2048
tokens. The papers give only the global batch (512 x 2048, "on an NVIDIA A100 GPU") and no
micro-batch; 8 x 2048 was the paper protocol's micro-batch while the step held the logits
and the attention scores (the most an 80 GB GPU held then), and is kept as the reference
batch of docs/memory.md; the protocol now takes 32 x 2048 (`compare.protocols`). The table
sets each optimizer beside the memory column of the Sophia-Lambda paper's Table 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from sophia_lambda_jax.train import mesh as mesh_lib
from sophia_lambda_jax.train.config import TrainConfig
from sophia_lambda_jax.train.program import ModelFunctions, TrainProgram, compiled_memory

# The Sophia-Lambda paper's Table 1, "Memory (GB)" (134M Qwen, batch 512 x 2048, A100).
PAPER_MEMORY_GB = {"adamw": 31.5, "sophia": 39.7, "lamvs": 37.2, "sophia_lambda": 36.8}
OPTIMIZERS = tuple(PAPER_MEMORY_GB)
MICRO_BATCH = 8
PAPER_SEQ_LEN = 2048
FORMULA = "argument + output - alias + temp"
GB = 1e9


SPLIT_VOCAB = 8192
SPLIT_PARTS = ("weights and state", "Sophia refresh", "head and loss", "attention", "rest")


def step_config(optimizer: str, model: str = "qwen-134m", batch_size: int = MICRO_BATCH,
                seq_len: int = PAPER_SEQ_LEN, grad_accum: int = 1,
                compute_dtype: str = "bfloat16", mesh: str = "data=1,fsdp=1",
                model_overrides: dict | None = None) -> TrainConfig:
  return TrainConfig(model=model, optimizer=optimizer, batch_size=batch_size, seq_len=seq_len,
                     grad_accum=grad_accum, compute_dtype=compute_dtype, mesh=mesh,
                     eval_every=0, model_overrides=dict(model_overrides or {}))


def _without_refresh(tx: optax.GradientTransformationExtraArgs):
  """`tx` whose curvature estimate is zeros: the step then has no GNB refresh to compile."""
  def update(updates, state, params=None, **extra):
    del extra
    return tx.update(updates, state, params,
                     hessian_fn=lambda p: jax.tree.map(jnp.zeros_like, p))
  return optax.GradientTransformationExtraArgs(tx.init, update)


def compiled_step_memory(config: TrainConfig, refresh: bool = True) -> dict:
  """Compile (only) the train step of `config`: {"bytes": compiled_memory(...), "compile_s"}.
  refresh=False: without the Sophia family's curvature refresh (`_without_refresh`)."""
  device_mesh = mesh_lib.make_mesh(config.mesh)
  program = TrainProgram(config, ModelFunctions(config, device_mesh), device_mesh)
  if not refresh and program.estimator is not None:
    program.tx, program.estimator = _without_refresh(program.tx), None
  t0 = time.perf_counter()
  compiled = program.compile()
  return {"bytes": compiled_memory(compiled), "compile_s": time.perf_counter() - t0}


def measurement_label(backend: str) -> str:
  if backend == "cpu":
    return "XLA estimate, not a device measurement (step compiled for the CPU)"
  return f"XLA buffer assignment of the step compiled for the {backend} device"


def memory_table(model: str = "qwen-134m", batch_size: int = MICRO_BATCH,
                 seq_len: int = PAPER_SEQ_LEN, grad_accum: int = 1,
                 compute_dtype: str = "bfloat16", optimizers: Sequence[str] = OPTIMIZERS,
                 known: dict[str, dict] | None = None,
                 deadline: float | None = None, model_overrides: dict | None = None,
                 refresh: bool = True) -> dict:
  """Step memory of each optimizer in GB and as a ratio to AdamW's.

  model_overrides: QwenConfig fields; refresh=False: the Sophia family without its refresh.
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
                                                compute_dtype,
                                                model_overrides=model_overrides), refresh)
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
          "grad_accum": grad_accum, "compute_dtype": compute_dtype,
          "model_overrides": dict(model_overrides or {}), "refresh": refresh, "backend": backend,
          "device_kind": jax.devices()[0].device_kind, "formula": FORMULA,
          "measurement": measurement_label(backend), "optimizers": rows, "skipped": skipped}


def split_table(result: dict) -> dict:
  """Apportion each optimizer's total of `result` (a `memory_table`) into SPLIT_PARTS, by
  compiling the steps the module docstring names (AdamW's two references once for all)."""
  model, batch, seq = result["model"], result["batch_size"], result["seq_len"]
  overrides = result["model_overrides"]
  if seq % 2:
    raise ValueError(f"--split needs an even --seq-len (it compiles S/2), got {seq}")
  from sophia_lambda_jax.models import qwen

  vocab = qwen.get_config(model, **overrides).vocab_size
  small_vocab = min(SPLIT_VOCAB, vocab // 8)

  def total(optimizer, **changes):
    fields = dict(optimizer=optimizer, model=model, batch_size=batch, seq_len=seq,
                  grad_accum=result["grad_accum"], compute_dtype=result["compute_dtype"],
                  model_overrides=overrides)
    refresh = changes.pop("refresh", True)
    fields.update(changes)
    return compiled_step_memory(step_config(**fields), refresh)["bytes"]

  adamw = (result["optimizers"]["adamw"]["bytes"] if "adamw" in result["optimizers"]
           else total("adamw"))
  small = total("adamw", model_overrides={**overrides, "vocab_size": small_vocab})
  half = total("adamw", batch_size=2 * batch, seq_len=seq // 2)
  head = (adamw["total"] - adamw["argument"]) - (small["total"] - small["argument"])
  attention = 2 * (adamw["total"] - half["total"])
  rows = {}
  for name, row in result["optimizers"].items():
    b = row["bytes"]
    if b is None:
      continue
    config = step_config(name, model, batch, seq, result["grad_accum"],
                         result["compute_dtype"], model_overrides=overrides)
    without = (None if config.resolved_hessian_estimator() is None
               else total(name, refresh=False))
    refresh = 0 if without is None else b["total"] - without["total"]
    parts = {"weights and state": b["argument"], "Sophia refresh": refresh,
             "head and loss": head, "attention": attention}
    parts["rest"] = b["total"] - sum(parts.values())
    rows[name] = {"total": b["total"], "parts": parts,
                  "no_refresh_total": None if without is None else without["total"]}
  return {"references": {"adamw": adamw, f"adamw vocab {small_vocab}": small,
                         f"adamw {2 * batch} x {seq // 2}": half},
          "small_vocab": small_vocab, "optimizers": rows}


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
  overrides = result.get("model_overrides") or {}
  changes = "".join([f", model overrides {json.dumps(overrides)}" if overrides else "",
                     "" if result.get("refresh", True) else ", without the GNB refresh"])
  lines.append("")
  lines.append(f"{result['model']}, {result['batch_size']} x {result['seq_len']} tokens"
               f"{accum}, {result['compute_dtype']} compute, float32 master weights"
               f"{changes}; {result['formula']} of compiled.memory_analysis(); "
               f"{result['measurement']} ({result['device_kind']}).")
  if "baseline_ref" in result:
    lines.append(f"Library of {result['baseline_ref']} ({result['baseline_commit'][:12]}).")
  if "split" in result:
    split = result["split"]
    lines += ["", "| Optimizer | total GB | " + " | ".join(SPLIT_PARTS) + " |",
              "|---|---|" + "---|" * len(SPLIT_PARTS)]
    for name, row in split["optimizers"].items():
      lines.append(f"| {name} | {row['total'] / GB:.2f} | " + " | ".join(
          f"{row['parts'][p] / GB:.2f}" for p in SPLIT_PARTS) + " |")
    refs = ", ".join(f"{k} {v['total'] / GB:.2f} GB" for k, v in split["references"].items())
    lines += ["", f"Split (GB) from the steps compiled beside: {refs}; no-refresh steps: "
              + (", ".join(f"{n} {r['no_refresh_total'] / GB:.2f} GB"
                           for n, r in split["optimizers"].items() if r["no_refresh_total"])
                 or "none") + "."]
  return "\n".join(lines)


def ratios() -> dict:
  """For experiments.benchmarks.run_all: each optimizer's step memory / AdamW's (qwen-134m,
  8 x 2048, the default table)."""
  result = memory_table("qwen-134m", MICRO_BATCH, PAPER_SEQ_LEN, 1, "bfloat16",
                        list(OPTIMIZERS))
  return {f"{name} / adamw step memory": row["ratio_to_adamw"]
          for name, row in result["optimizers"].items()
          if name != "adamw" and row["ratio_to_adamw"] is not None}


def _at_ref(argv: list[str], ref: str) -> dict:
  """This file's result, with `argv`, on the library of commit `ref`."""
  from experiments.benchmarks import baseline_ref

  with baseline_ref.checkout(ref) as (root, commit), \
       tempfile.TemporaryDirectory() as scratch:
    out = Path(scratch) / "result.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--json",
                           str(out)], env=baseline_ref.env_with_root(root),
                          stdout=subprocess.DEVNULL)  # the table is printed here, once
    if proc.returncode != 0:
      raise RuntimeError(f"bench_memory on {ref} failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
  result.update(baseline_ref=ref, baseline_commit=commit)
  return result


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.bench_memory",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="qwen-134m")
  parser.add_argument("--batch-size", type=int, default=MICRO_BATCH)
  parser.add_argument("--seq-len", type=int, default=PAPER_SEQ_LEN)
  parser.add_argument("--grad-accum", type=int, default=1)
  parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--model-overrides", default="{}",
                      help='JSON object of QwenConfig fields, e.g. \'{"remat": "none"}\'')
  parser.add_argument("--no-refresh", action="store_true",
                      help="the Sophia family's step without the GNB refresh")
  parser.add_argument("--split", action="store_true",
                      help="also apportion each total (compiles more steps; module docstring)")
  parser.add_argument("--baseline-ref", help="measure the library of this commit instead")
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                      help="comma-separated optimizer names")
  parser.add_argument("--json", help="also write the result to this file")
  args = parser.parse_args(argv)
  optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
  try:
    overrides = json.loads(args.model_overrides)
  except ValueError as e:
    overrides = e
  if not isinstance(overrides, dict):
    print(f"bench_memory: error: --model-overrides must be a JSON object of QwenConfig "
          f"fields, got {args.model_overrides!r}", file=sys.stderr)
    return 2
  try:
    if args.baseline_ref:
      forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
      forwarded = _drop_options(forwarded, ("--baseline-ref", "--json"))
      result = _at_ref(forwarded, args.baseline_ref)
    else:
      result = memory_table(args.model, args.batch_size, args.seq_len, args.grad_accum,
                            args.compute_dtype, optimizers, model_overrides=overrides,
                            refresh=not args.no_refresh)
      if args.split:
        result["split"] = split_table(result)
  except ValueError as e:
    print(f"bench_memory: error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  print(format_table(result))
  for name, row in result["optimizers"].items():
    if name != "adamw" and row["ratio_to_adamw"] is not None:
      print(f"{name} / adamw step memory: {row['ratio_to_adamw']:.3f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


def _drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
  """argv without the options `names` and their values ("--x v" or "--x=v")."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg in names:
      skip = True
    elif not arg.startswith(tuple(n + "=" for n in names)):
      out.append(arg)
  return out


if __name__ == "__main__":
  raise SystemExit(main())
