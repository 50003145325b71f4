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

from checkpoint_arrays import restore_arrays
from sophia_lambda_jax import cli, data, runs
from sophia_lambda_jax.train import checkpoint, loop, program
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


def _largest_state_file(step_dir, item="state"):
  return max((p for p in (step_dir / item).rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _flip_bit(path, position):
  raw = bytearray(path.read_bytes())
  raw[position] ^= 1
  path.write_bytes(bytes(raw))


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
@pytest.mark.parametrize("damage", ["overwrite bytes", "truncate", "empty config",
                                    "one bit of params"])
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
  elif damage == "one bit of params":
    victim = _largest_state_file(step_dir, "params")
    _flip_bit(victim, victim.stat().st_size // 2)
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


def test_one_flipped_bit_in_any_params_file_is_found(finished):
  step_dir = finished / "checkpoints" / str(STEPS)
  files = [p for p in (step_dir / "params").rglob("*") if p.is_file()]
  assert len(files) > 3
  for victim in files:
    position = victim.stat().st_size * 2 // 3
    _flip_bit(victim, position)
    try:
      found = checkpoint.check(step_dir)
    finally:
      _flip_bit(victim, position)
    assert found.damaged is not None and str(victim.relative_to(step_dir)) in found.damaged
  assert checkpoint.check(step_dir) == (None, None)


def test_reads_take_the_newest_intact_checkpoint_and_refuse_a_damaged_one(finished, tmp_path,
                                                                          capsys):
  out = _copy(finished, tmp_path)
  _flip_bit(_largest_state_file(out / "checkpoints" / str(STEPS), "params"), 100)
  assert cli.main(["eval", str(out), "--batches", "1"]) == 0
  _one_line(capsys.readouterr().err, f"checkpoint step {STEPS}", "damaged", "using step 2")
  assert runs.load(out).step == 2 and runs.newest_checkpoint(out) == 2
  capsys.readouterr()
  abstract = _params_like(out)
  with pytest.raises(ValueError, match=f"step {STEPS} .* is damaged .*refusing to read it"):
    checkpoint.restore_params(out / "checkpoints", abstract, step=STEPS)
  assert checkpoint.restore_params(out / "checkpoints", abstract, step=2)[0] == 2
  # No intact checkpoint left: refused in one line, nothing deleted.
  _flip_bit(_largest_state_file(out / "checkpoints" / "2", "params"), 100)
  assert cli.main(["generate", str(out), "--prompt", "the"]) == 2
  _one_line(capsys.readouterr().err, "every checkpoint", "is damaged")
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", str(STEPS)]


def _params_like(run):
  from flax import nnx

  from sophia_lambda_jax.models import qwen

  config = qwen.QwenConfig(**json.loads((run / "model.json").read_text()))
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: qwen.Qwen(config,
                                                                      rngs=nnx.Rngs(0))),
                                    nnx.Param))


def test_checksums_written_before_they_covered_params_verify_the_rest_and_warn(finished,
                                                                            tmp_path,
                                                                            capsys):
  out = _copy(finished, tmp_path)
  for step_dir in (out / "checkpoints").iterdir():  # as an older version wrote them
    manifest = json.loads((step_dir / checkpoint.CHECKSUMS).read_text())
    files = {k: v for k, v in manifest["files"].items() if not k.startswith("params/")}
    (step_dir / checkpoint.CHECKSUMS).write_text(json.dumps({"algorithm": "crc32",
                                                             "files": files}))
  assert runs.load(out).step == STEPS
  _one_line(capsys.readouterr().err, f"checkpoint step {STEPS}",
            "do not cover its parameters")
  _flip_bit(_largest_state_file(out / "checkpoints" / str(STEPS)), 100)  # a listed file
  assert runs.load(out).step == 2
  _one_line(capsys.readouterr().err, f"checkpoint step {STEPS}", "damaged", "using step 2")


def test_a_checkpoint_without_checksums_is_resumed_with_a_warning_never_deleted(finished,
                                                                               tmp_path,
                                                                               capsys):
  from sophia_lambda_jax.train.checkpoint import Checkpointer

  out = _copy(finished, tmp_path)
  (out / "checkpoints" / str(STEPS) / checkpoint.CHECKSUMS).unlink()
  config = json.loads((out / "config.json").read_text())
  checkpointer = Checkpointer(out / "checkpoints", keep=2)
  try:
    resume = program.checkpoint_to_resume(checkpointer, config)
  finally:
    checkpointer.close()
  assert resume.step == STEPS and resume.damaged == []
  _one_line(capsys.readouterr().err, f"checkpoint step {STEPS}", "has no checksums")


