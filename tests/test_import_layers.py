"""The package's import layers: each file imports only from its own layer and the ones below,
and no files import each other in a circle.

Layers, lowest first: core (the optimizer library) <- data <- models <- train <- runs <-
compare <- cli <- the top-level `__init__.py`, which no package module imports. Every import
statement counts, at module level or inside a function: `import P.m` and `from P.m import x`
are arrows to P/m.py; `from P import m` with m a module is an arrow to P/m.py, and a name
taken from P/__init__.py an arrow to that file; relative imports and
`importlib.import_module` with a literal name resolve the same way. A module name built at run
time cannot be read (only the top-level `__init__.py` builds one, and nothing sits above it).
Within a layer files may import each other, without a cycle.
"""

from __future__ import annotations

import ast
import pathlib
from typing import NamedTuple, Sequence

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sophia_lambda_jax"

# Lowest first: (layer, its files and folders relative to the package).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("hessian.py", "labels.py", "transforms.py", "optimizers.py",
              "directory_lock.py", "interrupts.py")),
    ("data", ("data",)),
    ("models", ("models",)),
    ("train", ("train",)),
    ("runs", ("runs.py",)),
    ("compare", ("compare",)),
    ("cli", ("cli.py",)),
    ("package", ("__init__.py",)),
)


class Arrow(NamedTuple):
  """`source` imports `target` at `line` (paths relative to the package, with / separators)."""
  source: str
  target: str
  line: int


def _module_file(root: pathlib.Path, parts: Sequence[str]) -> pathlib.Path | None:
  """The file of module `root.<parts>`: a .py file or a package's __init__.py."""
  as_file = root.joinpath(*parts).with_suffix(".py") if parts else None
  if as_file is not None and as_file.is_file():
    return as_file
  init = root.joinpath(*parts, "__init__.py")
  return init if init.is_file() else None


def _imported_files(root: pathlib.Path, package: list[str], node: ast.AST) -> list[pathlib.Path]:
  """The package files that the import `node` (in a file of package `package`) reads."""
  name = root.name

  def absolute(dotted: str, level: int) -> list[str] | None:
    """Parts below the root of the module `dotted` (relative at `level`), or None outside."""
    if level:
      if level - 1 > len(package):
        return None
      base = package[:len(package) - (level - 1)]
      return base + (dotted.split(".") if dotted else [])
    head, *rest = dotted.split(".")
    return rest if head == name else None

  targets = []
  if isinstance(node, ast.Import):
    for alias in node.names:
      parts = absolute(alias.name, 0)
      if parts is not None:
        targets.append(_module_file(root, parts))
  elif isinstance(node, ast.ImportFrom):
    parts = absolute(node.module or "", node.level)
    if parts is not None:
      for alias in node.names:
        submodule = _module_file(root, parts + [alias.name]) if alias.name != "*" else None
        targets.append(submodule or _module_file(root, parts))
  elif (isinstance(node, ast.Call) and node.args
        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
        and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
             or (isinstance(node.func, ast.Name) and node.func.id == "import_module"))):
    dotted = node.args[0].value
    level = len(dotted) - len(dotted.lstrip("."))
    parts = absolute(dotted[level:], level)
    if parts is not None:
      targets.append(_module_file(root, parts))
  return [t for t in targets if t is not None]


def import_arrows(root: pathlib.Path) -> list[Arrow]:
  """Every arrow between the files of the package at `root`, under the rule above."""
  arrows = []
  for path in sorted(root.rglob("*.py")):
    relative = path.relative_to(root)
    package = list(relative.parts[:-1])
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      for target in _imported_files(root, package, node):
        if target != path:
          arrows.append(Arrow(relative.as_posix(), target.relative_to(root).as_posix(),
                              node.lineno))
  return arrows


def layer_of(file: str, layers=LAYERS) -> int | None:
  """Index in `layers` of the layer holding `file` (a path relative to the package)."""
  for index, (_, members) in enumerate(layers):
    if any(file == m or file.startswith(m + "/") for m in members):
      return index
  return None


def _cycles(arrows: Sequence[Arrow]) -> list[list[str]]:
  """One cycle (first file repeated at the end) per strongly connected group of files."""
  graph: dict[str, set[str]] = {}
  for a in arrows:
    graph.setdefault(a.source, set()).add(a.target)
    graph.setdefault(a.target, set())
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  groups: list[set[str]] = []

  def visit(node: str) -> None:  # Tarjan's algorithm
    index[node] = low[node] = len(index)
    stack.append(node)
    for nxt in sorted(graph[node]):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      group = set()
      while True:
        member = stack.pop()
        group.add(member)
        if member == node:
          break
      if len(group) > 1:
        groups.append(group)

  for node in sorted(graph):
    if node not in index:
      visit(node)
  cycles = []
  for group in groups:  # the shortest way from the group's first file back to itself
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    cycle = None
    while cycle is None:
      next_frontier = []
      for node in frontier:
        for nxt in sorted(graph[node] & group):
          if nxt == start:
            cycle = paths[node] + [start]
            break
          if nxt not in paths:
            paths[nxt] = paths[node] + [nxt]
            next_frontier.append(nxt)
        if cycle:
          break
      frontier = next_frontier
    cycles.append(cycle)
  return sorted(cycles)


