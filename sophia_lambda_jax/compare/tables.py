"""Tables of a compare run: the papers' Table 1s with our measurements beside the claims.

    python -m sophia_lambda_jax.compare.tables RUN_DIR      # (re)writes RUN_DIR/results.{json,md}

Input: a compare root (see `sophia_lambda_jax.compare.runner`) holding `plan.json` and one
directory per run with the training script's `summary.json`, `config.json` and
`metrics.jsonl`.

Every table row has three parts: the paper's claim, our measurement as mean +- sample std
over seeds (n given; "n=1" means one seed, no spread), and the protocol that produced it.
Beside the papers' columns we report what they lack:

  tokens/s            summary `tokens_per_s` (training throughput of the run)
  time to target      training seconds (the sum of the logged step times, so evaluations,
                      checkpoints and start-up are left out) until the first evaluation at or
                      below the target loss (default: AdamW's mean final validation loss in
                      the same compare)
  steps to target     the step of that evaluation (resolution: the protocol's eval_every)
  opt-state MB        summary `opt_state_bytes` (bytes of the optimizer state)
  Hessian overhead    mean train-step time / mean non-refresh step time - 1 (summary
                      `hessian_overhead.mean_over_other`): what the Sophia family's Hessian
                      refreshes add to the average step, like the papers' "15% overhead"
  peak memory         summary `device_peak_bytes_in_use` (the GPU allocator's peak) where
                      the run had one, else `peak_memory_bytes` (XLA's compiled memory
                      analysis of the train step)
  unclipped           Sophia family: 1 - clip fraction, the share of coordinates the Hessian
                      acts on, averaged over the second half of training (per parameter role
                      in results.json). Sophia is meant to run with 10-50 % unclipped; a run
                      outside that band is a sign-momentum method, not a test of the
                      second-order update, and the tables mark it "out of band".

Memory is in GB = 1e9 bytes. The papers' GB figures belong to a 134M model at batch 512 x
2048 on an A100: only their ratios to AdamW are comparable with a run of another protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from sophia_lambda_jax.compare import paper_claims
from sophia_lambda_jax.compare.protocols import RunSpec
from sophia_lambda_jax.runs import read_summary, run_status
from sophia_lambda_jax.train.metrics import (UNCLIPPED_BAND, in_unclipped_band, read_metrics,
                                             unclipped_fractions)
from sophia_lambda_jax.optimizers import OPTIMIZERS

PLAN = "plan.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"



def display_name(optimizer: str) -> str:
  """The optimizer's name as the papers write it (its registry display name)."""
  return OPTIMIZERS[optimizer].display_name if optimizer in OPTIMIZERS else optimizer


def optimizer_rank(optimizer: str) -> int:
  """Table order: registration order, unknown names last."""
  names = list(OPTIMIZERS)
  return names.index(optimizer) if optimizer in names else len(names)


class RunRecord(NamedTuple):
  """One run of a compare: its spec, status, summary.json and metrics.jsonl records."""
  spec: RunSpec
  status: str            # done | failed | partial | pending
  summary: dict | None
  metrics: list[dict]


class Stat(NamedTuple):
  """mean +- sample standard deviation of n finite values (std None when n < 2)."""
  mean: float | None
  std: float | None
  n: int

  def fmt(self, digits: int = 3, scale: float = 1.0) -> str:
    if self.mean is None:
      return "n/a"
    if self.std is None:
      return f"{self.mean * scale:.{digits}f} (n=1)"
    return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f} (n={self.n})"


def stat(values: Iterable[Any]) -> Stat:
  xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
  if not xs:
    return Stat(None, None, 0)
  mean = sum(xs) / len(xs)
  if len(xs) < 2:
    return Stat(mean, None, 1)
  var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
  return Stat(mean, math.sqrt(var), len(xs))


# ------------------------------------------------------------------------------ loading

def _read_json(path: Path) -> dict | None:
  if not path.is_file():
    return None
  with open(path) as f:
    return json.load(f)


