"""The compare runner: plan, skip finished runs, resume partial ones, record failures,
the tuned two-phase protocol, and one real (tiny) training run end to end."""

import json
import os
from pathlib import Path

import pytest

from sophia_lambda_jax.compare import protocols, runner


def _run(tmp_path, trainer, *extra):
  return runner.main(["--protocol", "cpu", "--out", str(tmp_path), "--no-plots",
                       "--optimizers", "adamw,lion,sophia_lambda", *extra], trainer=trainer)


def test_runs_everything_then_skips_finished_runs(tmp_path, fake_trainer, capsys):
  trainer = fake_trainer()
  assert _run(tmp_path, trainer) == 0
  assert sorted(Path(c).relative_to(tmp_path).as_posix() for c in trainer.calls) == [
      "adamw/seed0", "lion/seed0", "sophia_lambda/seed0"]
  for name in ("plan.json", "results.json", "results.md"):
    assert (tmp_path / name).is_file()
  out = capsys.readouterr().out
  assert "run 3/3" in out and "| Sophia-Lambda |" in out

  again = fake_trainer()
  assert _run(tmp_path, again) == 0
  assert again.calls == []
  assert "3 finished, 0 to run" in capsys.readouterr().out


def test_interrupted_compare_continues_the_missing_runs(tmp_path, fake_trainer):
  assert _run(tmp_path, fake_trainer(), "--seeds", "2") == 0
  (tmp_path / "lion/seed1/summary.json").unlink()             # killed before the end
  (tmp_path / "adamw/seed0/summary.json").unlink()
  trainer = fake_trainer()
  assert _run(tmp_path, trainer, "--seeds", "2") == 0
  assert sorted(Path(c).relative_to(tmp_path).as_posix() for c in trainer.calls) == [
      "adamw/seed0", "lion/seed1"]


def test_failed_run_is_recorded_and_not_retried_unless_asked(tmp_path, fake_trainer, capsys):
  trainer = fake_trainer(fail_for={"lion"})
  assert _run(tmp_path, trainer) == 1
  failed = json.loads((tmp_path / "lion/seed0/failed.json").read_text())
  assert "FloatingPointError" in failed["error"]
  assert "did not finish: lion/seed0" in capsys.readouterr().err
  assert "0/1 (1 failed)" in (tmp_path / "results.md").read_text()

  second = fake_trainer()
  assert _run(tmp_path, second) == 1
  assert second.calls == []
  third = fake_trainer()
  assert _run(tmp_path, third, "--retry-failed") == 0
  assert [Path(c).name for c in third.calls] == ["seed0"]
  assert not (tmp_path / "lion/seed0/failed.json").exists()


def test_tuned_sweeps_then_runs_the_best_lr_with_three_seeds(tmp_path, fake_trainer):
  trainer = fake_trainer()
  rc = runner.main(["--protocol", "tuned", "--out", str(tmp_path), "--no-plots",
                     "--optimizers", "adamw"], trainer=trainer)
  assert rc == 0
  sweep = protocols.sweep_learning_rates("adamw")
  best = min(sweep, key=lambda lr: abs(__import__("math").log10(lr) + 3))  # fake optimum
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert plan["best_settings"]["adamw"]["learning_rate"] == best
  assert plan["best_settings"]["adamw"]["optimizer_kwargs"] == {}
  tag = protocols.lr_tag(best)
  # 5 sweep runs on seed 0, then the best on seeds 1, 2 and 3: the seed that chose a
  # setting is never reported.
  assert len(trainer.calls) == len(sweep) + 3
  assert {Path(c).relative_to(tmp_path).as_posix() for c in trainer.calls[-3:]} == {
      f"adamw/{tag}/seed1", f"adamw/{tag}/seed2", f"adamw/{tag}/seed3"}
  md = (tmp_path / "results.md").read_text()
  assert "### Sweep (seed 0," in md and "(n=3)" in md and "Chosen settings" in md
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["aggregates"][f"adamw/{tag}"]["seeds"] == [1, 2, 3]


def test_list_prints_the_plan_without_training(tmp_path, fake_trainer, capsys):
  trainer = fake_trainer()
  assert runner.main(["--protocol", "cpu", "--out", str(tmp_path), "--list"],
                      trainer=trainer) == 0
  assert trainer.calls == [] and not (tmp_path / "plan.json").exists()
  assert capsys.readouterr().out.count("/seed0: ") == 8


