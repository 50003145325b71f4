"""The README's quickstart and the examples of docs/flax-model.md run as written and train."""

import math
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FLAX_MODEL = REPO / "docs" / "flax-model.md"


def test_quickstart_runs_and_the_loss_falls(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "README.md has no python quickstart block"
  namespace = {}
  exec(compile(blocks[0], str(README), "exec"), namespace)  # our own README
  loss = float(namespace["loss"])
  assert math.isfinite(loss) and loss < 0.5 * math.log(256)
  assert "step 200: loss" in capsys.readouterr().out


def test_flax_model_examples_run_and_train(capsys):
  """The nnx.Optimizer, linen TrainState and optax.MultiSteps examples of "Your own Flax
  model" (docs/flax-model.md) run as written (in order, one namespace), train, and print the
  table shown."""
  page = FLAX_MODEL.read_text()
  blocks = re.findall(r"```python\n(.*?)```", page, re.S)
  assert len(blocks) == 4, "describe, nnx.Optimizer, TrainState and MultiSteps examples"
  namespace = {}
  for block in blocks:
    exec(compile(block, str(FLAX_MODEL), "exec"), namespace)  # our own docs
  out = capsys.readouterr().out
  shown = re.search(r"```text\n(\d+ leaves.*?)```", page, re.S).group(1)
  printed = out.splitlines()
  for line in shown.splitlines():
    if line != "...":
      assert line in printed, line
  losses = dict(re.findall(r"^(nnx|linen|MultiSteps).*: loss ([\d.]+)$", out, re.M))
  assert set(losses) == {"nnx", "linen", "MultiSteps"}, out
  for name, loss in losses.items():
    assert float(loss) < 0.9 * math.log(32), (name, loss)