def _specs_without_plan(root: Path) -> list[RunSpec]:
  """Rebuild specs from run directories (<label>/seed<k>/config.json) when no plan exists."""
  specs = []
  for config_path in sorted(root.rglob("config.json")):
    run_dir = config_path.parent
    config = _read_json(config_path) or {}
    rel = run_dir.relative_to(root)
    if not rel.name.startswith("seed") or len(rel.parts) < 2:
      continue
    fields = {k: v for k, v in config.items() if k not in ("seed", "out")}
    specs.append(RunSpec(str(rel.parent), config.get("optimizer", "?"),
                         int(config.get("seed", rel.name[4:] or 0)), fields, "unknown",
                         "main", config.get("optimizer", "?")))
  return specs


def load_plan(root: Path) -> tuple[dict, list[RunSpec]]:
  root = Path(root)
  plan = _read_json(root / PLAN)
  if plan is None:
    specs = _specs_without_plan(root)
    if not specs:
      raise FileNotFoundError(
          f"{root} holds no {PLAN} and no run directories <label>/seed<k>/config.json: "
          "is it the --out of `slj compare`?")
    return {"protocol": "unknown"}, specs
  return plan, [RunSpec.from_json(r) for r in plan["runs"]]


def load_results(root: Path) -> tuple[dict, list[RunRecord]]:
  """(plan, records) of the compare in `root`, in plan order."""
  root = Path(root)
  plan, specs = load_plan(root)
  records = []
  for spec in specs:
    run_dir = root / spec.run_name
    records.append(RunRecord(spec, run_status(run_dir), read_summary(run_dir),
                             read_metrics(run_dir / "metrics.jsonl")))
  return plan, records


# ------------------------------------------------------------------------------ curves

def _is_train(r: dict) -> bool:
  return ("loss" in r and "step" in r and "val_loss" not in r
          and isinstance(r["loss"], (int, float)))


def elapsed_by_step(metrics: Sequence[dict]) -> dict[int, float]:
  """Seconds of training up to each step: the cumulative sum of the train records'
  `step_time_s` (training time, without evaluations and checkpoints; a restarted run adds
  up the time of both processes)."""
  out, total = {}, 0.0
  for r in sorted((r for r in metrics if _is_train(r)), key=lambda r: r["step"]):
    dt = r.get("step_time_s")
    if not isinstance(dt, (int, float)):
      return {}
    total += float(dt)
    out[int(r["step"])] = total
  return out


def train_curve(metrics: Sequence[dict]) -> list[tuple[int, float, float | None]]:
  """(step, train loss, elapsed seconds) of every training record."""
  times = elapsed_by_step(metrics)
  return [(int(r["step"]), float(r["loss"]), times.get(int(r["step"])))
          for r in metrics if _is_train(r)]


def val_curve(metrics: Sequence[dict]) -> list[tuple[int, float, float | None]]:
  """(step, validation loss, elapsed seconds) of every evaluation record (the time of an
  evaluation is the training time up to its step; step 0 is time 0)."""
  times = elapsed_by_step(metrics)
  out = []
  for r in metrics:
    if "val_loss" in r and "step" in r and isinstance(r["val_loss"], (int, float)):
      step = int(r["step"])
      seconds = 0.0 if (step == 0 and times) else times.get(step)
      out.append((step, float(r["val_loss"]), seconds))
  return out


def time_to_target(metrics: Sequence[dict], target: float) -> float | None:
  """Seconds until the first evaluation with val_loss <= target (None: never reached, or
  the records carry no time)."""
  for _, loss, seconds in val_curve(metrics):
    if loss <= target:
      return seconds
  return None


def steps_to_target(metrics: Sequence[dict], target: float) -> int | None:
  """The step of the first evaluation with val_loss <= target (None: never reached)."""
  for step, loss, _ in val_curve(metrics):
    if loss <= target:
      return step
  return None


def hessian_overhead(summary: dict) -> float | None:
  """Extra train-step time that Hessian refreshes cost, as a fraction of a plain step,
  averaged over all steps (the papers' "adds 15% compute"). The training script reports
  {"mean_over_other": mean step time / mean non-refresh step time, ...}; a plain number is
  taken as the fraction itself."""
  value = summary.get("hessian_overhead")
  if isinstance(value, dict):
    ratio = value.get("mean_over_other")
    return ratio - 1.0 if isinstance(ratio, (int, float)) else None
  return float(value) if isinstance(value, (int, float)) else None


def peak_memory(summary: dict) -> float | None:
  """Peak device bytes: the GPU allocator's peak when the run had one, else XLA's compiled
  memory analysis of the train step."""
  for key in ("device_peak_bytes_in_use", "peak_memory_bytes"):
    value = summary.get(key)
    if isinstance(value, (int, float)):
      return float(value)
  return None