@pytest.mark.parametrize("failure", ["preset changed", "out of memory"])
def test_an_intact_checkpoint_that_does_not_restore_is_refused_and_kept(finished, tmp_path,
                                                                        capsys, monkeypatch,
                                                                        failure):
  import dataclasses

  from sophia_lambda_jax.models import qwen
  from sophia_lambda_jax.train.checkpoint import Checkpointer

  out = _copy(finished, tmp_path)
  (out / "summary.json").unlink()
  before = sorted(p.relative_to(out) for p in (out / "checkpoints").rglob("*"))
  if failure == "preset changed":
    monkeypatch.setitem(qwen.PRESETS, "qwen-tiny", dataclasses.replace(
        qwen.PRESETS["qwen-tiny"], intermediate_size=96))
    expected = ("mlp/down_proj/kernel was saved with shape (192, 64), (96, 64) is "
                "expected")
  else:
    def exhausted(self, step, abstract_state):
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 byte")

    monkeypatch.setattr(Checkpointer, "restore", exhausted)
    expected = "RuntimeError: RESOURCE_EXHAUSTED"
  assert cli.main(_argv(_data_of(finished), out)) == 1
  _one_line(capsys.readouterr().err, f"refusing to resume from checkpoint step {STEPS}",
            expected, "every checkpoint is left in place")
  assert sorted(p.relative_to(out) for p in (out / "checkpoints").rglob("*")) == before


def test_reads_say_the_step_of_an_unfinished_run_and_survive_a_writer_deleting_it(
    finished, tmp_path, capsys, monkeypatch):
  out = _copy(finished, tmp_path)
  (out / "summary.json").unlink()  # unfinished, as during training
  assert cli.main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "2"]) == 0
  _one_line(capsys.readouterr().err, "the run has not finished",
            f"using its checkpoint at step {STEPS} of {STEPS}")
  # A run training there deletes the checkpoint being read: the read takes the newest then.
  read = checkpoint._read_params

  def deleted_by_a_writer(directory, step, abstract):
    if step == STEPS:
      shutil.rmtree(directory / str(step))
    return read(directory, step, abstract)

  monkeypatch.setattr(checkpoint, "_read_params", deleted_by_a_writer)
  assert runs.load(out).step == 2
  capsys.readouterr()
  # A writer always one save ahead of the reader: one line.
  def always_ahead(directory, step, abstract):
    (directory / str(step)).rename(directory / str(step + 2))
    return read(directory, step, abstract)

  monkeypatch.setattr(checkpoint, "_read_params", always_ahead)
  assert cli.main(["eval", str(out), "--batches", "1"]) == 2
  _one_line(capsys.readouterr().err, "was removed while it was read", "run the command again")


def test_a_deleted_metrics_file_is_said_and_counted_in_the_summary(finished, tmp_path,
                                                                  capsys):
  out = _copy(finished, tmp_path)
  (out / "summary.json").unlink()
  (out / "metrics.jsonl").unlink()
  assert cli.main(_argv(_data_of(finished), out)) == 0
  _one_line(capsys.readouterr().err, "metrics.jsonl holds the records of 0 of the run's "
            f"{STEPS} steps")
  assert json.loads((out / "summary.json").read_text())["logged_steps"] == 0


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


# A `slj train` whose checkpoint saves take argv[1] seconds (the checksums are written on
# orbax's background thread, before the step directory is renamed into place); it prints
# "saving <step>" when one starts.
_SLOW_SAVES = """
import sys, time
from sophia_lambda_jax import cli
from sophia_lambda_jax.train import checkpoint
write = checkpoint.write_checksums
def slow(step_dir):
  print("saving", step_dir.name.split(".")[0], flush=True)
  time.sleep(float(sys.argv[1]))
  write(step_dir)
checkpoint.write_checksums = slow
sys.exit(cli.main(sys.argv[2:]))
"""


