"""The README's quickstart runs as written and trains."""

import math
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_the_loss_falls(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "README.md has no python quickstart block"
  namespace = {}
  exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
  loss = float(namespace["loss"])
  assert math.isfinite(loss) and loss < 0.5 * math.log(256)
  assert "step 200: loss" in capsys.readouterr().out


def test_flax_model_examples_run_and_train(capsys):
  """The nnx.Optimizer, linen TrainState and optax.MultiSteps examples of "Your own Flax
  model" run as written (in order, one namespace), train, and print the table shown."""
  section = README.read_text().split("\n## Your own Flax model\n", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 4, "describe, nnx.Optimizer, TrainState and MultiSteps examples"
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
  out = capsys.readouterr().out
  shown = re.search(r"```text\n(\d+ leaves.*?)```", section, re.S).group(1)
  printed = out.splitlines()
  for line in shown.splitlines():
    if line != "...":
      assert line in printed, line
  losses = dict(re.findall(r"^(nnx|linen|MultiSteps).*: loss ([\d.]+)$", out, re.M))
  assert set(losses) == {"nnx", "linen", "MultiSteps"}, out
  for name, loss in losses.items():
    assert float(loss) < 0.9 * math.log(32), (name, loss)