def _final_val(record: RunRecord) -> float | None:
  if record.summary is not None and isinstance(record.summary.get("final_val_loss"),
                                               (int, float)):
    return float(record.summary["final_val_loss"])
  curve = val_curve(record.metrics)
  return curve[-1][1] if (curve and record.status == "done") else None


# ------------------------------------------------------------------------------ aggregate

def _main_records(plan: dict, records: Sequence[RunRecord]) -> list[RunRecord]:
  """The records that the comparison tables aggregate: for tuned, the final phase."""
  finals = [r for r in records if r.spec.phase == "final"]
  return finals if finals else [r for r in records if r.spec.phase != "sweep"] or list(records)


def aggregate(records: Sequence[RunRecord], target: float | None = None) -> dict[str, dict]:
  """Per label (configuration): statistics over its seeds."""
  labels: dict[str, list[RunRecord]] = {}
  for r in records:
    labels.setdefault(r.spec.label, []).append(r)
  out = {}
  for label, rs in labels.items():
    done = [r for r in rs if r.status == "done" and r.summary is not None]
    summ = [r.summary for r in done]
    agg = {
        "label": label,
        "optimizer": rs[0].spec.optimizer,
        "group": rs[0].spec.group or rs[0].spec.optimizer,
        "learning_rate": rs[0].spec.fields.get("learning_rate"),
        "seeds": [r.spec.seed for r in rs],
        "finished": len(done),
        "runs": len(rs),
        "failed": [r.spec.run_name for r in rs if r.status == "failed"],
        "final_val_loss": stat(_final_val(r) for r in done),
        "final_val_loss_by_seed": {r.spec.seed: _final_val(r) for r in done},
        "final_train_loss": stat(s.get("final_train_loss") for s in summ),
        "tokens_per_s": stat(s.get("tokens_per_s") for s in summ),
        "wall_s": stat(s.get("wall_s") for s in summ),
        "opt_state_bytes": stat(s.get("opt_state_bytes") for s in summ),
        "peak_memory_bytes": stat(peak_memory(s) for s in summ),
        "hessian_overhead": stat(hessian_overhead(s) for s in summ),
        "tokens": stat(s.get("tokens") for s in summ),
    }
    unclipped = [unclipped_fractions(r.metrics, r.summary.get("steps") or _last_step(r.metrics))
                 for r in done]
    if any(unclipped):
      roles = sorted({k for u in unclipped for k in u} - {"all"})
      agg["unclipped_fraction"] = stat(u.get("all") for u in unclipped)
      agg["unclipped_fraction_by_role"] = {role: stat(u.get(role) for u in unclipped)
                                           for role in roles}
    if target is not None:
      times = [time_to_target(r.metrics, target) for r in done]
      agg["time_to_target_s"] = stat(times)
      agg["steps_to_target"] = stat(steps_to_target(r.metrics, target) for r in done)
      agg["reached_target"] = sum(t is not None for t in times)
    out[label] = agg
  return out


def _last_step(metrics: Sequence[dict]) -> int:
  return max((int(r["step"]) for r in metrics if _is_train(r)), default=0)


def unclipped_cell(agg: dict) -> str:
  """'23.4 ± 1.2 %' for a Sophia-family configuration ('out of band' outside 10-50 %),
  '-' for first-order optimizers."""
  u = agg.get("unclipped_fraction")
  if u is None or u.mean is None:
    return "-"
  std = f" ± {100 * u.std:.1f}" if u.std is not None else ""
  band = "" if in_unclipped_band(u.mean) else " (out of band)"
  return f"{100 * u.mean:.1f}{std} %{band}"


def _order(labels: Iterable[str], aggs: dict[str, dict]) -> list[str]:
  def key(label):
    opt = aggs[label]["optimizer"]
    return (optimizer_rank(opt), label)
  return sorted(labels, key=key)


def _label_of(aggs: dict[str, dict], optimizer: str) -> str | None:
  """The label that stands for `optimizer` in the comparison (one per optimizer): the first
  in table order, except that a configuration inside the unclipped band is preferred to one
  outside it (a row outside the band is no evidence about the method)."""
  labels = [label for label in _order(aggs, aggs) if aggs[label]["optimizer"] == optimizer]
  in_band = [label for label in labels if in_unclipped_band(
      getattr(aggs[label].get("unclipped_fraction"), "mean", None))]
  return (in_band or labels or [None])[0]


