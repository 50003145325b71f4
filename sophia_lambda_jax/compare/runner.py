"""Compare the optimizers under a protocol: `slj compare --protocol cpu`.

    python -m sophia_lambda_jax.compare.runner --protocol cpu [--seeds N] [--out DIR]
    python -m sophia_lambda_jax.compare.runner --protocol paper-short --data DIR \
        [--set mesh=data=8,fsdp=1]
    # multi-host: the same command on every host, with its own --process-id
    python -m sophia_lambda_jax.compare.runner --protocol paper --coordinator HOST0:1234 \
        --num-processes 2 --process-id 0 --set mesh=data=2,fsdp=8

Every (optimizer, seed[, learning rate]) of the protocol (see
`sophia_lambda_jax.compare.protocols`) is one `sophia_lambda_jax.train.run_training` call
writing into its own run directory `<out>/<label>/seed<seed>`. The runner is restartable:

  * a run whose `summary.json` exists is finished and is skipped;
  * a run without one is (re)started, and the training script resumes it from its newest
    complete checkpoint, so an interrupted compare continues where it stopped;
  * a run that raised is recorded in `failed.json` next to its metrics and skipped on later
    invocations unless `--retry-failed` is given (a diverged run diverges again);
  * an existing run directory whose config.json differs from the planned run in a field the
    results depend on (`train.config.RESULTS_DEPEND_ON`: not the output, logging or
    checkpoint cadence, mesh or hosts) is refused before anything runs, naming the fields:
    `--overwrite` retrains those runs, or choose a new --out. So `plan.json` always
    describes the runs in the tables.

Every TrainConfig of the plan is built (and so validated) before the first run: a bad
`--set` value is one line and exit 2, and no run is marked failed. One compare at a time
writes into --out (`directory_lock`, on process 0).

At the end the runner writes `<out>/results.json`, `<out>/results.md` (the papers' tables
with our measurements side by side, see `sophia_lambda_jax.compare.tables`) and the loss-curve PNGs
(`sophia_lambda_jax.compare.plots`), and prints the summary table. With the same seeds on the same
machine a re-run reproduces the same losses (the training script is deterministic given
its config); times and throughputs are measurements and vary.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax

from sophia_lambda_jax.compare import plots, protocols, tables
from sophia_lambda_jax.compare.protocols import RunSpec
from sophia_lambda_jax.directory_lock import DirectoryInUse, directory_lock
from sophia_lambda_jax.runs import FAILED, SUMMARY, read_summary, run_status
from sophia_lambda_jax.train import run_training
from sophia_lambda_jax.train.config import result_differences

PLAN = "plan.json"

# The function that trains one run; tests replace it with a fake.
Trainer = Callable[[object], dict]


# Set by main() from --process-id, so that files are written by process 0 only even before
# the first run has initialised jax.distributed.
_PROCESS_ID: int | None = None


def _is_main_process() -> bool:
  if _PROCESS_ID is not None:
    return _PROCESS_ID == 0
  return jax.process_index() == 0


def write_plan(root: Path, specs: Sequence[RunSpec], protocol: str, extra: dict | None = None):
  """Record the specs of this compare in `<root>/plan.json` (tables and plots read it)."""
  if not _is_main_process():
    return
  root.mkdir(parents=True, exist_ok=True)
  plan = {"protocol": protocol, "runs": [s.to_json() for s in specs], **(extra or {})}
  tmp = root / (PLAN + ".tmp")
  with open(tmp, "w") as f:
    json.dump(plan, f, indent=2, sort_keys=True)
  os.replace(tmp, root / PLAN)


def conflicting_runs(specs: Sequence[RunSpec], root: Path) -> dict[str, list[str]]:
  """{run name: differing fields} of the existing run directories whose config.json does
  not match the planned run (`train.config.result_differences`)."""
  conflicts = {}
  for spec in specs:
    path = root / spec.run_name / "config.json"
    if not path.is_file():
      continue
    try:
      saved = json.loads(path.read_text())
    except json.JSONDecodeError:
      saved = {}
    diffs = result_differences(saved, spec.train_config(str(root / spec.run_name)))
    if diffs:
      conflicts[spec.run_name] = diffs
  return conflicts


def resolve_conflicts(specs: Sequence[RunSpec], root: Path, overwrite: bool,
                      log=print) -> bool:
  """Refuse (False, with the reasons on stderr) when existing runs were trained with other
  settings; with `overwrite` delete those runs (they are trained again) and return True."""
  conflicts = conflicting_runs(specs, root)
  if not conflicts:
    return True
  if overwrite:
    for name in conflicts:
      if _is_main_process():
        shutil.rmtree(root / name)
    log(f"[compare] --overwrite: {len(conflicts)} run(s) trained with other settings "
        f"deleted, trained again: {', '.join(conflicts)}")
    return True
  lines = [f"slj compare: error: {root} holds {len(conflicts)} run(s) trained with other "
           "settings than this plan:"]
  lines += [f"  {name}: {'; '.join(diffs)}" for name, diffs in conflicts.items()]
  lines.append("  Use another --out, or --overwrite to train those runs again.")
  print("\n".join(lines), file=sys.stderr)
  return False


def _fmt_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s"


def execute(specs: Sequence[RunSpec], root: Path, *, trainer: Trainer | None = None,
            retry_failed: bool = False, deadline: float | None = None,
            log=print) -> dict[str, str]:
  """Train every spec not yet finished, in order; return {run_name: final status}.

  Skips finished runs (summary.json), resumes partial ones (the training script continues
  from its checkpoints), records exceptions in failed.json and goes on with the next run.
  Starts no run once `time.monotonic()` has passed `deadline` (those stay pending).
  """
  trainer = trainer or run_training
  root = Path(root)
  statuses: dict[str, str] = {}
  todo = []
  for spec in specs:
    status = run_status(root / spec.run_name)
    if status == "failed" and retry_failed:
      (root / spec.run_name / FAILED).unlink(missing_ok=True)
      status = run_status(root / spec.run_name)
    statuses[spec.run_name] = status
    if status in ("pending", "partial"):
      todo.append(spec)
  done = sum(s == "done" for s in statuses.values())
  log(f"[compare] {len(specs)} runs: {done} finished, {len(todo)} to run"
      + (f", {sum(s == 'failed' for s in statuses.values())} failed earlier (--retry-failed)"
         if any(s == "failed" for s in statuses.values()) else ""))
  started = time.perf_counter()
  for i, spec in enumerate(todo):
    if deadline is not None and time.monotonic() >= deadline:
      log(f"[compare] stage time is up: {len(todo) - i} run(s) left for the next invocation")
      break
    run_dir = root / spec.run_name
    resume = " (resuming)" if statuses[spec.run_name] == "partial" else ""
    elapsed = time.perf_counter() - started
    eta = "" if i == 0 else f", ETA {_fmt_duration(elapsed / i * (len(todo) - i))}"
    log(f"[compare] run {i + 1}/{len(todo)}: {spec.run_name}{resume} "
        f"({spec.optimizer}, lr {spec.fields.get('learning_rate') or 'default'}, "
        f"seed {spec.seed}){eta}")
    t0 = time.perf_counter()
    try:
      config = spec.train_config(str(run_dir))
      summary = trainer(config)
    except Exception as e:  # one bad run must not stop the comparison; KeyboardInterrupt does
      statuses[spec.run_name] = "failed"
      if _is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / FAILED, "w") as f:
          json.dump({"error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()}, f, indent=2)
      log(f"[compare]   FAILED after {_fmt_duration(time.perf_counter() - t0)}: "
          f"{type(e).__name__}: {e}")
      continue
    statuses[spec.run_name] = "done" if (run_dir / SUMMARY).is_file() else "failed"
    if statuses[spec.run_name] == "failed" and _is_main_process():
      with open(run_dir / FAILED, "w") as f:
        json.dump({"error": "run_training returned without writing summary.json"}, f)
    val = (summary or {}).get("final_val_loss")
    val_s = f"{val:.4f}" if isinstance(val, (int, float)) else "n/a"
    log(f"[compare]   done in {_fmt_duration(time.perf_counter() - t0)}: "
        f"final val loss {val_s}")
  log(f"[compare] all runs handled in {_fmt_duration(time.perf_counter() - started)}")
  return statuses


def enable_compilation_cache(directory: Path) -> bool:
  """Keep compiled train steps on disk (JAX's persistent compilation cache), so the seeds of
  one configuration, and a restarted compare, compile each step once. The executables are
  the same, so the numbers are too. Leaves a cache the user configured alone."""
  if jax.config.jax_compilation_cache_dir:
    return False
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return True


def _outcome(root: Path) -> protocols.Outcome:
  """spec -> (final validation loss, unclipped fraction) from the run's summary.json, (None,
  None) for a run that failed, None for one that has not ended."""
  def get(spec: RunSpec) -> tuple[float | None, float | None] | None:
    status = run_status(root / spec.run_name)
    if status not in ("done", "failed"):
      return None
    summary = read_summary(root / spec.run_name) or {}
    val, unclipped = summary.get("final_val_loss"), summary.get("unclipped_fraction")
    return (float(val) if isinstance(val, (int, float)) else None,
            float(unclipped) if isinstance(unclipped, (int, float)) else None)
  return get


def _parse_set(items: Iterable[str]) -> dict:
  """`--set key=value` pairs: value parsed as JSON when it is JSON, else kept as a string
  (so `--set mesh=data=8,fsdp=1` and `--set steps=500` both work)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="slj compare",
      description="Train every optimizer under a protocol and tabulate the results "
                  "against the papers' claims. Restartable: finished runs are skipped.")
  p.add_argument("--protocol", default="cpu", choices=sorted(protocols.PROTOCOLS),
                 help="cpu (default): qwen-cpu on the built-in corpus; paper / paper-short: "
                      "qwen-134m on FineWeb shards (GPU); tuned: per-optimizer lr sweep; "
                      "cpu-long: five optimizers at their tuned settings, 25x cpu's steps; "
                      "cpu-long-tuned: every optimizer tuned at cpu-long's length")
  p.add_argument("--seeds", type=int, default=None,
                 help="number of seeds 0..N-1 (default: 1; tuned: 3 final seeds 1..3; "
                      "cpu-long and cpu-long-tuned: 3)")
  p.add_argument("--out", default=None, help="run directory (default: runs/compare-PROTOCOL)")
  p.add_argument("--optimizers", default=None,
                 help="comma-separated optimizer names (default: every registered one)")
  p.add_argument("--data", default=None,
                 help="prepared token directory (`slj tokenize`); default: 'builtin' for cpu, "
                      f"cpu-long and tuned, ./{protocols.PAPER_DATA} for paper and paper-short")
  p.add_argument("--steps", type=int, default=None, help="override the protocol's steps")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override any TrainConfig field for every run, e.g. --set "
                      "mesh=data=8,fsdp=1 or --set grad_accum=4 (repeatable)")
  p.add_argument("--coordinator", default=None,
                 help="multi-host: jax.distributed coordinator address host:port (the same "
                      "on every host; every host runs the same command)")
  p.add_argument("--num-processes", type=int, default=None, help="multi-host: process count")
  p.add_argument("--process-id", type=int, default=None, help="multi-host: this process")
  p.add_argument("--retry-failed", action="store_true", help="re-run runs that raised")
  p.add_argument("--overwrite", action="store_true",
                 help="retrain existing runs whose settings differ from the plan (default: "
                      "refuse)")
  p.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                 help="start no new run after MINUTES (a stage of a long protocol); the same "
                      "command continues it")
  p.add_argument("--list", action="store_true", help="print the plan and exit")
  p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--no-compile-cache", action="store_true",
                 help="do not keep compiled steps in OUT/.compile_cache")
  return p