def test_paper_protocol_without_data_is_refused(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit):
    runner.main(["--protocol", "paper-short", "--out", str(tmp_path)])
  assert "slj tokenize" in capsys.readouterr().err


def test_set_overrides_reach_the_train_config(tmp_path, fake_trainer):
  seen = []

  def trainer(config):
    seen.append(config)
    return fake_trainer()(config)

  assert runner.main(["--protocol", "cpu", "--out", str(tmp_path), "--no-plots",
                       "--optimizers", "adamw", "--steps", "7", "--set", "mesh=data=1,fsdp=1",
                       "--set", "grad_clip=0.5"], trainer=trainer) == 0
  assert (seen[0].steps, seen[0].mesh, seen[0].grad_clip) == (7, "data=1,fsdp=1", 0.5)
  with pytest.raises(ValueError, match="KEY=VALUE"):
    runner._parse_set(["steps"])


def test_real_tiny_training_run_is_skipped_when_finished_and_reproducible(tmp_path):
  """Real run_training calls (qwen-tiny, 3 steps, a small jsonl corpus): a re-run of the
  compare does not train again, and the same compare into a fresh directory reproduces the
  same losses exactly."""
  from sophia_lambda_jax import data

  corpus = tmp_path / "corpus.jsonl"
  docs = [" ".join(f"word{(d * 7 + i) % 97} alpha beta{i % 13}" for i in range(60))
          for d in range(60)]
  corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
  data_dir = data.prepare(str(corpus), tmp_path / "tokens", val_fraction=0.2, num_workers=1,
                          progress=False)
  out = tmp_path / "cmp"
  args = ["--protocol", "cpu", "--out", str(out), "--optimizers", "sophia_lambda",
          "--steps", "3", "--data", str(data_dir), "--no-plots",
          "--set", "model=qwen-tiny", "--set", "batch_size=2", "--set", "seq_len=16",
          "--set", "eval_batches=1", "--set", "warmup_steps=1", "--set", "tensorboard=false",
          "--no-compile-cache"]
  assert runner.main(args) == 0
  run = out / "sophia_lambda/seed0"
  summary = json.loads((run / "summary.json").read_text())
  assert summary["steps"] == 3 and summary["final_val_loss"] > 0
  first = json.loads((out / "results.json").read_text())["aggregates"]

  def must_not_train(config):
    raise AssertionError("a finished run was trained again")

  assert runner.main(args, trainer=must_not_train) == 0
  again = json.loads((out / "results.json").read_text())["aggregates"]
  assert again["sophia_lambda"]["final_val_loss"] == first["sophia_lambda"]["final_val_loss"]

  fresh = tmp_path / "cmp2"
  assert runner.main([a if a != str(out) else str(fresh) for a in args]) == 0

  def losses(root):
    lines = (root / "sophia_lambda/seed0/metrics.jsonl").read_text().splitlines()
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, lines)]

  assert losses(fresh) == losses(out)
  assert len(losses(out)) == 4        # 3 train records and the final evaluation


def test_rerun_with_other_settings_is_refused_then_overwritten(tmp_path, fake_trainer,
                                                               capsys):
  assert _run(tmp_path, fake_trainer(), "--steps", "3") == 0
  capsys.readouterr()
  trainer = fake_trainer()
  assert _run(tmp_path, trainer, "--steps", "5") == 1
  err = capsys.readouterr().err
  assert "adamw/seed0: steps: 3 there, 5 planned" in err and "--overwrite" in err
  assert trainer.calls == []
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert {r["fields"]["steps"] for r in plan["runs"]} == {3}  # still describes the table

  trainer = fake_trainer()
  assert _run(tmp_path, trainer, "--steps", "5", "--overwrite") == 0
  assert len(trainer.calls) == 3
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert {r["fields"]["steps"] for r in plan["runs"]} == {5}
  for name in ("adamw", "lion", "sophia_lambda"):
    assert json.loads((tmp_path / name / "seed0/config.json").read_text())["steps"] == 5