def default_target(aggs: dict[str, dict]) -> float | None:
  """AdamW's mean final validation loss: the target the time-to-target column uses."""
  label = _label_of(aggs, "adamw")
  return None if label is None else aggs[label]["final_val_loss"].mean


def difference(aggs: dict[str, dict], label: str, base: str) -> dict | None:
  """`label`'s final validation loss minus `base`'s (negative = lower than `base`), its
  standard error and a verdict: 'better'/'worse' beyond 2 standard errors, else 'within
  noise' ('single seed' when there is no spread to measure). None when either has no loss.

  Runs of one seed share the initialisation and the data order, so where both have at
  least two seeds in common the difference is paired: the mean over common seeds of the
  per-seed differences, with SE = their sample std / sqrt(n) ("paired": True, the per-seed
  differences in "by_seed"). Otherwise the difference of means with SE = sqrt(s_a^2 / n_a +
  s_b^2 / n_b) (docs/design.md section 8)."""
  a, b = aggs[label]["final_val_loss"], aggs[base]["final_val_loss"]
  if a.mean is None or b.mean is None:
    return None
  ours = aggs[label].get("final_val_loss_by_seed") or {}
  theirs = aggs[base].get("final_val_loss_by_seed") or {}
  common = sorted(seed for seed in ours if seed in theirs
                  and ours[seed] is not None and theirs[seed] is not None)
  if len(common) >= 2:
    by_seed = {seed: ours[seed] - theirs[seed] for seed in common}
    d = stat(by_seed.values())
    out = {"diff": d.mean, "se": d.std / math.sqrt(d.n), "paired": True, "n": d.n,
           "by_seed": by_seed}
  elif a.std is None or b.std is None:
    return {"diff": a.mean - b.mean, "se": None, "verdict": "single seed", "paired": False}
  else:
    out = {"diff": a.mean - b.mean, "se": math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n),
           "paired": False}
  out["verdict"] = "within noise"
  if abs(out["diff"]) > 2 * out["se"]:
    out["verdict"] = "better" if out["diff"] < 0 else "worse"
  return out


def versus_adamw(aggs: dict[str, dict], label: str) -> dict | None:
  """`difference` of `label` to the configuration that stands for AdamW (None for AdamW
  itself, or when there is none)."""
  base = _label_of(aggs, "adamw")
  if base is None or base == label:
    return None
  return difference(aggs, label, base)


def difference_cell(diff: dict, digits: int = 3) -> str:
  """A `difference` as a table cell: '+0.065 ± 0.039 (within noise)', '+0.065 (single
  seed)'."""
  if diff["se"] is None:
    return f"{diff['diff']:+.{digits}f} (single seed)"
  return f"{diff['diff']:+.{digits}f} ± {diff['se']:.{digits}f} ({diff['verdict']})"


def _two_se_coverage(dof: int) -> float:
  """P(|T| < 2) for Student's t with `dof` degrees of freedom: what '2 standard errors' of
  a mean over dof + 1 paired seeds covers (Simpson's rule on the density)."""
  log_norm = (math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)
              - 0.5 * math.log(dof * math.pi))

  def density(x):
    return math.exp(log_norm - (dof + 1) / 2 * math.log1p(x * x / dof))

  n, h = 200, 2.0 / 200
  total = density(0.0) + density(2.0) + sum((4 if i % 2 else 2) * density(i * h)
                                             for i in range(1, n))
  return 2 * total * h / 3


