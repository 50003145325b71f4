"""Evidence for the rho controller (docs/design.md section 3.5): Sophia-Lambda and Sophia-G
with rho="auto" against fixed rhos, paired by seed, in three settings.

    python -m experiments.rho_controller [--stages a,b,c] [--out DIR] [--seeds 10,11,12]

Stages (run them together or one at a time; every invocation trains what is missing of
the stages it is given and reports on every finished run of all three):

  a  the cpu setting (qwen-cpu, built-in corpus, 120 steps of 8 x 128 tokens, each
     optimizer's default learning rate): auto against the calibrated rho 0.2.
  b  the cpu-long setting (3,000 steps, learning rate 1e-3 as tuned): auto against rho 0.2
     and 0.4.
  c  4x the batch tokens (32 x 128, 300 steps, the cpu setting otherwise): auto against
     rho 0.1, 0.2 and 0.4 (x0.5, x1, x2 the calibrated rho; the table names the best).

Every run has the Hessian EMA's bias correction on (the cpu regime,
`compare.protocols.CPU_REGIME_KWARGS`) and differs from its pair only in rho. Seeds 10, 11
and 12 by default. The report, `<out>/results.md` and `results.json`: per stage and
optimizer, the final validation loss of each configuration, the paired difference auto
minus fixed (mean over seeds of the per-seed differences, with its standard error; 'better'
or 'worse' only beyond 2 standard errors), the unclipped fraction over the second half of
training (overall and per role), the final rho and the Hessian overhead; and whether one
fixed rho beats auto beyond 2 standard errors in every setting (the rule that would change
Sophia-Lambda's default). `<out>/rho.png` plots rho against step (the auto runs, mean over
seeds, and the fixed rhos), `<out>/clip_fraction.png` the clip fraction of every
configuration. Restartable like `slj compare` (finished runs are skipped, interrupted ones
resume from their checkpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from sophia_lambda_jax.compare import protocols
from sophia_lambda_jax.compare.protocols import RunSpec

OPTIMIZERS = ("sophia_lambda", "sophia")
SEEDS = (10, 11, 12)
STAGES = ("a", "b", "c")
STAGE_TITLES = {"a": "cpu setting (120 steps of 8 x 128 tokens)",
                "b": "cpu-long setting (3,000 steps of 8 x 128 tokens)",
                "c": "4x the batch tokens (300 steps of 32 x 128 tokens)"}
# The fixed rhos each stage compares with: the calibrated rho of the cpu setting (0.2), the
# tuned one (0.4) at 3,000 steps, and x0.5 / x1 / x2 around 0.2 at 4x the batch.
FIXED_RHOS = {"a": (0.2,), "b": (0.2, 0.4), "c": (0.1, 0.2, 0.4)}
BIG_BATCH, BIG_BATCH_STEPS = 32, 300


def stage_fields(stage: str, optimizer: str, **overrides) -> dict:
  """TrainConfig fields of one stage, rho left to the spec."""
  if stage == "a":
    return protocols.cpu_fields(**overrides)
  if stage == "b":
    learning_rate = protocols.CPU_LONG_SETTINGS[optimizer]["learning_rate"]
    return protocols.cpu_long_fields(**{"learning_rate": learning_rate, **overrides})
  steps = overrides.get("steps", BIG_BATCH_STEPS)
  return protocols.cpu_fields(**{
      "batch_size": BIG_BATCH, "steps": steps, "warmup_steps": steps // 10,
      "eval_every": max(steps // 6, 1), "checkpoint_every": max(steps // 2, 1), **overrides})


def rho_tag(rho) -> str:
  return "auto" if rho == "auto" else f"rho{rho:g}"


def controller_specs(stages: Sequence[str] = STAGES, seeds: Sequence[int] = SEEDS,
                     optimizers: Sequence[str] = OPTIMIZERS, **overrides) -> list[RunSpec]:
  """The runs of the given stages: each optimizer at rho "auto" and each fixed rho."""
  unknown = sorted(set(stages) - set(STAGES))
  if unknown or not stages:
    raise ValueError(f"stages must be a non-empty subset of {list(STAGES)}, got "
                     f"{list(stages)}")
  if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
    raise ValueError(f"seeds must be non-negative integers, got {list(seeds)}")
  specs = []
  for stage in STAGES:
    if stage not in stages:
      continue
    for opt in protocols.check_optimizers(optimizers):
      base = stage_fields(stage, opt, **overrides)
      for rho in ("auto",) + FIXED_RHOS[stage]:
        kwargs = {**protocols.CPU_REGIME_KWARGS[opt], **base["optimizer_kwargs"], "rho": rho}
        fields = dict(base, optimizer=opt, optimizer_kwargs=kwargs)
        specs += [RunSpec(f"{stage}/{opt}/{rho_tag(rho)}", opt, s, fields, "rho-controller",
                          stage, opt) for s in seeds]
  return specs


# ----------------------------------------------------------------------------- report

def paired_difference(auto: dict[int, float], fixed: dict[int, float]) -> dict:
  """auto - fixed over the seeds both finished: mean, standard error (n >= 2), verdict."""
  seeds = sorted(set(auto) & set(fixed))
  diffs = [auto[s] - fixed[s] for s in seeds]
  if not diffs:
    return {"n": 0, "mean": None, "se": None, "verdict": "n/a"}
  mean = sum(diffs) / len(diffs)
  se = None
  if len(diffs) > 1:
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
  if se is None:
    verdict = "one seed"
  elif mean < -2 * se:
    verdict = "auto better"
  elif mean > 2 * se:
    verdict = "auto worse"
  else:
    verdict = "within noise"
  return {"n": len(diffs), "mean": mean, "se": se, "verdict": verdict}


def _by_seed(records, label: str, value) -> dict[int, float]:
  out = {}
  for r in records:
    if r.spec.label == label and r.status == "done" and r.summary is not None:
      v = value(r)
      if isinstance(v, (int, float)) and math.isfinite(v):
        out[r.spec.seed] = float(v)
  return out


def _final_rho(record) -> float | None:
  rhos = [m["rho"] for m in record.metrics if isinstance(m.get("rho"), (int, float))]
  return rhos[-1] if rhos else None


def controller_report(root: Path, command: str = "python -m experiments.rho_controller") -> dict:
  from sophia_lambda_jax.compare import tables
  from sophia_lambda_jax.train.metrics import in_unclipped_band

  _, records = tables.load_results(root)
  aggs = tables.aggregate(records)
  val = lambda r: tables._final_val(r)
  stages = {}
  for stage in STAGES:
    per_opt = {}
    for opt in OPTIMIZERS:
      auto_label = f"{stage}/{opt}/auto"
      if auto_label not in aggs:
        continue
      auto = _by_seed(records, auto_label, val)
      rows = []
      for rho in ("auto",) + FIXED_RHOS[stage]:
        label = f"{stage}/{opt}/{rho_tag(rho)}"
        a = aggs.get(label)
        if a is None:
          continue
        u = a.get("unclipped_fraction")
        roles = a.get("unclipped_fraction_by_role") or {}
        rows.append({
            "label": label, "rho": rho, "finished": a["finished"], "runs": a["runs"],
            "val_loss": tables._jsonable(a["final_val_loss"]),
            "vs_auto": None if rho == "auto" else paired_difference(
                auto, _by_seed(records, label, val)),
            "unclipped": None if u is None else tables._jsonable(u),
            "unclipped_by_role": {k: v.mean for k, v in roles.items()},
            "in_band": None if u is None else in_unclipped_band(u.mean),
            "final_rho": tables._jsonable(tables.stat(
                _by_seed(records, label, _final_rho).values())),
            "hessian_overhead": a["hessian_overhead"].mean})
      if not any(r["finished"] for r in rows):  # a stage not run yet
        continue
      fixed = [r for r in rows if r["rho"] != "auto" and r["val_loss"]["mean"] is not None]
      best = min(fixed, key=lambda r: r["val_loss"]["mean"])["rho"] if fixed else None
      per_opt[opt] = {"rows": rows, "best_fixed_rho": best}
    if per_opt:
      stages[stage] = per_opt
  verdicts = {}
  for opt in OPTIMIZERS:
    mine = {stage: per_opt[opt] for stage, per_opt in stages.items() if opt in per_opt}
    if not mine:
      continue
    common = set.intersection(*(set(FIXED_RHOS[stage]) for stage in STAGES))
    beats = {}
    for rho in sorted(common):
      outcomes = []
      for stage in STAGES:
        row = next((r for r in mine.get(stage, {"rows": []})["rows"] if r["rho"] == rho),
                   None)
        outcomes.append(None if row is None or row["vs_auto"]["se"] is None
                        else row["vs_auto"]["verdict"] == "auto worse")
      beats[rho] = (None if None in outcomes else all(outcomes))
    verdicts[opt] = beats
  return {"stages": stages, "fixed_beats_auto_everywhere": verdicts,
          "markdown": _markdown(stages, verdicts, command)}


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.1f} %"


def _markdown(stages: dict, verdicts: dict, command: str) -> str:
  import jax

  from sophia_lambda_jax.compare import tables

  lines = ["# The rho controller against fixed rho", "",
           f"Made with `{command}` (jax {jax.__version__}, {os.cpu_count()} CPU cores; one "
           "stage at a time: `--stages a`, `--stages b`, `--stages c`).", "",
           "Final validation loss: mean ± sample std over seeds. 'auto - fixed': the mean "
           "over seeds of the per-seed difference of final validation losses ± its standard "
           "error (negative: auto is better); 'better'/'worse' only beyond 2 standard "
           "errors. Unclipped: 1 - clip fraction over the second half of training, "
           "mean ± std over seeds, then per role (the band is 10-50 %). Final rho: the rho of "
           "the last update (mean over seeds). Hessian overhead: extra step time of the "
           "refreshes, averaged over all steps."]
  for stage, per_opt in stages.items():
    lines += ["", f"## ({stage}) {STAGE_TITLES[stage]}"]
    for opt, entry in per_opt.items():
      roles = sorted({k for r in entry["rows"] for k in r["unclipped_by_role"]})
      header = (["rho", "Val loss", "auto - fixed", "Unclipped"] + roles
                + ["Final rho", "Hessian overhead", "Runs"])
      body = []
      for r in entry["rows"]:
        d = r["vs_auto"]
        diff = "-" if d is None else (
            "n/a" if d["mean"] is None else
            f"{d['mean']:+.4f}" + ("" if d["se"] is None else f" ± {d['se']:.4f}")
            + f" ({d['verdict']})")
        u = r["unclipped"]
        unclipped = "n/a" if u is None or u["mean"] is None else (
            f"{100 * u['mean']:.1f}" + ("" if u["std"] is None else f" ± {100 * u['std']:.1f}")
            + " %" + ("" if r["in_band"] else " (out of band)"))
        rho = r["final_rho"]
        overhead = r["hessian_overhead"]
        body.append([
            str(r["rho"]) if r["rho"] == "auto" else f"{r['rho']:g}",
            tables.Stat(**r["val_loss"]).fmt(3), diff, unclipped]
            + [_pct(r["unclipped_by_role"].get(k)) for k in roles]
            + ["n/a" if rho["mean"] is None else f"{rho['mean']:.3g}",
               "n/a" if overhead is None else f"{100 * overhead:.1f} %",
               f"{r['finished']}/{r['runs']}"])
      lines += ["", f"### {tables.display_name(opt)}", "", tables._md_table(header, body)]
      if stage == "c" and entry["best_fixed_rho"] is not None:
        lines += ["", f"Best fixed rho of x0.5 / x1 / x2 around 0.2: {entry['best_fixed_rho']:g}."]
  lines += ["", "## Default", ""]
  for opt, beats in verdicts.items():
    for rho, outcome in beats.items():
      state = ("not all settings finished (with 2 seeds or more)" if outcome is None else
               "yes: a fixed rho would be the better default" if outcome else "no")
      lines.append(f"- {tables.display_name(opt)}: fixed rho {rho:g} better than auto beyond "
                   f"2 standard errors in all three settings: {state}.")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot

def plot_rho(records, path: Path) -> Path | None:
  """rho against step: each stage a panel, the auto runs (mean of log rho over seeds) of
  each optimizer, and its fixed rhos as dashed lines."""
  import numpy as np
  from matplotlib.figure import Figure

  stages = [s for s in STAGES if any(r.spec.phase == s and r.metrics for r in records)]
  if not stages:
    return None
  fig = Figure(figsize=(5 * len(stages), 4), constrained_layout=True)
  axes = fig.subplots(1, len(stages), squeeze=False)[0]
  colours = {"sophia_lambda": "C0", "sophia": "C1"}
  for ax, stage in zip(axes, stages):
    for opt in OPTIMIZERS:
      curves = []
      for r in records:
        if r.spec.label == f"{stage}/{opt}/auto":
          pts = {int(m["step"]): float(m["rho"]) for m in r.metrics
                 if isinstance(m.get("rho"), (int, float)) and "loss" in m}
          if pts:
            curves.append(pts)
      if curves:
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = np.exp(np.mean([[math.log(c[s]) for s in steps] for c in curves], axis=0))
        ax.plot(steps, mean, color=colours[opt],
                label=f"{opt} auto (n={len(curves)})")
        for rho in FIXED_RHOS[stage]:
          ax.axhline(rho, color=colours[opt], linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("rho")
    ax.set_title(f"({stage}) {STAGE_TITLES[stage]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="dashed: fixed rhos", title_fontsize=7)
  fig.savefig(path, dpi=110)
  return Path(path)


# ----------------------------------------------------------------------------- main

def _write(root: Path, name: str, text: str) -> None:
  tmp = root / (name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, root / name)


def main(argv: Sequence[str] | None = None, *, trainer=None) -> int:
  from sophia_lambda_jax.compare import runner

  p = argparse.ArgumentParser(prog="python -m experiments.rho_controller",
                              description="The rho controller against fixed rho.")
  p.add_argument("--stages", default=",".join(STAGES),
                 help="comma-separated stages to train: a (cpu), b (cpu-long), c (4x batch)")
  p.add_argument("--out", default="runs/rho-controller")
  p.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                 help="comma-separated seeds (default 10,11,12)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a TrainConfig field for every run (repeatable)")
  p.add_argument("--retry-failed", action="store_true")
  p.add_argument("--overwrite", action="store_true",
                 help="retrain runs whose settings differ from the plan (default: refuse)")
  p.add_argument("--list", action="store_true", help="print the runs and exit")
  args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  try:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    overrides = runner._parse_set(args.set)
    every = controller_specs(STAGES, seeds, **overrides)
    chosen = controller_specs(stages, seeds, **overrides)
    for spec in every:
      spec.train_config("unused")  # every field checked before anything runs
  except ValueError as e:
    p.error(str(e))
  root = Path(args.out)
  if args.list:
    for s in chosen:
      print(f"{s.run_name}: {json.dumps(s.fields, sort_keys=True)}")
    return 0
  if not runner.resolve_conflicts(chosen, root, args.overwrite):
    return 1
  runner.write_plan(root, every, "rho-controller")  # the report covers all stages
  if trainer is None:
    runner.enable_compilation_cache(root / ".compile_cache")
  statuses = runner.execute(chosen, root, trainer=trainer, retry_failed=args.retry_failed)
  if not runner._is_main_process():
    return 0
  command = "python -m experiments.rho_controller " + " ".join(
      a for a in (sys.argv[1:] if argv is None else argv) if a)
  report = controller_report(root, command.strip())
  _write(root, "results.md", report["markdown"])
  _write(root, "results.json", json.dumps(
      {k: report[k] for k in ("stages", "fixed_beats_auto_everywhere")}, indent=2,
      default=str) + "\n")
  from sophia_lambda_jax.compare import plots, tables

  _, records = tables.load_results(root)
  plot_rho(records, root / "rho.png")
  plots.plot_clip_fraction([r for r in records if r.metrics], root / "clip_fraction.png",
                           "rho controller")
  print(report["markdown"])
  print(f"[rho-controller] wrote {root / 'results.md'}, results.json, rho.png, "
        "clip_fraction.png")
  return 0 if all(v == "done" for v in statuses.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
