"""Run every benchmark in this directory and print one table of ratios.

    python -m experiments.benchmarks.run_all [--only NAME,...] [--timeout S] [--json PATH]

Each `bench_*.py` here measures something against a baseline in the same run (state bytes
against Sophia, update time against optax.adamw, train-step time against AdamW, tokens/s
against PyTorch, loader against train-step throughput). A benchmark module exposes

    ratios() -> {name: value}  or  {name: {"value": v, "goal": "<= 0.9", ...}}
             or  [{"name": ..., "value": ..., "goal": ...}, ...]

(`run_ratios` / `benchmark_ratios` are accepted too). Every benchmark runs in its own
Python process, so each gets a fresh JAX with its own flags and memory. A module without
such a function is run as a script (`python -m experiments.benchmarks.bench_x`) and every
printed line of the form `NAME: 0.83x` / `NAME = 0.83x` / `NAME ratio 0.83` is taken as a
ratio; the table says which benchmarks were parsed that way.

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
RATIO_FUNCTIONS = ("ratios", "run_ratios", "benchmark_ratios")
_MARK = "@@RUN_ALL_RATIOS@@"
# "name: 0.83x", "name = 0.83 x", "name: 0.83x (goal <= 0.9)"; or "name ratio 0.83".
_VALUE = r"(?P<value>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*x?\b"
_GOAL = r"(?:.*?\bgoal\b\s*(?P<goal>[<>]=?\s*[-+]?\d+(?:\.\d+)?))?"
_LINES = (re.compile(r"^\s*(?P<name>[A-Za-z][^:=]*?)\s*[:=]\s*" + _VALUE + _GOAL),
          re.compile(r"^\s*(?P<name>[A-Za-z].*?\bratio)\s+" + _VALUE + _GOAL))


class Ratio(NamedTuple):
  bench: str
  name: str
  value: float | None
  goal: str | None
  source: str          # "function" or "parsed output"


def discover(directory: Path = HERE) -> list[Path]:
  return sorted(directory.glob("bench_*.py"))


def ratio_function(path: Path) -> str | None:
  """The name of the module's top-level ratio function, found without importing it."""
  try:
    tree = ast.parse(path.read_text(), filename=str(path))
  except SyntaxError:
    return None
  names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
  return next((f for f in RATIO_FUNCTIONS if f in names), None)


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


def normalise(bench: str, result: Any, source: str) -> list[Ratio]:
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
    rows.append(Ratio(bench, str(name), value, None if goal is None else str(goal), source))
  return rows


def parse_output(bench: str, text: str) -> list[Ratio]:
  """Ratios printed by a script, one per matching line."""
  rows = []
  for line in text.splitlines():
    if "ratio" not in line.lower() and not re.search(r"\d\s*x\b", line):
      continue
    m = _LINES[0].match(line) or _LINES[1].match(line)
    if m:
      rows.append(Ratio(bench, m.group("name").strip(), float(m.group("value")),
                        m.group("goal").replace(" ", "") if m.group("goal") else None,
                        "parsed output"))
  return rows


def run_bench(path: Path, timeout: float, quick: bool) -> tuple[list[Ratio], str, float]:
  """Run one benchmark in a subprocess: (ratios, error message or '', seconds)."""
  path = Path(path).resolve()
  in_package = path.parent == HERE
  module = f"experiments.benchmarks.{path.stem}"
  fn = ratio_function(path)
  env = dict(os.environ)
  if quick:
    env["SLJ_BENCH_QUICK"] = "1"
  if fn:
    load = (f"import {module} as m\n" if in_package else
            "import importlib.util as u\n"
            f"s = u.spec_from_file_location({path.stem!r}, {str(path)!r})\n"
            "m = u.module_from_spec(s); s.loader.exec_module(m)\n")
    code = (f"import json\n{load}r = m.{fn}()\n"
            f"print({_MARK!r} + json.dumps(r, default=float))\n")
    cmd = [sys.executable, "-c", code]
  else:
    cmd = [sys.executable, "-m", module] if in_package else [sys.executable, str(path)]
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
  if fn:
    payload = [l for l in proc.stdout.splitlines() if l.startswith(_MARK)]
    if not payload:
      return [], f"{fn}() printed no result", seconds
    return normalise(path.stem, json.loads(payload[-1][len(_MARK):]), "function"), "", seconds
  rows = parse_output(path.stem, proc.stdout)
  return rows, "" if rows else "no ratio found in its output", seconds


def format_table(rows: Sequence[Ratio], errors: dict[str, str],
                 seconds: dict[str, float]) -> str:
  header = ["Benchmark", "Ratio", "Value", "Goal", "Result", "Source"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    ok = check_goal(r.value, r.goal)
    lines.append("| " + " | ".join([
        r.bench, r.name, "n/a" if r.value is None else f"{r.value:.3f}", r.goal or "",
        "" if ok is None else ("pass" if ok else "FAIL"), r.source]) + " |")
  for bench, err in errors.items():
    lines.append(f"| {bench} | (no ratios) | | | error | {err} |")
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