def difference_caption(diffs: Sequence[dict], column: str, base: str,
                       json_file: str = RESULTS_JSON) -> str:
  """What a column of `difference`s says: `column` is its header, `base` what it is measured
  against ('AdamW', 'the default'), `json_file` the file that holds the per-seed values."""
  paired = [d for d in diffs if d.get("paired")]
  ns = sorted({d["n"] for d in paired})
  text = (f"'{column}' is this configuration's loss minus {base}'s (negative = lower than "
          f"{base}). ")
  if paired:
    text += ("Runs of one seed share initialisation and data order, so it is the mean of the "
             "per-seed differences ± its standard error (sample std of the differences / "
             f"sqrt(n)); per-seed values are in {json_file}. ")
    if len(ns) == 1:
      dof = ns[0] - 1
      text += (f"A verdict ('better'/'worse') is given only beyond 2 standard errors: with "
               f"n = {ns[0]} seeds, ± 2 standard errors covers about "
               f"{100 * _two_se_coverage(dof):.0f} % (Student's t, {dof} degree"
               f"{'s' if dof > 1 else ''} of freedom), not 95 %.")
    else:
      text += ("A verdict ('better'/'worse') is given only beyond 2 standard errors (an "
               "interval of Student's t with n - 1 degrees of freedom).")
  else:
    text += ("Seeds could not be paired: difference of means ± sqrt(s_a²/n_a + s_b²/n_b); "
             "'better'/'worse' only beyond 2 standard errors.")
  return text


# ------------------------------------------------------------------------------ markdown

def _gb(x: float | None) -> str:
  return "n/a" if x is None else f"{x / 1e9:.3f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _ordering(pairs: Sequence[tuple[str, float | None]]) -> str:
  ranked = sorted((v, name) for name, v in pairs if v is not None)
  return " < ".join(name for _, name in ranked) if ranked else "n/a"


def paper_table(table: str, aggs: dict[str, dict], protocol: str) -> str:
  """One of the papers' Table 1s: claim | our mean +- std | protocol per row, then both
  orderings (lower validation loss first)."""
  claims = paper_claims.TABLES[table]
  with_memory = any(c.memory_gb is not None for c in claims)
  adamw_label = _label_of(aggs, "adamw")
  adamw_mem = (aggs[adamw_label]["peak_memory_bytes"].mean if adamw_label else None)
  paper_adamw_mem = next((c.memory_gb for c in claims if c.optimizer == "adamw"), None)
  with_unclipped = any(c.optimizer in OPTIMIZERS and OPTIMIZERS[c.optimizer].second_order
                       for c in claims)
  header = ["Method", "Val loss: paper", "Val loss: ours"]
  header += ["Unclipped: ours"] if with_unclipped else []
  if with_memory:
    header += ["Memory GB: paper (x AdamW)", "Peak memory GB: ours (x AdamW)"]
  header += ["Protocol"]
  rows, ours, theirs = [], [], []
  for claim in claims:
    label = _label_of(aggs, claim.optimizer)
    agg = aggs.get(label) if label else None
    val = agg["final_val_loss"] if agg else Stat(None, None, 0)
    row = [claim.method, f"{claim.val_loss:.3f}", val.fmt(3)]
    row += [unclipped_cell(agg) if agg else "-"] if with_unclipped else []
    if with_memory:
      paper_ratio = (f" ({claim.memory_gb / paper_adamw_mem:.2f}x)"
                     if claim.memory_gb and paper_adamw_mem else "")
      mem = agg["peak_memory_bytes"].mean if agg else None
      our_ratio = f" ({mem / adamw_mem:.2f}x)" if mem and adamw_mem else ""
      row += [f"{claim.memory_gb:.1f}{paper_ratio}" if claim.memory_gb else "n/a",
              _gb(mem) + our_ratio]
    row.append(protocol if agg else f"{protocol} (not run)")
    rows.append(row)
    ours.append((claim.method, val.mean))
    theirs.append((claim.method, claim.val_loss))
  text = [f"### {paper_claims.TABLE_TITLES[table]}", "", _md_table(header, rows), "",
          f"Paper ordering: {_ordering(theirs)}  ", f"Our ordering:   {_ordering(ours)}"]
  same = _ordering(theirs) == _ordering(ours)
  text.append("" if any(v is None for _, v in ours) else
              ("The paper's ordering reproduces." if same else
               "**The paper's ordering does not reproduce under this protocol.**"))
  return "\n".join(text).rstrip() + "\n"


