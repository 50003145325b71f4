"""Faults and bad input through `slj train` (in-process through the CLI's `main`): one writer
per run directory, damaged checkpoints, replaced data, finished and resumed runs, Ctrl-C,
operating-system errors and bad values, each one clear line."""

import errno
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from sophia_lambda_jax import cli, data
from sophia_lambda_jax.train import loop
from sophia_lambda_jax.train.checkpoint import restore_arrays
from sophia_lambda_jax.train.metrics import read_metrics
from train_helpers import subprocess_env

STEPS = 4


def _argv(data_dir, out, **extra):
  flags = {"model": "qwen-tiny", "optimizer": "sophia_lambda", "steps": STEPS,
           "batch-size": 4, "seq-len": 32, "data": data_dir, "out": out,
           "checkpoint-every": 2, "keep-checkpoints": 2, "eval-every": 0,
           "compute-dtype": "float32", "hessian-interval": 3, "tensorboard": "false",
           "log-every": 1, **extra}
  argv = ["train"]
  for name, value in flags.items():
    argv += [f"--{name}", str(value)]
  return argv


@pytest.fixture(scope="module")
def corpus(token_data, tmp_path_factory):
  """A module-owned copy of the prepared data (one test replaces it, then puts it back)."""
  path = tmp_path_factory.mktemp("faults") / "data"
  shutil.copytree(token_data, path)
  return path


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4."""
  out = tmp_path_factory.mktemp("faults") / "finished"
  assert cli.main(_argv(corpus, out)) == 0
  return out


def _copy(run, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(run, out)
  return out


def _data_of(run):
  return json.loads((run / "config.json").read_text())["data"]


def _assert_same_final_state(a, b):
  want, got = restore_arrays(a / "checkpoints"), restore_arrays(b / "checkpoints")
  assert sorted(want) == sorted(got)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _largest_state_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _one_line(err, *needles):
  lines = [line for line in err.splitlines() if all(n in line for n in needles)]
  assert len(lines) == 1, err
  assert "Traceback" not in err, err


# ----------------------------------------------------------------------------- one writer
def _hold_lock(directory):
  """A child process holding `directory`'s lock (as a running `slj train` would)."""
  code = ("import sys, time; from sophia_lambda_jax.directory_lock import directory_lock\n"
          "with directory_lock(sys.argv[1]):\n  print('locked', flush=True); time.sleep(120)")
  holder = subprocess.Popen([sys.executable, "-c", code, str(directory)],
                            env=subprocess_env(1, directory.parent), stdout=subprocess.PIPE,
                            text=True)
  assert holder.stdout.readline().strip() == "locked"
  return holder


def test_second_writer_is_refused_and_a_killed_holder_never_blocks(corpus, tmp_path, capsys):
  out = tmp_path / "run"
  holder = _hold_lock(out)
  try:
    assert cli.main(_argv(corpus, out)) == 1
    _one_line(capsys.readouterr().err, f"in use by process {holder.pid}")
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert cli.main(_argv(corpus, out)) == 0  # the kernel released the dead holder's lock
  assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_tokenize_into_a_directory_in_use_is_refused_at_once(tmp_path):
  (tmp_path / "a.txt").write_text("some words to tokenise\n")
  holder = _hold_lock(tmp_path / "tokens")
  try:
    result = subprocess.run(
        [sys.executable, "-m", "sophia_lambda_jax.cli", "tokenize", str(tmp_path / "a.txt"),
         str(tmp_path / "tokens"), "--no-progress"], env=subprocess_env(1, tmp_path),
        capture_output=True, text=True, timeout=60)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert result.returncode == 1
  _one_line(result.stderr, f"in use by process {holder.pid}")


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("damage", ["overwrite bytes", "truncate", "empty config"])
def test_damaged_newest_checkpoint_falls_back_and_continues_bitwise(finished, tmp_path, capsys,
                                                                   damage):
  out = _copy(finished, tmp_path)
  (out / "summary.json").unlink()  # as if killed after the last checkpoint
  step_dir = out / "checkpoints" / str(STEPS)
  if damage == "overwrite bytes":  # same size, other bytes
    victim = _largest_state_file(step_dir)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    victim.write_bytes(bytes(raw))
  elif damage == "truncate":
    victim = _largest_state_file(step_dir)
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
  else:
    next(p for p in (step_dir / "config").rglob("*") if p.is_file()
         and p.name != "commit_success.txt").write_text("")
  assert cli.main(_argv(_data_of(finished), out)) == 0
  captured = capsys.readouterr()
  _one_line(captured.err, f"checkpoint step {STEPS}", "damaged")
  assert "resumed at step 2" in captured.out
  _assert_same_final_state(finished, out)
  # The summary's timings cover both segments: steps 2 and 4 (1 and 3 start a segment).
  records = [r for r in read_metrics(out / "metrics.jsonl") if "step_time_s" in r]
  steady = [r for r in records if not r.get("warmup")]
  assert [r["step"] for r in steady] == [2, 4]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["mean_step_s"] == pytest.approx(np.mean([r["step_time_s"] for r in steady]))


def test_no_good_checkpoint_left_restarts_from_step_zero(finished, tmp_path, capsys):
  out = _copy(finished, tmp_path)  # as with --keep-checkpoints 1: only step 4, damaged
  (out / "summary.json").unlink()
  shutil.rmtree(out / "checkpoints" / "2")
  _largest_state_file(out / "checkpoints" / str(STEPS)).write_bytes(b"")
  assert cli.main(_argv(_data_of(finished), out)) == 0
  captured = capsys.readouterr()
  _one_line(captured.err, "no usable checkpoint", "restarts from step 0")
  assert "from scratch" in captured.out
  _assert_same_final_state(finished, out)


