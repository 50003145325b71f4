"""Ablations of Sophia-Lambda's own design claims, on the cpu setting, in its regime.

    python -m experiments.ablations [--seeds N] [--out DIR] [--steps S]

Each family changes one thing against the default Sophia-Lambda of the cpu protocol (block
size 64, layer scale on, fixed refresh interval 10, Gauss-Newton-Bartlett estimator, and the
rho / bias correction calibrated for the cpu setting, `protocols.CPU_REGIME_KWARGS`), which
is the shared `baseline` run of every family:

  block_size       block_size in {1, 8, 64, 256} (1 is exactly Sophia's full diagonal); the
                   table also gives the optimizer-state bytes, which is what blocks buy.
  layer_scale      lambda_l = c * sqrt(d_l / n_l) on (baseline) or off (layer_scale=None).
  interval         fixed (baseline) and the adaptive rule (the project's reconstruction,
                   docs/design.md section 4.3), with the baseline's bias correction and
                   with the other setting (without it, the 1/k artefact of an EMA that
                   starts at 0 drives the interval down); the plot shows the interval over
                   training (the `hessian_interval` metric).
  bias_correction  the Hessian EMA read as h / (1 - b2^k) or not, the other setting at the
                   rho calibrated for it (bias correction changes h's scale, so at the same
                   rho one of the two would leave the band).
  estimator        GNB (baseline) against Hutchinson on Sophia-Lambda itself (the
                   `hessian_estimator` training field; B becomes 1 as in Sophia-H).

Every variant uses the same token budget, learning rate (Sophia-Lambda's default) and
seeds. The table gives each variant's loss minus the default's, paired by seed, ± its
standard error, with a verdict only beyond 2 standard errors (`tables.difference`, as the
comparison tables), and its unclipped fraction: a variant outside the 10-50 % band is
marked, since it then tests sign momentum rather than the second-order update.
Results: `<out>/ablations.md`, `<out>/ablations.json`, `<out>/ablations.png`, and the run
directories, restartable like `slj compare` (finished runs are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from sophia_lambda_jax.compare import protocols
from sophia_lambda_jax.compare.protocols import RunSpec

BLOCK_SIZES = (1, 8, 64, 256)
DEFAULT_BLOCK_SIZE = 64
FAMILIES = ("block_size", "layer_scale", "interval", "bias_correction", "estimator")


def ablation_specs(seeds: int = 2, **overrides) -> list[RunSpec]:
  """The runs of every family (the baseline once, shared by all families)."""
  protocols._check_seeds(seeds)
  base = protocols.cpu_fields(**overrides)
  regime = {**protocols.CPU_REGIME_KWARGS["sophia_lambda"], **base["optimizer_kwargs"]}

  def spec(label, group, extra_fields=None, **kwargs):
    fields = dict(base, optimizer="sophia_lambda", optimizer_kwargs={**regime, **kwargs},
                  **(extra_fields or {}))
    return [RunSpec(label, "sophia_lambda", s, fields, "ablation", "ablation", group)
            for s in range(seeds)]

  specs = spec("baseline", ",".join(FAMILIES), block_size=DEFAULT_BLOCK_SIZE)
  for b in BLOCK_SIZES:
    if b != DEFAULT_BLOCK_SIZE:
      specs += spec(f"block_size_{b}", "block_size", block_size=b)
  specs += spec("layer_scale_off", "layer_scale", layer_scale=None)
  # Bias correction changes the scale of h, so its other setting runs at the rho calibrated
  # for that setting: both variants stay in the regime and the family compares them there.
  other = not regime["bias_correction"]
  other_kwargs = {"bias_correction": other,
                  "rho": protocols.CPU_CALIBRATED_RHO["sophia_lambda"][other]}
  tag = "on" if other else "off"
  specs += spec("adaptive_interval", "interval", adaptive_interval=True)
  specs += spec(f"adaptive_interval_bc_{tag}", "interval", adaptive_interval=True,
                **other_kwargs)
  specs += spec(f"bias_correction_{tag}", "bias_correction", **other_kwargs)
  specs += spec("hutchinson", "estimator", extra_fields={"hessian_estimator": "hutchinson"})
  return specs


def _describe(label: str) -> str:
  return {
      "baseline": "default (block 64, layer scale, fixed interval 10, GNB, calibrated rho)",
      "layer_scale_off": "layer scale off",
      "adaptive_interval": "adaptive interval (r_low 0.002, r_high 0.02)",
      "adaptive_interval_bc_on": "adaptive interval, bias correction on (its own rho)",
      "adaptive_interval_bc_off": "adaptive interval, bias correction off (its own rho)",
      "bias_correction_on": "bias correction on (its own calibrated rho)",
      "bias_correction_off": "bias correction off (its own calibrated rho)",
      "hutchinson": "Hutchinson estimator (B = 1)",
  }.get(label, label.replace("block_size_", "block size "))


def ablation_report(root: Path) -> dict:
  """Per family: val loss mean +- std, the difference to the default with its standard error
  (`tables.difference`: paired by seed), opt-state bytes, overhead, and the number of
  Hessian refreshes (from the last metrics record that has it)."""
  from sophia_lambda_jax.compare import tables

  plan, records = tables.load_results(root)
  aggs = tables.aggregate(records)
  refreshes = {}
  for r in records:
    counts = [m["hessian_refreshes"] for m in r.metrics
              if isinstance(m.get("hessian_refreshes"), (int, float))]
    if counts:
      refreshes.setdefault(r.spec.label, []).append(counts[-1])
  diffs = {label: tables.difference(aggs, label, "baseline") for label in aggs
           if label != "baseline" and "baseline" in aggs}
  lines = ["# Sophia-Lambda ablations (cpu setting)", "",
           "Validation loss: final evaluation, mean ± sample std over seeds. "
           + tables.difference_caption([d for d in diffs.values() if d is not None],
                                       "vs default", "the default", "ablations.json")]
  out = {}
  for family in FAMILIES:
    labels = [l for l, a in aggs.items() if family in a["group"].split(",")]
    if not labels:
      continue
    rows = []
    for label in labels:
      a = aggs[label]
      diff = diffs.get(label)
      n_ref = tables.stat(refreshes.get(label, []))
      oh = a["hessian_overhead"]
      rows.append([_describe(label), a["final_val_loss"].fmt(4),
                   "—" if diff is None else tables.difference_cell(diff, 4),
                   tables.unclipped_cell(a), a["opt_state_bytes"].fmt(3, 1e-6),
                   "n/a" if n_ref.mean is None else f"{n_ref.mean:.1f}",
                   "n/a" if oh.mean is None else f"{100 * oh.mean:.1f}%",
                   a["tokens_per_s"].fmt(0), f"{a['finished']}/{a['runs']}"])
    lines += ["", f"## {family}", "", tables._md_table(
        ["Variant", "Val loss", "vs default", "Unclipped", "Opt-state MB", "Hessian refreshes",
         "Hessian overhead", "tokens/s", "Runs"], rows)]
    out[family] = {l: tables._jsonable({**aggs[l], "vs_default": diffs.get(l)})
                   for l in labels}
  markdown = "\n".join(lines) + "\n"
  return {"families": out, "markdown": markdown}


def main(argv: Sequence[str] | None = None, *, trainer=None) -> int:
  from sophia_lambda_jax.compare import runner

  p = argparse.ArgumentParser(prog="python -m experiments.ablations",
                              description="Sophia-Lambda ablations on the cpu setting.")
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument("--out", default="runs/ablations-cpu")
  p.add_argument("--steps", type=int, default=None, help="override the cpu protocol's steps")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a TrainConfig field for every run (repeatable)")
  p.add_argument("--families", default=",".join(FAMILIES),
                 help=f"comma-separated subset of {','.join(FAMILIES)}")
  p.add_argument("--retry-failed", action="store_true")
  p.add_argument("--list", action="store_true", help="print the runs and exit")
  args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  overrides = runner._parse_set(args.set)
  if args.steps is not None:
    overrides["steps"] = args.steps
  try:
    specs = ablation_specs(args.seeds, **overrides)
  except ValueError as e:
    p.error(str(e))
  families = {f.strip() for f in args.families.split(",") if f.strip()}
  if not families <= set(FAMILIES):
    p.error(f"--families must be a subset of {list(FAMILIES)}, got {sorted(families)}")
  specs = [s for s in specs if families & set(s.group.split(","))]
  root = Path(args.out)
  if args.list:
    for s in specs:
      print(f"{s.run_name} [{s.group}]: {json.dumps(s.fields, sort_keys=True)}")
    return 0
  runner.write_plan(root, specs, "ablation")
  statuses = runner.execute(specs, root, trainer=trainer, retry_failed=args.retry_failed)
  if not runner._is_main_process():
    return 0
  report = ablation_report(root)
  for name, text in (("ablations.md", report["markdown"]),
                     ("ablations.json", json.dumps(report["families"], indent=2,
                                                   sort_keys=True))):
    tmp = root / (name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, root / name)
  from sophia_lambda_jax.compare import plots, tables

  _, records = tables.load_results(root)
  png = plots.plot_ablations(records, root / "ablations.png")
  print(report["markdown"])
  print(f"[ablations] wrote {root / 'ablations.md'}" + (f" and {png}" if png else ""))
  return 0 if all(v == "done" for v in statuses.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