def summary_table(aggs: dict[str, dict], target: float | None) -> str:
  """Every configuration: losses, the comparison with AdamW and the costs."""
  header = ["Optimizer", "lr", "Val loss", "vs AdamW", "Unclipped", "Train loss", "tokens/s",
            f"time to {target:.3f} (s)" if target is not None else "time to target",
            "steps to target", "Opt-state MB", "Hessian overhead", "Peak memory GB", "Runs"]
  rows = []
  for label in _order(aggs, aggs):
    a = aggs[label]
    vs = versus_adamw(aggs, label)
    if vs is None:
      vs_s = "baseline" if a["optimizer"] == "adamw" else "n/a"
    else:
      vs_s = difference_cell(vs)
    lr = a["learning_rate"]
    name = display_name(a["optimizer"])
    if label not in (a["optimizer"],) and not label.startswith(a["optimizer"] + "/"):
      name = f"{name} [{label}]"
    elif label.startswith(a["optimizer"] + "/") and sum(
        b["optimizer"] == a["optimizer"] for b in aggs.values()) > 1:
      name = f"{name} [{label[len(a['optimizer']) + 1:]}]"  # e.g. "Sophia-Lambda [rho0.2]"
    ttt = a.get("time_to_target_s", Stat(None, None, 0))
    ttt_s = ttt.fmt(1)
    if "reached_target" in a and a["finished"] and a["reached_target"] < a["finished"]:
      ttt_s = (f"not reached ({a['finished'] - a['reached_target']}/{a['finished']})"
               if a["reached_target"] == 0 else f"{ttt_s}, {a['reached_target']}/"
               f"{a['finished']} reached")
    oh = a["hessian_overhead"]
    rows.append([
        name, "default" if lr is None else f"{lr:.2e}", a["final_val_loss"].fmt(3), vs_s,
        unclipped_cell(a), a["final_train_loss"].fmt(3), a["tokens_per_s"].fmt(0),
        ttt_s, a.get("steps_to_target", Stat(None, None, 0)).fmt(0),
        a["opt_state_bytes"].fmt(2, 1e-6),
        "n/a" if oh.mean is None else f"{100 * oh.mean:.1f}%",
        _gb(a["peak_memory_bytes"].mean),
        f"{a['finished']}/{a['runs']}" + (f" ({len(a['failed'])} failed)" if a["failed"]
                                          else "")])
  return _md_table(header, rows) + "\n"


def _setting_text(kwargs: dict) -> str:
  """The swept hyperparameters besides the learning rate: 'rho 0.4', 'rho auto', 'b2 0.99'."""
  return ", ".join(f"{name} {kwargs[name]:g}" if isinstance(kwargs[name], (int, float)) else
                   f"{name} {kwargs[name]}" for name in ("rho", "b2") if name in kwargs)


def sweep_table(records: Sequence[RunRecord]) -> str | None:
  """Tuned protocol: final validation loss of every sweep setting (learning rate, and rho for
  the Sophia family, with its unclipped fraction)."""
  sweep = [r for r in records if r.spec.phase == "sweep"]
  if not sweep:
    return None
  rows = []
  for r in sorted(sweep, key=lambda r: (optimizer_rank(r.spec.optimizer),
                                         r.spec.fields["learning_rate"],
                                         _setting_text(r.spec.fields["optimizer_kwargs"]))):
    v = _final_val(r) if r.status == "done" else None
    cell = "diverged" if r.status == "failed" else ("n/a" if v is None else f"{v:.3f}")
    u = unclipped_fractions(r.metrics, (r.summary or {}).get("steps") or _last_step(r.metrics))
    unclipped = "-" if "all" not in u else unclipped_cell(
        {"unclipped_fraction": Stat(u["all"], None, 1)})
    rows.append([display_name(r.spec.optimizer), f"{r.spec.fields['learning_rate']:.2e}",
                 _setting_text(r.spec.fields["optimizer_kwargs"]) or "-", cell, unclipped])
  seeds = ", ".join(str(x) for x in sorted({r.spec.seed for r in sweep}))
  return f"### Sweep (seed {seeds}, final validation loss)\n\n" + _md_table(
      ["Optimizer", "lr", "other", "Val loss", "Unclipped"], rows) + "\n"


def chosen_settings_text(best: dict[str, dict]) -> str:
  """The tuned protocol's choice per optimizer, with the unconstrained best beside the
  Sophia family's in-band choice."""
  def setting(b):
    other = _setting_text(b["optimizer_kwargs"])
    return f"lr {b['learning_rate']:.2e}" + (f", {other}" if other else "")

  lines = ["Chosen settings (lowest validation loss of the selection seed; the Sophia family "
           "only among settings with 10-50 % unclipped):", ""]
  for opt, b in sorted(best.items(), key=lambda kv: optimizer_rank(kv[0])):
    line = f"- {display_name(opt)}: {setting(b)} (val {b['val_loss']:.3f})"
    if "unconstrained" in b:
      u = b["unconstrained"]
      if not b["in_band"]:
        line += " - **no setting reached the 10-50 % band**; this is the loss-best one"
      elif (u["learning_rate"], u["optimizer_kwargs"]) != (b["learning_rate"],
                                                           b["optimizer_kwargs"]):
        pct = "n/a" if u["unclipped"] is None else f"{100 * u['unclipped']:.1f} %"
        line += (f"; unconstrained best: {setting(u)} (val {u['val_loss']:.3f}, "
                 f"{pct} unclipped)")
      else:
        line += "; also the unconstrained best"
    lines.append(line)
  return "\n".join(lines) + "\n"