def test_checkpoints_of_older_runs_resume_with_warnings(finished, tmp_path, capsys,
                                                       monkeypatch):
  """No checksums (saved before they existed) and no data fingerprint: resumed, warned."""
  from sophia_lambda_jax.train.checkpoint import CHECKSUMS, Checkpointer

  out = _copy(finished, tmp_path)
  (out / "summary.json").unlink()
  for step_dir in (out / "checkpoints").iterdir():
    (step_dir / CHECKSUMS).unlink()
  read_meta = Checkpointer.read_meta
  monkeypatch.setattr(Checkpointer, "read_meta", lambda self, step: {
      k: v for k, v in read_meta(self, step).items() if k != "data_fingerprint"})
  assert cli.main(_argv(_data_of(finished), out)) == 0
  captured = capsys.readouterr()
  _one_line(captured.err, f"checkpoint step {STEPS}", "has no checksums")
  _one_line(captured.err, "without a data fingerprint")
  assert f"resumed at step {STEPS}" in captured.out
  _assert_same_final_state(finished, out)


def test_a_checkpoint_of_another_optimizer_state_layout_is_refused_and_kept(finished, tmp_path,
                                                                          capsys, monkeypatch):
  """A checkpoint written before the optimizer state gained a field (here: without rho and
  log_rho, as before the rho controller) is refused in one line, before any restore, and
  every checkpoint stays in place."""
  from sophia_lambda_jax.train.checkpoint import Checkpointer

  out = _copy(finished, tmp_path)
  (out / "summary.json").unlink()
  read_meta = Checkpointer.read_meta
  monkeypatch.setattr(Checkpointer, "read_meta", lambda self, step: dict(
      read_meta(self, step), keys=[k for k in read_meta(self, step)["keys"]
                                   if not k.endswith("rho")]))
  before = sorted(p.name for p in (out / "checkpoints").iterdir())
  assert cli.main(_argv(_data_of(finished), out)) == 1
  _one_line(capsys.readouterr().err, "refusing to resume", "another version of the optimizer "
            "state", "rho'")
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before == ["2", "4"]


# ----------------------------------------------------------------------------- data, reruns
def test_resume_on_replaced_data_is_refused(finished, corpus, tmp_path, capsys):
  out = _copy(finished, tmp_path)
  (out / "summary.json").unlink()
  with open(tmp_path / "other.jsonl", "w") as f:
    for i in range(300):
      f.write(json.dumps({"text": f"another corpus, document {i}: " + "lorem ipsum " * 40})
              + "\n")
  saved = tmp_path / "saved-data"
  shutil.move(corpus, saved)
  try:
    data.prepare(str(tmp_path / "other.jsonl"), corpus, val_fraction=0.1, num_workers=1,
                 progress=False)
    assert cli.main(_argv(corpus, out)) == 1
  finally:
    shutil.rmtree(corpus)
    shutil.move(saved, corpus)
  _one_line(capsys.readouterr().err, "refusing to resume", str(corpus), "data fingerprint")
  assert not (out / "summary.json").exists()


def test_rerunning_a_finished_run_changes_nothing(finished, tmp_path, capsys):
  out = _copy(finished, tmp_path)

  def files():
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != ".lock"}

  before = files()
  assert cli.main(_argv(_data_of(finished), out)) == 0
  _one_line(capsys.readouterr().err, "already finished")
  assert files() == before


def test_ctrl_c_says_where_the_run_resumes(corpus, tmp_path, capsys, monkeypatch):
  real = loop._check_finite

  def interrupt_at_step_3(metrics, done, checkpointer, logger):
    if done == 3:
      raise KeyboardInterrupt
    return real(metrics, done, checkpointer, logger)

  monkeypatch.setattr(loop, "_check_finite", interrupt_at_step_3)
  assert cli.main(_argv(corpus, tmp_path / "run")) == 130
  _one_line(capsys.readouterr().err, "interrupted", "resumes from step 2")


# ----------------------------------------------------------------------------- bad input, OS
def test_bad_optimizer_value_is_refused_before_anything_runs(corpus, tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(_argv(corpus, out, **{"opt.rho": "abc"})) == 2
  _one_line(capsys.readouterr().err, "rho must be a number")
  assert not out.exists()
  assert cli.main(_argv(corpus, out, **{"model.num_layers": "-1"})) == 2
  _one_line(capsys.readouterr().err, "num_layers must be a positive integer")
  assert not out.exists()


def test_out_that_is_a_file_is_one_line_and_debug_shows_the_traceback(corpus, tmp_path,
                                                                       capsys):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  assert cli.main(_argv(corpus, blocker)) == 1
  _one_line(capsys.readouterr().err, str(blocker))
  with pytest.raises(OSError):
    cli.main(_argv(corpus, blocker) + ["--debug"])


def test_disk_full_is_one_line_naming_the_path(corpus, tmp_path, capsys, monkeypatch):
  def full(self, path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  monkeypatch.setattr(loop.TrainConfig, "to_json", full)
  assert cli.main(_argv(corpus, tmp_path / "run")) == 1
  _one_line(capsys.readouterr().err, str(tmp_path / "run" / "config.json"), "no space left")
