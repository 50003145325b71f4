"""Run metrics: a JSONL file, optional TensorBoard events, and progress on the console.

`<out>/metrics.jsonl` holds one JSON object per line:

- a train record per optimizer step: {"step", "loss", "lr", "grad_norm", "step_time_s",
  "tokens_per_s", "refresh"} plus, for the Sophia family, "hessian_interval",
  "hessian_refreshes", "hessian_skipped" (refreshes skipped for a non-finite estimate),
  "rho" (the rho of this update: fixed, or the rho controller's), "clip_fraction" and
  "clip_fraction/<role>" per parameter role (step is 1-based: the record of step s
  describes the update that produced parameters after s steps);
- an eval record every eval_every steps: {"step", "val_loss"}.

On a restart the file is cut back to the restored checkpoint's step, so it never holds two
records for one step. Only process 0 writes. On a terminal a tqdm bar shows progress and
ETA; otherwise one plain line is printed every log_every steps.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm


def truncate_metrics(path: Path, last_step: int) -> None:
  """Drop records after `last_step` (and a torn last line from a killed process)."""
  if not path.exists():
    return
  kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
  path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
  """The JSON records of a metrics.jsonl ([] when it does not exist); a torn line (from a
  killed process) is skipped."""
  path = Path(path)
  if not path.is_file():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict):
      records.append(record)
  return records


def _tensorboard_writer(directory: Path):
  """A SummaryWriter from tensorboardX or torch when either is installed, else None."""
  for module, needs in (("tensorboardX", "tensorboardX"),
                        ("torch.utils.tensorboard", "tensorboard")):
    if importlib.util.find_spec(needs) is None:  # skip importing torch for nothing
      continue
    try:
      writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
      return writer_cls(str(directory))
    except Exception:  # not installed, or torch without the tensorboard package
      continue
  return None


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


class MetricsLogger:
  """Writes records (process 0 only) and shows progress."""

  def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool,
               log_every: int, tensorboard: bool = True, stream=None):
    self.enabled = enabled
    self.log_every = log_every
    self.total_steps = total_steps
    self.stream = sys.stdout if stream is None else stream
    self._file = None
    self._bar = None
    self._tb = None
    self._start = time.perf_counter()
    if not enabled:
      return
    path = out_dir / "metrics.jsonl"
    truncate_metrics(path, start_step)
    self._file = open(path, "a", buffering=1)
    if tensorboard:
      self._tb = _tensorboard_writer(out_dir / "tensorboard")
    if getattr(self.stream, "isatty", lambda: False)():
      # shutil falls back to 80x24 where a terminal reports a size of 0 (tqdm would then
      # draw nothing).
      size = shutil.get_terminal_size()
      self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step",
                       ncols=size.columns, nrows=size.lines)

  def _write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, record["step"])

  def log_step(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._write(record)
    step = record["step"]
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            refresh=False)
    elif step % self.log_every == 0 or step == self.total_steps:
      fields = " ".join(f"{k}={_format(record[k])}" for k in
                        ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "hessian_interval",
                         "rho", "clip_fraction") if record.get(k) is not None)
      print(f"step {step}/{self.total_steps} {fields}", file=self.stream, flush=True)

  def log_eval(self, step: int, val_loss: float, batches: int | None = None) -> None:
    """One evaluation: its mean loss over `batches` validation batches."""
    if not self.enabled:
      return
    self._write({"step": step, "val_loss": val_loss}
                | ({} if batches is None else {"val_batches": batches}))
    message = f"step {step}/{self.total_steps} val_loss={val_loss:.4f}"
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, file=self.stream, flush=True)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()


# Liu et al. 2023 choose rho so that 10-50 % of coordinates are not clipped: below that the
# update is lr * sign(m) and the Hessian never enters it.
UNCLIPPED_BAND = (0.10, 0.50)


def unclipped_fractions(records, steps: int) -> dict[str, float]:
  """1 - clip fraction, averaged over the train records of the second half of a run
  (steps > steps / 2): {"all": ..., "<role>": ...}; empty for runs that log none."""
  sums: dict[str, list[float]] = {}
  for r in records:
    if "loss" not in r or not isinstance(r.get("step"), int) or r["step"] <= steps / 2:
      continue
    for key, value in r.items():
      if key == "clip_fraction" or key.startswith("clip_fraction/"):
        if isinstance(value, (int, float)):
          name = "all" if key == "clip_fraction" else key.split("/", 1)[1]
          sums.setdefault(name, []).append(1.0 - float(value))
  return {name: sum(v) / len(v) for name, v in sums.items()}


def in_unclipped_band(fraction: float | None) -> bool | None:
  """Whether an unclipped fraction lies in the 10-50 % band (None when there is none)."""
  if fraction is None:
    return None
  return UNCLIPPED_BAND[0] <= fraction <= UNCLIPPED_BAND[1]


def say(message: str) -> None:
  """One line on stderr from process 0 (warnings and refusals the user must see)."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def finite_or_none(value: float) -> float | None:
  """JSON has no NaN: store non-finite numbers as null."""
  return value if math.isfinite(value) else None