def _overrides(args) -> dict:
  overrides = _parse_set(args.set)
  if args.steps is not None:
    if args.steps < 1:
      raise ValueError(f"--steps must be >= 1, got {args.steps}")
    overrides["steps"] = args.steps
  if args.data is not None:
    overrides["data"] = args.data
  for name in ("coordinator", "num_processes", "process_id"):
    if getattr(args, name) is not None:
      overrides[name] = getattr(args, name)
  if args.protocol in ("paper", "paper-short") and not args.list:
    data = Path(overrides.get("data", protocols.PAPER_DATA))
    if not data.is_dir():
      raise ValueError(
          f"--protocol {args.protocol} trains on FineWeb token shards and {str(data)!r} is not "
          f"a directory: run `slj tokenize 'PATH/TO/fineweb/*.parquet' {data}` first, or pass "
          "--data DIR")
  return overrides


def plan(args, outcome: protocols.Outcome | None = None) -> list[RunSpec]:
  """The specs the arguments ask for; an adaptive protocol's as far as `outcome` (the results
  so far; None: none yet) allows. Every spec's TrainConfig is built, so checked."""
  optimizers = (tuple(o.strip() for o in args.optimizers.split(",") if o.strip())
                if args.optimizers else None)
  seeds = args.seeds if args.seeds is not None else protocols.DEFAULT_SEEDS[args.protocol]
  adaptive = {"outcome": outcome} if args.protocol in protocols.ADAPTIVE else {}
  specs = protocols.get_protocol(args.protocol)(seeds, optimizers, **adaptive,
                                                **_overrides(args))
  for spec in specs:  # every field and value checked before anything runs
    spec.train_config("unused")
  return specs