def _jsonable(x):
  if isinstance(x, Stat):
    return x._asdict()
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _final_eval_text(records: Sequence[RunRecord]) -> str:
  """How much of the validation split the final evaluations covered (plans written before
  `final_eval_batches` existed ended with an `eval_batches` evaluation)."""
  batches = {r.spec.fields.get("final_eval_batches", r.spec.fields.get("eval_batches"))
             for r in records}
  if len(batches) != 1:
    return "validation batches as each run's config.json says"
  (n,) = batches
  return "the whole validation split" if n is None else f"the first {n} validation batches"


def _versus_caption(aggs: dict[str, dict]) -> str:
  """What the 'vs AdamW' column's numbers are."""
  return difference_caption(
      [v for label in aggs if (v := versus_adamw(aggs, label)) is not None], "vs AdamW",
      "AdamW")


def _code_lines(code: dict | None) -> list[str]:
  """The sentence naming the commit the runs came from (`runner.code_version`), if known."""
  if not code or not code.get("commit"):
    return []
  dirty = " with uncommitted changes" if code.get("dirty") else ""
  return [f"Runs made by commit {code['commit'][:12]}{dirty}.", ""]


def build_report(root: Path, target: float | None = None) -> dict:
  """Everything `write_report` writes, as a dict (markdown strings included)."""
  plan, records = load_results(root)
  protocol = plan.get("protocol", "unknown")
  main = _main_records(plan, records)
  aggs = aggregate(main)
  target = default_target(aggs) if target is None else target
  if target is not None:
    aggs = aggregate(main, target)
  summary_md = summary_table(aggs, target)
  sections = [
      f"# Optimizer comparison: protocol `{protocol}`", "",
      f"Runs: {sum(r.status == 'done' for r in records)} finished of {len(records)}. "
      f"Validation loss is the final evaluation of each run ({_final_eval_text(main)}); "
      "'Val loss' is its mean ± sample std over seeds. " + _versus_caption(aggs)
      + (f" Time to target: training wall-clock (sum of step times) until the first "
         f"evaluation at or below {target:.3f} (AdamW's mean final validation loss)."
         if target is not None else ""), "",
      f"Unclipped: the Sophia family's share of coordinates not clipped (1 - clip "
      f"fraction), mean over the second half of training; Sophia is meant to run with "
      f"{100 * UNCLIPPED_BAND[0]:.0f}-{100 * UNCLIPPED_BAND[1]:.0f} % unclipped. A "
      "configuration marked 'out of band' ran outside the regime Sophia is tuned for (below "
      "the band it is sign momentum; above it the clip rarely acts and rho is too large for "
      "the setting): its row is reported, not read as a verdict on the method.", "",
      *_code_lines(plan.get("code")),
      "## All optimizers", "", summary_md]
  for table in paper_claims.TABLES:
    sections += [paper_table(table, aggs, protocol)]
  sw = sweep_table(records)
  if sw:
    sections += [sw]
  if plan.get("best_settings"):
    sections += [chosen_settings_text(plan["best_settings"])]
  claims = ("Other paper claims: Hessian estimation adds "
            f"{100 * paper_claims.SOPHIA_LAMBDA_HESSIAN_OVERHEAD:.0f}% compute (ours: the "
            "'Hessian overhead' column); Sophia-Lambda uses "
            f"{100 * paper_claims.SOPHIA_LAMBDA_MEMORY_REDUCTION_VS_SOPHIA:.0f}% less memory "
            "than Sophia (the paper's own Table 1 says "
            f"{100 * paper_claims.SOPHIA_LAMBDA_TABLE1_MEMORY_REDUCTION_VS_SOPHIA:.1f}%; ours: "
            "the opt-state and peak memory columns).")
  sections += [claims]
  return {
      "protocol": protocol,
      "target_loss": target,
      "aggregates": _jsonable(aggs),
      "runs": [{"run_name": r.spec.run_name, "label": r.spec.label,
                "optimizer": r.spec.optimizer, "seed": r.spec.seed, "phase": r.spec.phase,
                "status": r.status, "summary": r.summary} for r in records],
      "best_settings": plan.get("best_settings"),
      # which code made the runs, and the sweep points the runner added beyond an edge
      "code": plan.get("code"),
      "extensions": plan.get("extensions"),
      "markdown_summary": summary_md,
      "markdown": "\n".join(sections).rstrip() + "\n",
  }


