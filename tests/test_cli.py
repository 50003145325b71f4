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


def test_console_script_entry_point_runs():
  result = subprocess.run(
      [sys.executable, "-m", "sophia_lambda_jax.cli", "--help"],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "slj compare" in result.stdout


def test_info_prints_parameter_count_and_layer_table(capsys):
  from sophia_lambda_jax.models import qwen

  assert cli.main(["info", "--model", "qwen-tiny"]) == 0
  out = capsys.readouterr().out
  assert f"{qwen.count_params(qwen.get_config('qwen-tiny')):,}" in out
  assert "layers/1/attn/q_proj/kernel" in out


def test_info_rejects_unknown_model(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["info", "--model", "gpt-9"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "unknown model 'gpt-9'" in err and "qwen-134m" in err and "Traceback" not in err