def code_version() -> dict:
  """The git commit of the checkout this package runs from and whether tracked files differ
  from it ({"commit": None} when it is not a git checkout, e.g. an installed wheel)."""
  repo = Path(__file__).resolve().parents[2]
  try:
    installed = importlib.metadata.version("sophia-lambda-jax")
  except importlib.metadata.PackageNotFoundError:
    installed = None
  version = {"commit": None, "dirty": None, "version": installed}
  if not (repo / ".git").exists():
    return version
  try:
    git = ["git", "-C", str(repo)]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=30, check=True).stdout.strip()
    status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return version
  return dict(version, commit=commit, dirty=bool(status.strip()))


def mixed_code(root: Path, code: dict) -> str | None:
  """Why `root`'s runs must not be continued by this code (they were made by another
  commit), or None."""
  plan_path = root / PLAN
  if not plan_path.is_file():
    return None
  try:
    before = (json.loads(plan_path.read_text()).get("code") or {}).get("commit")
  except json.JSONDecodeError:
    return None
  if not before or not code.get("commit") or before == code["commit"]:
    return None
  return (f"{root} holds runs made by commit {before[:12]} and this is {code['commit'][:12]}: "
          f"the runs of one comparison come from one commit. Continue from a checkout of "
          f"{before[:12]} (e.g. `git worktree add ../at-{before[:7]} {before[:12]}`), or use "
          f"another --out.")