def write_report(root: Path, target: float | None = None) -> dict:
  """Write `<root>/results.json` and `<root>/results.md`; return the report dict."""
  root = Path(root)
  report = build_report(root, target)
  for name, text in ((RESULTS_JSON, json.dumps(_jsonable(report), indent=2, sort_keys=True)),
                     (RESULTS_MD, report["markdown"])):
    tmp = root / (name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, root / name)
  return report


def thinned_metrics(records: Sequence[dict], every: int) -> list[dict]:
  """A run's metrics with its train records merged over windows of `every` steps (the
  evaluation records kept as they are): loss, gradient norm and clip fractions averaged,
  step times summed, the rest taken from the window's last record. What the tables read
  from metrics comes out the same as from the full records whenever the evaluations and
  the half-way step fall on window ends (elapsed time at each evaluation, second-half
  unclipped fractions); the curves keep one point per window."""
  out: list[dict] = []
  window: list[dict] = []

  def flush():
    if not window:
      return
    merged = dict(window[-1], merged_steps=len(window))
    for key in merged:
      values = [r[key] for r in window if isinstance(r.get(key), (int, float))
                and not isinstance(r.get(key), bool)]
      if key == "step_time_s":
        merged[key] = sum(values)
      elif key in ("loss", "grad_norm", "tokens_per_s") or key.startswith("clip_fraction"):
        merged[key] = sum(values) / len(values) if values else merged[key]
    for flag in ("refresh", "warmup"):
      if any(r.get(flag) for r in window):
        merged[flag] = True
    out.append(merged)
    window.clear()

  for r in records:
    if _is_train(r):
      window.append(r)
      if r["step"] % every == 0:
        flush()
    else:
      flush()
      out.append(r)
  flush()
  return out


def archive_runs(root: Path, dest: Path, every: int = 50) -> int:
  """Copy each finished run of the compare in `root` to `dest` with the same layout
  (config.json, summary.json and `thinned_metrics` as metrics.jsonl) plus plan.json: small
  enough to commit, read by the tables like the runs themselves, and restorable by copying
  it back into a compare root (finished runs are then skipped). Returns the runs copied."""
  root, dest = Path(root), Path(dest)
  plan, records = load_results(root)
  copied = 0
  for record in records:
    if record.status != "done":
      continue
    target = dest / record.spec.run_name
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "summary.json"):
      (target / name).write_text((root / record.spec.run_name / name).read_text())
    (target / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in thinned_metrics(record.metrics, every)))
    copied += 1
  (dest / PLAN).write_text((root / PLAN).read_text())
  return copied


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m sophia_lambda_jax.compare.tables",
                              description="Write results.{json,md} of a compare run.")
  p.add_argument("root", help="the --out directory of `slj compare`")
  p.add_argument("--target", type=float, default=None,
                 help="target validation loss for the time-to-target column "
                      "(default: AdamW's mean final validation loss)")
  p.add_argument("--archive", default=None, metavar="DIR",
                 help="also copy the finished runs to DIR with their metrics merged over "
                      "windows of --archive-every steps (small enough to commit; copy DIR "
                      "back into a compare root to continue it)")
  p.add_argument("--archive-every", type=int, default=50, metavar="STEPS")
  args = p.parse_args(argv)
  if args.archive_every < 1:
    p.error(f"--archive-every must be >= 1, got {args.archive_every}")
  report = write_report(Path(args.root), args.target)
  print(report["markdown"])
  if args.archive:
    copied = archive_runs(Path(args.root), Path(args.archive), args.archive_every)
    print(f"archived {copied} finished run(s) to {args.archive}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
