"""Run every benchmark in this directory and print one table of ratios.

    python -m experiments.benchmarks.run_all [--only NAME,...] [--timeout S] [--json PATH]

Each `bench_*.py` here measures something against a baseline in the same run (state bytes
against Sophia, update time against optax.adamw, train-step time against AdamW, tokens/s
against PyTorch, loader against train-step throughput). A benchmark module exposes

    ratios() -> {name: value}  or  {name: {"value": v, "goal": "<= 0.9", ...}}
             or  [{"name": ..., "value": ..., "goal": ...}, ...]

Every benchmark runs in its own Python process, so each gets a fresh JAX with its own flags
and memory. A `bench_*.py` without `ratios()` is reported as an error.

Goals are written "<= 0.9" or ">= 1.0"; a ratio with a goal is marked pass/FAIL.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

HERE = Path(__file__).resolve().parent
_MARK = "@@RUN_ALL_RATIOS@@"


class Ratio(NamedTuple):
  bench: str
  name: str
  value: float | None
  goal: str | None


def discover(directory: Path = HERE) -> list[Path]:
  return sorted(directory.glob("bench_*.py"))


def has_ratios(path: Path) -> bool:
  """Whether the module defines a top-level `ratios()`, found without importing it."""
  try:
    tree = ast.parse(path.read_text(), filename=str(path))
  except SyntaxError:
    return False
  return any(isinstance(n, ast.FunctionDef) and n.name == "ratios" for n in tree.body)


def check_goal(value: float | None, goal: str | None) -> bool | None:
  """True/False when `goal` ('<= 0.9', '>= 1', '< 2', '> 0') holds for `value`."""
  if goal is None or value is None or not math.isfinite(value):
    return None
  m = re.fullmatch(r"\s*(<=|>=|<|>)\s*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*x?\s*", goal)
  if not m:
    return None
  op, bound = m.group(1), float(m.group(2))
  return {"<=": value <= bound, ">=": value >= bound, "<": value < bound,
          ">": value > bound}[op]


def normalise(bench: str, result: Any) -> list[Ratio]:
  """Turn a ratio function's return value into Ratio rows (see the module docstring)."""
  rows = []
  if isinstance(result, dict):
    items = list(result.items())
  elif isinstance(result, (list, tuple)):
    items = [(r.get("name", f"#{i}"), r) for i, r in enumerate(result) if isinstance(r, dict)]
  else:
    raise ValueError(f"{bench}: ratios() returned {type(result).__name__}, expected a dict "
                     "or a list of dicts")
  for name, value in items:
    goal = None
    if isinstance(value, dict):
      goal = value.get("goal")
      value = value.get("value", value.get("ratio"))
    elif isinstance(value, (list, tuple)) and len(value) == 2:
      value, goal = value
    value = float(value) if isinstance(value, (int, float)) else None
    rows.append(Ratio(bench, str(name), value, None if goal is None else str(goal)))
  return rows


def run_bench(path: Path, timeout: float, quick: bool) -> tuple[list[Ratio], str, float]:
  """Run one benchmark in a subprocess: (ratios, error message or '', seconds)."""
  path = Path(path).resolve()
  in_package = path.parent == HERE
  module = f"experiments.benchmarks.{path.stem}"
  if not has_ratios(path):
    return [], "defines no ratios()", 0.0
  env = dict(os.environ)
  if quick:
    env["SLJ_BENCH_QUICK"] = "1"
  load = (f"import {module} as m\n" if in_package else
          "import importlib.util as u\n"
          f"s = u.spec_from_file_location({path.stem!r}, {str(path)!r})\n"
          "m = u.module_from_spec(s); s.loader.exec_module(m)\n")
  code = (f"import json\n{load}r = m.ratios()\n"
          f"print({_MARK!r} + json.dumps(r, default=float))\n")
  cmd = [sys.executable, "-c", code]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(HERE.parent.parent))
  except subprocess.TimeoutExpired:
    return [], f"timed out after {timeout:.0f} s", time.perf_counter() - t0
  seconds = time.perf_counter() - t0
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return [], f"exit {proc.returncode}: " + " / ".join(tail), seconds
  payload = [l for l in proc.stdout.splitlines() if l.startswith(_MARK)]
  if not payload:
    return [], "ratios() printed no result", seconds
  return normalise(path.stem, json.loads(payload[-1][len(_MARK):])), "", seconds


def format_table(rows: Sequence[Ratio], errors: dict[str, str],
                 seconds: dict[str, float]) -> str:
  header = ["Benchmark", "Ratio", "Value", "Goal", "Result"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    ok = check_goal(r.value, r.goal)
    lines.append("| " + " | ".join([
        r.bench, r.name, "n/a" if r.value is None else f"{r.value:.3f}", r.goal or "",
        "" if ok is None else ("pass" if ok else "FAIL")]) + " |")
  for bench, err in errors.items():
    lines.append(f"| {bench} | (no ratios) | | | error: {err} |")
  total = sum(seconds.values())
  lines.append("")
  lines.append(f"{len(seconds)} benchmark(s) in {total:.0f} s: " + ", ".join(
      f"{b} {s:.0f} s" for b, s in seconds.items()))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.run_all",
                              description=__doc__.splitlines()[0])
  p.add_argument("--only", default=None, help="comma-separated bench names (bench_x or x)")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark")
  p.add_argument("--quick", action="store_true",
                 help="set SLJ_BENCH_QUICK=1 for benchmarks that support a shorter run")
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  args = p.parse_args(argv)
  paths = discover()
  if args.only:
    wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only.split(",")}
    unknown = wanted - {q.stem for q in paths}
    if unknown:
      p.error(f"--only: no benchmark(s) {sorted(unknown)}; have {[q.stem for q in paths]}")
    paths = [q for q in paths if q.stem in wanted]
  if not paths:
    print(f"no bench_*.py in {HERE}")
    return 1
  rows, errors, seconds = [], {}, {}
  for path in paths:
    print(f"[run_all] {path.stem} ...", flush=True)
    r, err, s = run_bench(path, args.timeout, args.quick)
    rows += r
    seconds[path.stem] = s
    if err:
      errors[path.stem] = err
    print(f"[run_all] {path.stem}: {len(r)} ratio(s) in {s:.0f} s" +
          (f" ({err})" if err else ""), flush=True)
  print()
  print(format_table(rows, errors, seconds))
  if args.json:
    Path(args.json).write_text(json.dumps(
        {"ratios": [r._asdict() | {"pass": check_goal(r.value, r.goal)} for r in rows],
         "errors": errors, "seconds": seconds}, indent=2))
  failed = any(check_goal(r.value, r.goal) is False for r in rows)
  return 1 if (errors or failed) else 0


if __name__ == "__main__":
  sys.exit(main())