@pytest.mark.parametrize("setting, message", [
    ("bogus_field=1", "bogus_field"),
    ("steps=-1", "steps must be a positive integer"),
    ('model_overrides={"num_layers": 0}', "num_layers must be a positive integer"),
])
def test_bad_set_values_are_refused_before_any_run(tmp_path, fake_trainer, capsys, setting,
                                                   message):
  trainer = fake_trainer()
  with pytest.raises(SystemExit) as exit_info:
    _run(tmp_path, trainer, "--set", setting)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert trainer.calls == [] and not list(tmp_path.rglob("failed.json"))


def test_second_compare_on_one_out_is_refused(tmp_path, fake_trainer, capsys):
  from sophia_lambda_jax.directory_lock import directory_lock

  with directory_lock(tmp_path):  # held by "another" compare (this process's own fd)
    assert _run(tmp_path, fake_trainer()) == 1
  assert f"in use by process {os.getpid()}" in capsys.readouterr().err


def test_cpu_long_tuned_selects_on_seed_100_then_reports_seeds_0_to_2(tmp_path, fake_trainer):
  trainer = fake_trainer()
  assert runner.main(["--protocol", "cpu-long-tuned", "--out", str(tmp_path), "--no-plots",
                      "--optimizers", "adamw,lion"], trainer=trainer) == 0
  runs = [Path(c).relative_to(tmp_path).as_posix() for c in trainer.calls]
  # 5 + 5 selection runs, AdamW's b2 0.99 at its best rate, then 2 x 3 final runs.
  assert len(runs) == 17 and all(r.endswith("seed100") for r in runs[:11])
  assert runs[10] == "adamw/lr7.500e-04/b20.99/seed100"
  assert sorted(r.rsplit("/", 1)[1] for r in runs[11:]) == sorted(["seed0", "seed1",
                                                                    "seed2"] * 2)
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert plan["best_settings"]["lion"]["learning_rate"] == 1.2e-3
  assert plan["extensions"] == {} and "commit" in plan["code"]
  report = json.loads((tmp_path / "results.json").read_text())
  finals = [r for r in report["runs"] if r["phase"] == "final"]
  assert len(finals) == 6 and {r["seed"] for r in finals} == {0, 1, 2}
  assert {r["seed"] for r in report["runs"] if r["phase"] == "sweep"} == {100}
  for agg in report["aggregates"].values():
    assert sorted(agg["seeds"]) == [0, 1, 2]
  md = (tmp_path / "results.md").read_text()
  assert "the whole validation split" in md and "82 %" in md and "### Sweep (seed 100," in md


def test_stop_after_ends_a_stage_that_the_same_command_continues(tmp_path, fake_trainer,
                                                                  monkeypatch, capsys):
  clock = [0.0]
  monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])

  def slow(config):  # every run takes ten minutes of the fake clock
    clock[0] += 600
    return fake_trainer()(config)

  assert _run(tmp_path, slow, "--stop-after", "15") == 0
  assert "stopped after --stop-after 15 min with 1 planned run(s) left" in (
      capsys.readouterr().out)
  assert runner.run_status(tmp_path / "sophia_lambda/seed0") == "pending"
  trainer = fake_trainer()
  assert _run(tmp_path, trainer) == 0
  assert [Path(c).relative_to(tmp_path).as_posix() for c in trainer.calls] == [
      "sophia_lambda/seed0"]
  with pytest.raises(SystemExit):
    _run(tmp_path, trainer, "--stop-after", "0")


def test_runs_of_another_commit_are_not_continued(tmp_path, fake_trainer, monkeypatch, capsys):
  monkeypatch.setattr(runner, "code_version", lambda: {"commit": "a" * 40, "dirty": False})
  assert _run(tmp_path, fake_trainer()) == 0
  assert json.loads((tmp_path / "plan.json").read_text())["code"]["commit"] == "a" * 40
  monkeypatch.setattr(runner, "code_version", lambda: {"commit": "b" * 40, "dirty": False})
  trainer = fake_trainer()
  assert _run(tmp_path, trainer) == 1
  assert trainer.calls == []
  err = capsys.readouterr().err
  assert "made by commit aaaaaaaaaaaa and this is bbbbbbbbbbbb" in err and "worktree" in err