def _interrupt_a_save(argv, save_s, signals, env):
  """Start `slj train` with saves of `save_s` seconds, send `signals` (0.3 s apart) once a
  save has started; (exit status, seconds from the first signal to the exit, stderr)."""
  import time

  child = subprocess.Popen([sys.executable, "-c", _SLOW_SAVES, str(save_s), *argv],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in child.stdout:
      if line.startswith("saving"):
        break
    start = time.monotonic()
    for signum in signals:
      child.send_signal(signum)
      time.sleep(0.3)
    status = child.wait(timeout=30)
    elapsed = time.monotonic() - start
  finally:
    child.kill()
  return status, elapsed, child.stderr.read()


def test_ctrl_c_or_sigterm_during_a_save_exits_within_15_s(corpus, tmp_path, compile_cache):
  out = tmp_path / "run"
  argv = _argv(corpus, out, steps=40, **{"checkpoint-every": 2})
  env = subprocess_env(1, compile_cache)
  # A save that completes within the grace period is waited for.
  status, elapsed, err = _interrupt_a_save(argv, 2, [signal.SIGINT], env)
  assert status == 130 and elapsed < 15, err
  _one_line(err, "interrupted;", "resumes from step")
  complete, partial = checkpoint.steps_on_disk(out / "checkpoints")
  assert partial == [] and f"resumes from step {complete[-1]} " in err
  # One that does not is abandoned; the process ends, its lock with it.
  status, elapsed, err = _interrupt_a_save(argv, 60, [signal.SIGTERM], env)
  assert status == 143 and elapsed < 15, err
  _one_line(err, "interrupted by SIGTERM while checkpoint step", "abandoned",
            f"resumes from step {checkpoint.steps_on_disk(out / 'checkpoints')[0][-1]} ")
  # A second Ctrl-C abandons at once.
  status, elapsed, err = _interrupt_a_save(argv, 60, [signal.SIGINT, signal.SIGINT], env)
  assert status == 130 and elapsed < 5, err
  _one_line(err, "interrupted while checkpoint step", "abandoned")
  assert "Traceback" not in err
  # The same command resumes from the checkpoint the line named.
  named = int(err.split("resumes from step ")[1].split()[0])
  resumed = subprocess.run([sys.executable, "-m", "sophia_lambda_jax.cli", *argv], env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"| resumed at step {named}\n" in resumed.stdout, resumed.stdout[:2000]


def test_an_abandoned_save_cannot_complete_after_the_line_that_names_the_resume_step(tmp_path):
  """The line of an abandoned save names the newest complete checkpoint; the save in flight
  is set aside first, so orbax cannot rename it into place after the line (the next run
  would then resume from a newer checkpoint than the line said)."""
  directory = tmp_path / "checkpoints"
  (directory / "18").mkdir(parents=True)
  (directory / "20.orbax-checkpoint-tmp").mkdir()
  line = loop._interrupted(directory, signal.SIGTERM, abandoned=True)
  assert "while checkpoint step 20 was being written: abandoned" in line
  assert "resumes from step 18 " in line
  with pytest.raises(FileNotFoundError):  # what orbax's finalising rename would meet
    (directory / "20.orbax-checkpoint-tmp").rename(directory / "20")
  assert checkpoint.steps_on_disk(directory) == ([18], [20])
  # A save that completed before the signal was handled is named.
  (directory / "22").mkdir()
  assert "resumes from step 22 " in loop._interrupted(directory, signal.SIGTERM,
                                                       abandoned=True)


# ----------------------------------------------------------------------------- bad input, OS
def test_bad_optimizer_value_is_refused_before_anything_runs(corpus, tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(_argv(corpus, out, **{"opt.rho": "abc"})) == 2
  _one_line(capsys.readouterr().err, "rho must be a number")
  assert not out.exists()
  assert cli.main(_argv(corpus, out, **{"model.num_layers": "-1"})) == 2
  _one_line(capsys.readouterr().err, "num_layers must be a positive integer")
  assert not out.exists()


@pytest.mark.parametrize("values, expected", [
    ({"tensorboard": "no"}, "tensorboard must be true or false, got 'no'"),
    ({"final_lr_fraction": "0.1"}, "final_lr_fraction must be a number, got '0.1'"),
    ({"seed": [1]}, "seed must be an integer, got [1]"),
    ({"steps": 10**12}, "steps must be at most 2,147,483,647"),
])
def test_config_values_of_the_wrong_type_or_size_are_refused_in_one_line(corpus, tmp_path,
                                                                         capsys, values,
                                                                         expected):
  (tmp_path / "run.json").write_text(json.dumps(values))
  out = tmp_path / "run"
  assert cli.main(_argv(corpus, out)[:1] + ["--config", str(tmp_path / "run.json"),
                                             "--out", str(out)]) == 2
  err = capsys.readouterr().err
  _one_line(err, expected)
  assert len(err.splitlines()) == 1 and not out.exists()


def test_out_that_is_a_file_is_one_line_and_debug_shows_the_traceback(corpus, tmp_path,
                                                                       capsys):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  assert cli.main(_argv(corpus, blocker)) == 1
  _one_line(capsys.readouterr().err, str(blocker))
  with pytest.raises(OSError):
    cli.main(_argv(corpus, blocker) + ["--debug"])


@pytest.mark.parametrize("full_at", ["config.json", "a checkpoint"])
def test_disk_full_is_one_line_naming_the_path(corpus, tmp_path, capsys, monkeypatch,
                                               full_at):
  if full_at == "config.json":
    def full(self, path):
      raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(loop.TrainConfig, "to_json", full)
    path = tmp_path / "run" / "config.json"
  else:  # room for less than a checkpoint: refused before orbax writes any of it
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    path = tmp_path / "run" / "checkpoints"
  assert cli.main(_argv(corpus, tmp_path / "run")) == 1
  err = capsys.readouterr().err
  _one_line(err, f"{path}: no space left")
  assert len(err.splitlines()) == 1, err