def main(argv: Sequence[str] | None = None, *, trainer: Trainer | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
  root = Path(args.out or f"runs/compare-{args.protocol}")
  global _PROCESS_ID
  _PROCESS_ID = args.process_id
  if args.stop_after is not None and not args.stop_after > 0:
    parser.error(f"--stop-after must be a number of minutes > 0, got {args.stop_after}")
  try:
    specs = plan(args, _outcome(root))
  except ValueError as e:
    parser.error(str(e))
  if args.list:
    for spec in specs:
      print(f"{spec.run_name}: {json.dumps(spec.fields, sort_keys=True)}")
    if args.protocol in protocols.ADAPTIVE:
      print("... and the runs that the results of these add (rates beyond an end of a sweep, "
            "the final seeds of each chosen setting)")
    return 0

  lock = directory_lock(root, what="`slj compare`") if _is_main_process() \
      else contextlib.nullcontext()
  try:
    with lock:
      return _compare(args, specs, root, trainer)
  except DirectoryInUse as e:
    print(f"slj compare: error: {e}", file=sys.stderr)
    return 1


def _plan_extra(args, specs: Sequence[RunSpec], outcome: protocols.Outcome,
                code: dict) -> dict:
  """What plan.json records beside the runs: the code, and an adaptive protocol's choices."""
  extra = {"code": code}
  if args.protocol in protocols.ADAPTIVE:
    extra["best_settings"] = protocols.chosen_settings(specs, outcome)
  if args.protocol == "cpu-long-tuned":
    extra["extensions"] = protocols.cpu_long_tuned_extensions(specs)
  return extra


def _compare(args, specs: list[RunSpec], root: Path, trainer: Trainer | None) -> int:
  code = code_version()
  mixed = mixed_code(root, code)
  if mixed:
    print(f"slj compare: error: {mixed}", file=sys.stderr)
    return 1
  deadline = None if args.stop_after is None else time.monotonic() + 60 * args.stop_after
  adaptive = args.protocol in protocols.ADAPTIVE
  print(f"[compare] protocol {args.protocol}: {len(specs)} runs into {root}"
        + (" (more as the results of these come in)" if adaptive else ""))
  if not args.no_compile_cache and trainer is None:
    enable_compilation_cache((root / ".compile_cache").absolute())
  outcome = _outcome(root)
  statuses: dict[str, str] = {}
  while True:
    if not resolve_conflicts(specs, root, args.overwrite):
      return 1
    try:
      write_plan(root, specs, args.protocol, _plan_extra(args, specs, outcome, code))
    except ValueError as e:
      print(f"[compare] {e}", file=sys.stderr)
      return 1
    statuses.update(execute([s for s in specs if s.run_name not in statuses], root,
                            trainer=trainer, retry_failed=args.retry_failed,
                            deadline=deadline))
    if not adaptive or (deadline is not None and time.monotonic() >= deadline):
      break
    try:
      more = plan(args, outcome)
    except ValueError as e:
      print(f"[compare] {e}", file=sys.stderr)
      return 1
    if [s.run_name for s in more] == [s.run_name for s in specs]:
      break
    specs = more
  if adaptive and _is_main_process():
    chosen = protocols.chosen_settings(specs, outcome)
    if chosen:
      print("[compare] chosen settings: " + ", ".join(
          f"{o} lr {b['learning_rate']:.2e}" + "".join(
              f" {k} {v}" for k, v in b["optimizer_kwargs"].items())
          for o, b in chosen.items()))

  if not _is_main_process():
    return 0
  report = tables.write_report(root)
  print()
  print(report["markdown_summary"])
  print(f"[compare] wrote {root / 'results.md'} and {root / 'results.json'}")
  if not args.no_plots:
    for path in plots.write_plots(root):
      print(f"[compare] wrote {path}")
  failed = sorted(k for k, v in statuses.items() if v in ("failed", "partial"))
  left = sorted(k for k, v in statuses.items() if v == "pending")
  if failed:
    print(f"[compare] {len(failed)} run(s) did not finish: {', '.join(failed)}",
          file=sys.stderr)
    return 1
  if left:
    print(f"[compare] stopped after --stop-after {args.stop_after:g} min with {len(left)} "
          f"planned run(s) left: run the same command again to continue")
  return 0


if __name__ == "__main__":
  sys.exit(main())
