"""The package's face: `sophia_lambda_jax/__init__.py` imports the optimizer API by name and
lists it in `__all__` (read from the file, as editors and type checkers read it), importing
it pulls in nothing of the `train` extra, and the wheel ships `py.typed`."""

import ast
import pathlib
import shutil
import subprocess
import sys
import zipfile

import sophia_lambda_jax as slj
from sophia_lambda_jax import optimizers

REPO = pathlib.Path(__file__).resolve().parents[1]
INIT = REPO / "sophia_lambda_jax" / "__init__.py"
CORE_MODULES = {"transforms", "optimizers", "hessian", "labels"}


def _init_tree():
  return ast.parse(INIT.read_text(), filename=str(INIT))


def _all_names(tree) -> list[str]:
  (value,) = [node.value for node in tree.body if isinstance(node, ast.Assign)
              and [getattr(t, "id", None) for t in node.targets] == ["__all__"]]
  return ast.literal_eval(value)


def test_the_optimizer_api_is_imported_by_name_and_listed_in_all():
  tree = _init_tree()
  imported = {}
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sophia_lambda_jax"):
      for alias in node.names:
        imported[alias.asname or alias.name] = node.module
  from_optimizers = {n for n, m in imported.items() if m == "sophia_lambda_jax.optimizers"}
  assert from_optimizers == set(optimizers.__all__)  # every factory, the registry, readers
  assert {n for n, m in imported.items() if m == "sophia_lambda_jax"} == CORE_MODULES
  names = _all_names(tree)
  assert len(names) == len(set(names)) and set(names) == set(imported)
  assert names[:len(slj.OPTIMIZERS)] == list(slj.OPTIMIZERS)  # the registry's order
  for name in names:
    assert getattr(slj, name) is getattr(optimizers, name, None) or name in CORE_MODULES


def test_import_pulls_in_no_part_of_the_train_extra():
  code = ("import sys, sophia_lambda_jax as slj; slj.sophia_lambda, slj.labels.describe; "
          "bad = sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'orbax', 'torch', "
          "'transformers', 'tiktoken', 'safetensors', 'pyarrow', 'matplotlib'}); "
          "assert not bad, bad; "
          "assert 'sophia_lambda_jax.models' not in sys.modules; "
          "import sophia_lambda_jax.models; assert slj.models is sys.modules["
          "'sophia_lambda_jax.models']")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


def test_the_wheel_ships_py_typed_and_the_export_tokenizer(tmp_path):
  """Built offline from a copy of the sources (the checkout stays clean)."""
  source = tmp_path / "src"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  shutil.copytree(REPO / "sophia_lambda_jax", source / "sophia_lambda_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--no-index", "--quiet", "-w", str(tmp_path / "dist"), str(source)],
                 check=True, timeout=300)
  (wheel,) = (tmp_path / "dist").glob("sophia_lambda_jax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  assert "sophia_lambda_jax/py.typed" in names
  assert "sophia_lambda_jax/models/tokenization_compact_qwen2.py" in names
  assert "sophia_lambda_jax/__init__.py" in names
