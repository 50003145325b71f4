"""Every code block of the README, docs/ and notebooks/README.md runs as printed.

Blocks are fenced with their language: `python` blocks are executed, `sh` blocks run their
commands (`slj ...` through `cli.main`, `python -m MODULE ...` as `__main__`), `text` blocks
are output and equations. The blocks of a page run in order, in one namespace and one
working directory, so a later block uses what an earlier one wrote (runs/demo). An HTML
comment on the line before a block can say:

    <!-- toy: OLD => NEW; OLD2 => NEW2 -->   run it with these substitutions (toy sizes)
    <!-- plan-only: WHY -->                  run each command with --list (its plan)
    <!-- not-run: WHY -->                    a GPU, several hosts, FineWeb, a download ...

The README's quickstart must train (the loss falls) and the examples of docs/flax-model.md
must train and print the table shown there.
"""

from __future__ import annotations

import math
import pathlib
import re
import runpy
import shlex
import sys
from typing import NamedTuple

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
         REPO / "notebooks" / "README.md"]
LANGUAGES = ("python", "sh", "text")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!-- (toy|plan-only|not-run): (.*?) -->", re.S)


class Block(NamedTuple):
  page: pathlib.Path
  line: int
  language: str
  code: str
  marker: tuple[str, str] | None  # (kind, text)

  def where(self) -> str:
    return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: pathlib.Path) -> list[Block]:
  text = page.read_text()
  found = []
  for match in FENCE.finditer(text):  # a marker may span lines, up to the fence
    line = text.count("\n", 0, match.start()) + 1
    before = text[:match.start()].rstrip("\n")
    marker = MARKER.fullmatch(before[before.rfind("<!--"):]) if before.endswith("-->") \
        else None
    found.append(Block(page, line, match.group(1).strip(), match.group(2),
                       (marker[1], " ".join(marker[2].split())) if marker else None))
  return found


def _indented_code_lines(page: pathlib.Path) -> list[int]:
  """Lines that Markdown reads as an indented code block: 4 spaces after a blank line,
  outside fences and lists."""
  lines, inside, found = page.read_text().split("\n"), False, []
  for number, line in enumerate(lines, 1):
    if line.startswith("```"):
      inside = not inside
    elif (not inside and line.startswith("    ") and number > 1 and not lines[number - 2]
          and not re.match(r"\s*([-*]|\d+\.) ", line)):
      found.append(number)
  return found


def test_every_block_is_fenced_with_its_language_and_marked_with_a_reason():
  for page in PAGES:
    assert not _indented_code_lines(page), (page, _indented_code_lines(page))
    for block in blocks(page):
      assert block.language in LANGUAGES, f"{block.where()}: fence it as {LANGUAGES}"
      if block.marker is not None:
        kind, text = block.marker
        assert block.language != "text", f"{block.where()}: a text block never runs"
        assert text.strip(), f"{block.where()}: {kind} needs its reason or substitutions"
  found = [b for p in PAGES for b in blocks(p)]  # the parser sees every kind of block
  assert {b.marker[0] for b in found if b.marker} == {"toy", "plan-only", "not-run"}
  assert {b.language for b in found} == set(LANGUAGES)


def _substituted(block: Block) -> str:
  kind, text = block.marker or (None, "")
  code = block.code
  if kind == "toy":
    for pair in text.split(";"):
      old, new = (part.strip() for part in pair.split("=>"))
      assert old in code, f"{block.where()}: toy substitution {old!r} is not in the block"
      code = code.replace(old, new)
  return code


def _commands(code: str) -> list[list[str]]:
  joined = code.replace("\\\n", " ")
  return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def _run_command(argv: list[str], block: Block, monkeypatch) -> None:
  from sophia_lambda_jax import cli

  if argv[0] == "slj":
    assert cli.main(argv[1:]) == 0, f"{block.where()}: {shlex.join(argv)}"
  elif argv[:2] == ["python", "-m"]:
    monkeypatch.setattr(sys, "argv", [argv[2], *argv[3:]])
    try:
      runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    except SystemExit as e:
      assert e.code in (None, 0), f"{block.where()}: {shlex.join(argv)} exited {e.code}"
  else:
    pytest.fail(f"{block.where()}: cannot run {argv[0]!r}; mark the block not-run with why")


def run_page(page: pathlib.Path, workdir: pathlib.Path, monkeypatch) -> dict:
  """Runs the page's blocks in order in `workdir`; returns the Python namespace."""
  monkeypatch.chdir(workdir)
  namespace: dict = {"__name__": "__main__"}
  for block in blocks(page):
    kind = block.marker[0] if block.marker else None
    if block.language == "text" or kind == "not-run":
      continue
    code = _substituted(block)
    if block.language == "python":
      exec(compile(code, block.where(), "exec"), namespace)  # our own docs
      continue
    for argv in _commands(code):
      _run_command(argv + ["--list"] if kind == "plan-only" else argv, block, monkeypatch)
  return namespace


def _check_readme(namespace, out):
  loss = float(namespace["loss"])
  assert math.isfinite(loss) and loss < 0.5 * math.log(256)
  assert "step 200: loss" in out


def _check_flax_model(namespace, out):
  """The nnx.Optimizer, linen TrainState and optax.MultiSteps examples train and print the
  table shown."""
  page = (REPO / "docs" / "flax-model.md").read_text()
  shown = re.search(r"```text\n(\d+ leaves.*?)```", page, re.S).group(1)
  printed = out.splitlines()
  for line in shown.splitlines():
    if line != "...":
      assert line in printed, line
  losses = dict(re.findall(r"^(nnx|linen|MultiSteps).*: loss ([\d.]+)$", out, re.M))
  assert set(losses) == {"nnx", "linen", "MultiSteps"}, out
  for name, loss in losses.items():
    assert float(loss) < 0.9 * math.log(32), (name, loss)


def _check_run_to_model(namespace, out):
  assert "dict_keys(['embed', 'final_norm', 'layers'])" in out  # the orbax snippet
  assert "from the weights of hf/demo" in out  # the run continued from the export


CHECKS = {"README.md": _check_readme, "flax-model.md": _check_flax_model,
          "run-to-model.md": _check_run_to_model}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_block_of_the_page_runs(page, tmp_path, monkeypatch, capsys):
  namespace = run_page(page, tmp_path, monkeypatch)
  captured = capsys.readouterr()
  check = CHECKS.get(page.name if page.parent.name != "notebooks" else "")
  if check is not None:
    check(namespace, captured.out + captured.err)
