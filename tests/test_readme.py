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
