"""Which rho puts each Sophia-family optimizer into its operating regime on the cpu setting.

    python -m experiments.calibrate_rho [--out DIR] [--seeds N] [--optimizers a,b]

Sophia clips m / (rho B h) to [-1, 1]; Liu et al. 2023 choose rho so that 10-50 % of the
coordinates are *not* clipped (below that the update is lr * sign(m) and the Hessian never
enters it). This sweeps rho (log-spaced by 5) with and without the Hessian EMA's bias
correction, every other setting as in the `cpu` protocol (default learning rates), and
writes `calibration.md` / `calibration.json` into DIR: for each optimizer and bias-correction
setting, the unclipped fraction over the second half of training (overall and per
parameter role) and the final validation loss of every rho, and the rho chosen: the rho
with the lowest validation loss among those at least MARGIN inside the 10-50 % band (so
that other seeds stay in it; the loss-best rho is reported beside it). The protocol setting
of each optimizer is then the better of its two choices (bias correction off / on).
Restartable like `slj compare` (finished runs are skipped).
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

# How far inside the band a calibrated rho must sit (one seed decides; others vary).
MARGIN = 0.05

RHOS = {
    "sophia": (0.04, 0.2, 1.0, 5.0),
    "sophia_lambda": (0.04, 0.2, 1.0, 5.0),
    "sophia_h": (0.01, 0.05, 0.25),
}


def calibration_specs(seeds: int = 1, optimizers: Sequence[str] = tuple(RHOS),
                      **overrides) -> list[RunSpec]:
  base = protocols.cpu_fields(**overrides)
  specs = []
  for opt in optimizers:
    for bias_correction in (False, True):
      for rho in RHOS[opt]:
        label = f"{opt}/rho{rho:g}" + ("-bc" if bias_correction else "")
        fields = dict(base, optimizer=opt, optimizer_kwargs={
            **base["optimizer_kwargs"], "rho": rho, "bias_correction": bias_correction})
        specs += [RunSpec(label, opt, s, fields, "rho-calibration", "calibration", opt)
                  for s in range(seeds)]
  return specs


def calibration_report(root: Path) -> dict:
  from sophia_lambda_jax.compare import tables
  from sophia_lambda_jax.train.metrics import UNCLIPPED_BAND, in_unclipped_band

  low, high = UNCLIPPED_BAND[0] + MARGIN, UNCLIPPED_BAND[1] - MARGIN

  _, records = tables.load_results(root)
  aggs = tables.aggregate(records)
  rows, chosen = [], {}
  for label in tables._order(aggs, aggs):
    a = aggs[label]
    kwargs = next(r.spec.fields["optimizer_kwargs"] for r in records if r.spec.label == label)
    u = a.get("unclipped_fraction")
    roles = a.get("unclipped_fraction_by_role") or {}
    rows.append({"label": label, "optimizer": a["optimizer"], "rho": kwargs["rho"],
                 "bias_correction": kwargs["bias_correction"],
                 "unclipped": None if u is None else u.mean,
                 "unclipped_by_role": {k: v.mean for k, v in roles.items()},
                 "val_loss": a["final_val_loss"].mean, "finished": a["finished"]})
  for opt in RHOS:
    for bc in (False, True):
      mine = [r for r in rows if r["optimizer"] == opt and r["bias_correction"] == bc
              and r["val_loss"] is not None]
      if not mine:
        continue
      in_band = [r for r in mine if r["unclipped"] is not None and
                 low <= r["unclipped"] <= high]
      best = min(mine, key=lambda r: r["val_loss"])
      pick = min(in_band, key=lambda r: r["val_loss"]) if in_band else None
      chosen[f"{opt}{'-bc' if bc else ''}"] = {
          "in_band_rho": pick and pick["rho"], "in_band_val_loss": pick and pick["val_loss"],
          "best_rho": best["rho"], "best_val_loss": best["val_loss"],
          "best_unclipped": best["unclipped"]}
  protocol = {}
  for opt in RHOS:
    options = [(c["in_band_val_loss"], key.endswith("-bc"), c["in_band_rho"])
               for key, c in chosen.items()
               if key.removesuffix("-bc") == opt and c["in_band_rho"] is not None]
    if options:
      _, bias_correction, rho = min(options)
      protocol[opt] = {"rho": rho, "bias_correction": bias_correction}
  role_names = sorted({k for r in rows for k in r["unclipped_by_role"]})
  header = (["Optimizer", "bias correction", "rho", "unclipped (all)"] + role_names
            + ["val loss"])
  pct = lambda x: "n/a" if x is None else f"{100 * x:.1f} %"
  md = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
  for r in rows:
    band = "" if in_unclipped_band(r["unclipped"]) else " (out of band)"
    md.append("| " + " | ".join(
        [tables.display_name(r["optimizer"]), "on" if r["bias_correction"] else "off",
         f"{r['rho']:g}", pct(r["unclipped"]) + band]
        + [pct(r["unclipped_by_role"].get(k)) for k in role_names]
        + ["n/a" if r["val_loss"] is None else f"{r['val_loss']:.3f}"]) + " |")
  md += ["", f"Chosen: the lowest validation loss with {100 * low:.0f}-{100 * high:.0f} % "
         "unclipped (the band less a margin of "
         f"{100 * MARGIN:.0f} points); the loss-best rho beside it.", "",
         "| Optimizer | bias correction | in-band rho (val loss) | loss-best rho "
         "(val loss, unclipped) |", "|---|---|---|---|"]
  for key, c in chosen.items():
    opt, bc = key.removesuffix("-bc"), key.endswith("-bc")
    in_band = ("none in band" if c["in_band_rho"] is None else
               f"{c['in_band_rho']:g} ({c['in_band_val_loss']:.3f})")
    md.append(f"| {tables.display_name(opt)} | {'on' if bc else 'off'} | {in_band} | "
              f"{c['best_rho']:g} ({c['best_val_loss']:.3f}, {pct(c['best_unclipped'])}) |")
  md += ["", "Protocol settings (the better of bias correction off / on): " + "; ".join(
      f"{tables.display_name(o)} rho {p['rho']:g}, bias correction "
      f"{'on' if p['bias_correction'] else 'off'}" for o, p in protocol.items()) + "."]
  return {"rows": rows, "chosen": chosen, "protocol": protocol,
          "markdown": "\n".join(md) + "\n"}


def main(argv: Sequence[str] | None = None, *, trainer=None) -> int:
  from sophia_lambda_jax.compare import runner

  p = argparse.ArgumentParser(prog="python -m experiments.calibrate_rho",
                              description="rho sweep for the Sophia family (cpu setting).")
  p.add_argument("--out", default="runs/rho-calibration")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--optimizers", default=",".join(RHOS))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  optimizers = [o for o in args.optimizers.split(",") if o]
  if not optimizers or set(optimizers) - set(RHOS):
    p.error(f"--optimizers must be a non-empty subset of {list(RHOS)}, got {optimizers}")
  specs = calibration_specs(args.seeds, optimizers, **runner._parse_set(args.set))
  root = Path(args.out)
  root.mkdir(parents=True, exist_ok=True)
  runner.write_plan(root, specs, "rho-calibration")
  if trainer is None:
    runner.enable_compilation_cache(root / ".compile_cache")
  statuses = runner.execute(specs, root, trainer=trainer)
  report = calibration_report(root)
  (root / "calibration.json").write_text(json.dumps(
      {k: report[k] for k in ("rows", "chosen", "protocol")}, indent=2) + "\n")
  tmp = root / "calibration.md.tmp"
  tmp.write_text("# rho calibration (cpu setting)\n\n" + report["markdown"])
  os.replace(tmp, root / "calibration.md")
  from sophia_lambda_jax.compare import plots, tables

  plots.plot_clip_fraction(tables.load_results(root)[1], root / "clip_fraction.png",
                           "rho calibration")
  print(report["markdown"])
  return 0 if all(v == "done" for v in statuses.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
