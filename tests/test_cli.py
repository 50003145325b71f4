import os
import subprocess
import sys

import pytest

from sophia_lambda_jax import cli


def test_unknown_command_is_refused(capsys):
  assert cli.main(["frobnicate"]) == 2
  assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for command in cli.COMMANDS:
    assert f"slj {command}" in out


def test_train_help_shows_every_flag_with_its_default(capsys):
  import dataclasses

  from sophia_lambda_jax.train.config import TrainConfig

  with pytest.raises(SystemExit) as exit_info:
    cli.main(["train", "--help"])
  assert exit_info.value.code == 0
  options = capsys.readouterr().out.split("options:")[1].split("\n\n")[0]
  # One entry per flag: its line and the indented lines argparse wraps its help onto.
  entries = {}
  for line in options.splitlines():
    if line.startswith("  -"):
      flag = line.split()[0].rstrip(",")
      entries[flag] = line
    elif line.strip():
      entries[flag] += " " + line.strip()
  helps = {flag: " ".join(entry.split()) for flag, entry in entries.items()}
  shown = {"schedule": "cosine", "steps": "200", "decay_fraction": "0.2",
           "final_lr_fraction": "0.1", "model": "qwen-cpu", "model_overrides": "{}",
           "tensorboard": "true", "grad_clip": "1.0", "warmup_steps": "steps // 10",
           "final_eval_batches": "null", "mesh": "data=1,fsdp=1"}
  for field in dataclasses.fields(TrainConfig):
    help_text = helps["--" + field.name.replace("_", "-")]
    assert "(default: " in help_text, (field.name, help_text)
    if field.name in shown:
      assert help_text.endswith(f"(default: {shown[field.name]})"), (field.name, help_text)


def test_console_script_entry_point_runs():
  result = subprocess.run(
      [sys.executable, "-m", "sophia_lambda_jax.cli", "--help"],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "slj compare" in result.stdout


def test_info_prints_parameter_count_and_the_describe_table(capsys):
  import dataclasses

  from sophia_lambda_jax import labels
  from sophia_lambda_jax.models import qwen

  assert cli.main(["info", "--model", "qwen-tiny"]) == 0
  out = capsys.readouterr().out
  config = qwen.get_config("qwen-tiny")
  assert f"{qwen.count_params(config):,} parameters" in out
  table = labels.describe(qwen.abstract_params(dataclasses.replace(config, scan_layers=False)))
  assert out.rstrip().endswith(str(table))  # the same table as slj.labels.describe
  rows = {line.split()[0]: line.split() for line in table.splitlines()
          if line.startswith(("embed", "layers", "final"))}
  assert len(rows) == 12 * config.num_layers + 2
  assert rows["layers/1/mlp/up_proj/kernel"][2:4] == ["mlp", "3"]
  assert rows["embed/embedding"][2:4] == ["embedding", "1"]
  lambdas = [float(row[5]) for row in rows.values()]
  assert all(0.1 <= x <= 10.0 for x in lambdas) and len(set(lambdas)) > 1
  assert "would refuse" not in out


def test_info_rejects_unknown_model(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["info", "--model", "gpt-9"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "unknown model 'gpt-9'" in err and "qwen-134m" in err and "Traceback" not in err


def test_missing_training_stack_is_one_line(monkeypatch, capsys):
  """Without the [train] extra, `slj train` says what to install instead of a traceback."""
  import builtins

  real_import = builtins.__import__

  def without_flax(name, *args, **kwargs):
    if name == "flax" or name.startswith("flax."):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", without_flax)
  for module in [m for m in sys.modules if m.startswith(("flax", "sophia_lambda_jax.train",
                                                          "sophia_lambda_jax.models"))]:
    monkeypatch.delitem(sys.modules, module)
  # `from sophia_lambda_jax import train` would find an earlier import as the attribute.
  import sophia_lambda_jax
  for name in ("train", "models"):
    monkeypatch.delattr(sophia_lambda_jax, name, raising=False)
  assert cli.main(["train", "--steps", "1"]) == 1
  err = capsys.readouterr().err
  assert "pip install 'sophia-lambda-jax[train]'" in err and "'flax'" in err
  assert len(err.strip().splitlines()) == 1


def _execve_calls(monkeypatch, argv, env):
  calls = []
  monkeypatch.setattr(cli.os, "execve", lambda *a: calls.append(a))
  monkeypatch.setattr(cli.sys, "platform", "linux")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  cli.restart_with_huge_pages(argv)
  return calls


def test_train_and_compare_restart_with_malloc_huge_pages(monkeypatch):
  for command in ("train", "compare"):
    (path, args, env), = _execve_calls(monkeypatch, [command, "--steps", "3"], {})
    assert path == sys.executable
    assert args == [sys.executable, "-m", "sophia_lambda_jax.cli", command, "--steps", "3"]
    assert env["GLIBC_TUNABLES"] == cli.HUGE_PAGES_TUNABLE == "glibc.malloc.hugetlb=1"


def test_huge_pages_restart_respects_the_user_s_tunables_and_other_commands(monkeypatch):
  assert _execve_calls(monkeypatch, ["train"], {"GLIBC_TUNABLES": ""}) == []
  assert _execve_calls(monkeypatch, ["compare"],
                       {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == []
  assert _execve_calls(monkeypatch, ["info"], {}) == []
  assert _execve_calls(monkeypatch, [], {}) == []


def test_restarted_command_runs_once_and_keeps_its_output():
  """End to end: `slj train --help` without GLIBC_TUNABLES re-executes itself (once: the new
  process has the variable) and its output arrives."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run([sys.executable, "-m", "sophia_lambda_jax.cli", "train", "--help"],
                       env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "usage: slj train" in out.stdout