def layer_violations(root: pathlib.Path, layers=LAYERS) -> list[str]:
  """One line per file in no layer, per arrow to a higher layer and per import cycle."""
  arrows = import_arrows(root)
  names = [name for name, _ in layers]
  problems = [f"{path.relative_to(root).as_posix()}: in no layer; add it to LAYERS"
              for path in sorted(root.rglob("*.py"))
              if layer_of(path.relative_to(root).as_posix(), layers) is None]
  for a in arrows:
    source, target = layer_of(a.source, layers), layer_of(a.target, layers)
    if source is not None and target is not None and target > source:
      problems.append(f"{a.source}:{a.line} imports {a.target}: layer {names[source]!r} may "
                      f"not import from {names[target]!r}, which is above it")
  problems += ["import cycle: " + " -> ".join(cycle) for cycle in _cycles(arrows)]
  return problems


def test_package_follows_its_layers():
  problems = layer_violations(PACKAGE)
  assert not problems, "\n".join(problems)


def test_every_layer_names_existing_files():
  for name, members in LAYERS:
    for member in members:
      assert (PACKAGE / member).exists(), f"layer {name!r}: {member} does not exist"


# --- the checker on synthetic packages --------------------------------------------------------

TOY_LAYERS = (("low", ("low.py", "util.py")), ("high", ("high",)), ("top", ("__init__.py",)))


def _package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  package = root / "toy"
  base = {"__init__.py": "", "low.py": "", "util.py": "", "high/__init__.py": "",
          "high/a.py": "", "high/b.py": ""}
  for name, text in {**base, **files}.items():
    (package / name).parent.mkdir(parents=True, exist_ok=True)
    (package / name).write_text(text)
  return package


def test_arrows_follow_the_rule(tmp_path):
  package = _package(tmp_path, {
      "__init__.py": "import importlib\nimportlib.import_module('.low', __name__)\n",
      "low.py": "import os\nfrom toy import util\n",
      "high/__init__.py": "from toy.high.a import thing\n",
      "high/a.py": ("def f():\n  from .. import low, util\n  from . import b\n"
                    "  from toy.high import b as again\n"),
      "high/b.py": "import toy.low\nfrom toy.high import thing\nfrom ..util import *\n",
  })
  arrows = {(a.source, a.target) for a in import_arrows(package)}
  assert arrows == {
      ("__init__.py", "low.py"),
      ("low.py", "util.py"),                     # from P import m, m a module
      ("high/__init__.py", "high/a.py"),
      ("high/a.py", "low.py"), ("high/a.py", "util.py"),   # relative, inside a function
      ("high/a.py", "high/b.py"),
      ("high/b.py", "low.py"),
      ("high/b.py", "high/__init__.py"),         # a name taken from P/__init__.py
      ("high/b.py", "util.py"),
  }
  # high/__init__ -> a -> b -> high/__init__ is a cycle; everything else points down.
  assert layer_violations(package, TOY_LAYERS) == [
      "import cycle: high/__init__.py -> high/a.py -> high/b.py -> high/__init__.py"]


def test_a_clean_package_passes(tmp_path):
  package = _package(tmp_path, {
      "__init__.py": "from toy import high\n",
      "low.py": "from . import util\n",
      "high/a.py": "from toy import low\nfrom toy.high import b\n",
  })
  assert layer_violations(package, TOY_LAYERS) == []


def test_an_upward_import_inside_a_function_fails(tmp_path):
  package = _package(tmp_path, {"low.py": "\n\ndef f():\n  from toy.high.a import g\n"})
  assert layer_violations(package, TOY_LAYERS) == [
      "low.py:4 imports high/a.py: layer 'low' may not import from 'high', which is above it"]


def test_importing_the_top_level_package_fails(tmp_path):
  package = _package(tmp_path, {"high/b.py": "import toy\n"})
  assert layer_violations(package, TOY_LAYERS) == [
      "high/b.py:1 imports __init__.py: layer 'high' may not import from 'top', which is "
      "above it"]


def test_a_cycle_within_a_layer_fails(tmp_path):
  package = _package(tmp_path, {"low.py": "from toy.util import x\n",
                                "util.py": "import toy.low\n"})
  assert layer_violations(package, TOY_LAYERS) == ["import cycle: low.py -> util.py -> low.py"]


def test_a_file_in_no_layer_fails(tmp_path):
  package = _package(tmp_path, {"stray.py": ""})
  assert layer_violations(package, TOY_LAYERS) == ["stray.py: in no layer; add it to LAYERS"]
