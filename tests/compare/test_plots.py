"""Plots from synthetic run directories: PNG files with the expected panels."""

import json

import numpy as np
import pytest

from sophia_lambda_jax.compare import plots, runner, tables
from experiments import ablations

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC
  width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
  return width, height


def test_ema_is_bias_corrected():
  out = plots.ema([2.0, 4.0], decay=0.5)
  assert out[0] == 2.0
  assert out[1] == pytest.approx((0.25 * 2 + 0.5 * 4) / 0.75)


def test_curves_png_for_every_optimizer(fake_compare):
  root, _ = fake_compare
  written = plots.write_plots(root)
  assert written == [root / "curves.png", root / "clip_fraction.png"]
  width, height = _png_size(root / "curves.png")
  assert width > 1000 and height > 700


def _capture_saved_figures(monkeypatch) -> list:
  """Figures passed to Figure.savefig from now on (still saved)."""
  saved, real_savefig = [], plots.Figure.savefig

  def spy(fig, path, **kw):
    saved.append(fig)
    return real_savefig(fig, path, **kw)

  monkeypatch.setattr(plots.Figure, "savefig", spy)
  return saved


def test_clip_fraction_figure_draws_only_the_sophia_family(fake_compare, monkeypatch):
  root, _ = fake_compare
  _, records = tables.load_results(root)
  saved = _capture_saved_figures(monkeypatch)
  assert plots.plot_clip_fraction(records, root / "clip.png") == root / "clip.png"
  (ax,) = saved[-1].axes
  assert [line.get_label() for line in ax.get_lines()] == ["Sophia-Lambda"]
  y = ax.get_lines()[0].get_ydata()
  assert y[0] == pytest.approx(0.99) and 0.8 < y[-1] < 0.9   # EMA towards 0.8
  assert plots.plot_clip_fraction([r for r in records if r.spec.optimizer == "adamw"],
                                  root / "none.png") is None


def test_four_panels_with_one_line_per_finished_optimizer(fake_compare, monkeypatch):
  root, _ = fake_compare
  _, records = tables.load_results(root)
  saved = _capture_saved_figures(monkeypatch)
  plots.plot_curves(records, root / "x.png")
  axes = saved[-1].axes
  assert len(axes) == 4
  for ax in axes:
    assert len(ax.get_lines()) == 3          # adamw, lion, sophia_lambda (lamvs failed)
  assert {t.get_text() for t in axes[1].get_legend().get_texts()} == {
      "AdamW", "Lion", "Sophia-Lambda"}
  # The mean over the three seeds of the validation curve of AdamW, at its last step.
  adamw_val = axes[1].get_lines()[0].get_ydata()
  last = np.mean([r.metrics[-1]["val_loss"] for r in records if r.spec.label == "adamw"])
  assert adamw_val[-1] == pytest.approx(last)
  # The wall-clock axis of the validation curve: 20 steps x 0.1 s.
  assert axes[3].get_lines()[0].get_xdata()[-1] == pytest.approx(2.0)


def test_ablation_panels_and_interval(tmp_path, fake_trainer):
  specs = ablations.ablation_specs(1, steps=20)
  runner.write_plan(tmp_path, specs, "ablation")
  runner.execute(specs, tmp_path, trainer=fake_trainer(interval=True), log=lambda *_: None)
  _, records = tables.load_results(tmp_path)
  path = plots.plot_ablations(records, tmp_path / "ablations.png")
  assert path is not None and _png_size(path)[0] > 1000
  assert plots.interval_curve(records[0].metrics)[-1] == (20, 30.0)


def test_no_ablation_runs_no_ablation_png(fake_compare):
  root, _ = fake_compare
  _, records = tables.load_results(root)
  assert plots.plot_ablations(records, root / "a.png") is None
  assert not (root / "a.png").exists()


def test_importing_the_plots_leaves_the_matplotlib_backend_alone():
  import subprocess
  import sys

  code = ("import matplotlib; before = matplotlib.get_backend(); import sophia_lambda_jax.compare.plots; "
          "print(before == matplotlib.get_backend())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"MPLBACKEND": "svg", "PATH": ""}, check=True)
  assert out.stdout.strip() == "True"
