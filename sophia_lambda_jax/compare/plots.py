"""Loss-curve plots of a compare run (matplotlib figures without pyplot, PNG).

    python -m sophia_lambda_jax.compare.plots RUN_DIR   # RUN_DIR/curves.png (+ ablations.png)

`curves.png`: four panels, training and validation loss against optimizer step and against
training wall-clock seconds (the sum of the logged step times: compilation, evaluations and
checkpoints left out, so that optimizers are compared on what their steps cost), one line
per configuration (the mean over its seeds; a band from the lowest to the highest seed where
there are several). Training loss is smoothed with an exponential moving average (0.9) so
that the optimizers can be told apart; the validation curves are the raw evaluations.

`ablations.png` (when the compare has ablation runs, see `experiments.ablations`): one
panel of validation loss per ablation family, and the Hessian refresh interval over
training for the adaptive- and fixed-interval runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import matplotlib
from matplotlib.figure import Figure  # no pyplot: no backend is chosen or changed
import numpy as np

from sophia_lambda_jax.compare import tables
from sophia_lambda_jax.compare.tables import RunRecord
from sophia_lambda_jax.train.metrics import UNCLIPPED_BAND

SMOOTHING = 0.9
WALL_LABEL = "training wall-clock (s, sum of step times)"


def ema(values: Sequence[float], decay: float = SMOOTHING) -> np.ndarray:
  """Bias-corrected exponential moving average (the first point is the first value)."""
  out, acc, weight = [], 0.0, 0.0
  for v in values:
    acc = decay * acc + (1 - decay) * v
    weight = decay * weight + (1 - decay)
    out.append(acc / weight)
  return np.asarray(out)


def _mean_curve(curves: list[list[tuple[int, float, float | None]]], smooth: bool):
  """Align seeds on their common steps: (steps, mean, low, high, mean seconds or None)."""
  curves = [c for c in curves if c]
  if not curves:
    return None
  common = sorted(set.intersection(*(set(s for s, _, _ in c) for c in curves)))
  if not common:
    return None
  ys, ts = [], []
  for c in curves:
    by_step = {s: (v, t) for s, v, t in c}
    y = np.asarray([by_step[s][0] for s in common])
    ys.append(ema(y) if smooth else y)
    ts.append([by_step[s][1] for s in common])
  ys = np.stack(ys)
  has_time = all(t is not None for row in ts for t in row)
  seconds = np.asarray(ts, dtype=float).mean(0) if has_time else None
  return np.asarray(common), ys.mean(0), ys.min(0), ys.max(0), seconds


def _label_groups(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
  groups: dict[str, list[RunRecord]] = {}
  for r in records:
    if r.metrics:
      groups.setdefault(r.spec.label, []).append(r)
  return groups


def _display(label: str, records: Sequence[RunRecord]) -> str:
  opt = records[0].spec.optimizer
  name = tables.display_name(opt)
  if label == opt:
    return name
  if label.startswith(opt + "/"):
    return f"{name} {label[len(opt) + 1:]}"
  return label


def _draw(ax, groups, curve_fn, x: str, smooth: bool, colours) -> bool:
  drew = False
  for label, rs in groups.items():
    c = _mean_curve([curve_fn(r.metrics) for r in rs], smooth)
    if c is None:
      continue
    steps, mean, lo, hi, seconds = c
    xs = steps if x == "step" else seconds
    if xs is None:
      continue
    ax.plot(xs, mean, label=_display(label, rs), color=colours[label], lw=1.4)
    if len(rs) > 1:
      ax.fill_between(xs, lo, hi, color=colours[label], alpha=0.15, lw=0)
    drew = True
  return drew


def _colours(labels: Sequence[str]) -> dict[str, tuple]:
  """One colour per label; an optimizer keeps its own colour in every plot when each label
  is one optimizer (its name, or name/lr...)."""
  cmap = matplotlib.colormaps.get_cmap("tab10" if len(labels) <= 10 else "tab20")
  opts = [label.split("/")[0] for label in labels]
  if len(set(opts)) == len(opts) and all(o in tables.OPTIMIZERS for o in opts):
    return {label: cmap(tables.optimizer_rank(o) % cmap.N) for label, o in zip(labels, opts)}
  return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def plot_curves(records: Sequence[RunRecord], path: Path, title: str = "") -> Path | None:
  """The four loss panels of `records` (one line per label) into `path` (PNG)."""
  groups = _label_groups(records)
  if not groups:
    return None
  colours = _colours(list(groups))
  fig = Figure(figsize=(13, 9), constrained_layout=True)
  axes = fig.subplots(2, 2)
  panels = [
      (axes[0, 0], tables.train_curve, "step", True, "training loss (EMA 0.9)", "step"),
      (axes[0, 1], tables.val_curve, "step", False, "validation loss", "step"),
      (axes[1, 0], tables.train_curve, "wall", True, "training loss (EMA 0.9)",
       WALL_LABEL),
      (axes[1, 1], tables.val_curve, "wall", False, "validation loss", WALL_LABEL),
  ]
  for ax, fn, x, smooth, ylabel, xlabel in panels:
    if not _draw(ax, groups, fn, x, smooth, colours):
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  _zoom(axes[0, 0])
  _zoom(axes[1, 0])
  handles, labels = axes[0, 1].get_legend_handles_labels()
  if handles:
    axes[0, 1].legend(handles, labels, fontsize=8)
  if title:
    fig.suptitle(title)
  path = Path(path)
  fig.savefig(path, dpi=110)
  return path


def _zoom(ax) -> None:
  """Start the y axis near the curves' end values: the first steps' loss (~ln vocab) would
  otherwise flatten every difference that matters."""
  ys = [line.get_ydata() for line in ax.get_lines()]
  ys = [np.asarray(y, dtype=float) for y in ys if len(y)]
  if not ys:
    return
  tail = np.concatenate([y[len(y) // 5:] for y in ys])
  lo, hi = float(np.min(tail)), float(np.max(tail))
  pad = 0.05 * max(hi - lo, 1e-3)
  ax.set_ylim(lo - pad, hi + pad)


# --------------------------------------------------------------------------- clipping

def clip_curve(metrics: Sequence[dict], key: str = "clip_fraction"
               ) -> list[tuple[int, float, None]]:
  """(step, clip fraction, None) of the training records that log `key`."""
  return [(int(r["step"]), float(r[key]), None) for r in metrics
          if isinstance(r.get(key), (int, float)) and "step" in r and "loss" in r]


def plot_clip_fraction(records: Sequence[RunRecord], path: Path, title: str = ""
                       ) -> Path | None:
  """Clip fraction against step for every configuration that logs one (the Sophia family),
  mean over seeds, with the 10-50 % unclipped band (clip fraction 0.5-0.9) shaded."""
  groups = {label: rs for label, rs in _label_groups(records).items()
            if any(clip_curve(r.metrics) for r in rs)}
  if not groups:
    return None
  fig = Figure(figsize=(7 + 2.5 * (len(groups) > 6), 4.5), constrained_layout=True)
  ax = fig.subplots()
  low, high = UNCLIPPED_BAND
  ax.axhspan(1 - high, 1 - low, color="0.85", label=f"{100 * low:.0f}-{100 * high:.0f} % unclipped")
  _draw(ax, groups, clip_curve, "step", True, _colours(list(groups)))
  ax.set_ylim(0, 1.01)
  ax.set_xlabel("step")
  ax.set_ylabel("clip fraction (EMA 0.9)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  if title:
    ax.set_title(title)
  path = Path(path)
  fig.savefig(path, dpi=110)
  return path


# --------------------------------------------------------------------------- ablations

def interval_curve(metrics: Sequence[dict]) -> list[tuple[int, float]]:
  """(step, Hessian refresh interval) of the training records that carry one."""
  for key in ("hessian_interval", "interval"):
    pts = [(int(r["step"]), float(r[key])) for r in metrics
           if isinstance(r.get(key), (int, float)) and "step" in r]
    if pts:
      return pts
  return []


def plot_ablations(records: Sequence[RunRecord], path: Path) -> Path | None:
  """One validation-loss panel per ablation family (spec.group), plus the refresh interval
  over training of the interval family (adaptive vs fixed), or of every run that logs one."""
  abl = [r for r in records if r.spec.phase == "ablation" and r.metrics]
  if not abl:
    return None
  families: dict[str, list[RunRecord]] = {}
  for r in abl:
    for family in r.spec.group.split(","):
      families.setdefault(family, []).append(r)
  names = list(families)  # first appearance: the baseline lists the families in order
  ncols = 3
  nrows = (len(names) + 1 + ncols - 1) // ncols
  fig = Figure(figsize=(5 * ncols, 4 * nrows), constrained_layout=True)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  flat = list(axes.flat)
  for ax, family in zip(flat, names):
    groups = _label_groups(families[family])
    _draw(ax, groups, tables.val_curve, "step", False, _colours(list(groups)))
    ax.set_title(family)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  ax = flat[len(names)]
  # The adaptive-vs-fixed family when there is one (the other variants' intervals would
  # only draw over the baseline's), else every run that logs an interval.
  groups = _label_groups(families.get("interval", abl))
  colours = _colours(list(groups))
  drew = False
  for label, rs in groups.items():
    pts = interval_curve(rs[0].metrics)
    if pts:
      s, v = zip(*pts)
      ax.step(s, v, where="post", label=label, color=colours[label], lw=1.2)
      drew = True
  ax.set_title("Hessian refresh interval (seed 0)")
  ax.set_xlabel("step")
  ax.set_ylabel("interval (steps)")
  ax.grid(alpha=0.3)
  if drew:
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, "no interval logged", ha="center", va="center", transform=ax.transAxes)
  for extra in flat[len(names) + 1:]:
    extra.axis("off")
  path = Path(path)
  fig.savefig(path, dpi=110)
  return path


def write_plots(root: Path) -> list[Path]:
  """Write curves.png, clip_fraction.png (when a run logs clipping) and ablations.png (when
  there are ablation runs) into `root`."""
  root = Path(root)
  plan, records = tables.load_results(root)
  protocol = plan.get("protocol", "")
  written = []
  main = [r for r in records if r.spec.phase in ("main", "final")]
  if main:
    p = plot_curves(main, root / "curves.png", f"protocol {protocol}")
    written += [p] if p else []
  p = plot_clip_fraction(main or records, root / "clip_fraction.png",
                         f"protocol {protocol}: Sophia family clipping")
  written += [p] if p else []
  sweep = [r for r in records if r.spec.phase == "sweep"]
  if sweep:
    p = plot_curves(sweep, root / "sweep_curves.png", f"protocol {protocol}: lr sweep")
    written += [p] if p else []
  p = plot_ablations(records, root / "ablations.png")
  written += [p] if p else []
  return written


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m sophia_lambda_jax.compare.plots",
                              description="Write the loss-curve PNGs of a compare run.")
  p.add_argument("root", help="the --out directory of `slj compare` or of the ablations")
  args = p.parse_args(argv)
  for path in write_plots(Path(args.root)):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
