"""Every notebook in `notebooks/` is stored with the outputs of its current code, and runs
top to bottom as a reader would.

The stored outputs come from `python -m experiments.run_notebooks`, which records a hash of
the code cells it ran; a notebook whose code changed since is stale. Execution here uses the
same runner on a copy in the test's temporary directory: the stored files are never written.
Each notebook runs in a fresh ipykernel on the interpreter running the tests, with
`notebooks/` as its working directory; a cell that raises, or runs past `CELL_TIMEOUT_S`,
fails the test with the cell's traceback.
"""

from __future__ import annotations

import pathlib
import shutil
import time

import nbformat
import pytest

from experiments import run_notebooks
from experiments.run_notebooks import NOTEBOOK_DIR

EXPECTED_NOTEBOOKS = (
    "01_optimizers_on_toy_problems.ipynb",
    "02_optax_chain_anatomy.ipynb",
    "03_reading_a_compare_run.ipynb",
    "04_sophia_lambda_on_your_flax_model.ipynb",
)
REGENERATE = "python -m experiments.run_notebooks"


def _notebook_path(name: str) -> pathlib.Path:
  path = NOTEBOOK_DIR / name
  if not path.is_file():
    raise FileNotFoundError(f"notebook {path} is missing")
  return path


def test_every_notebook_is_listed_here():
  """A notebook added to notebooks/ must be added to EXPECTED_NOTEBOOKS to be executed."""
  found = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
  assert found == sorted(EXPECTED_NOTEBOOKS)
  assert [p.name for p in run_notebooks.notebook_paths()] == found


@pytest.mark.parametrize("name", EXPECTED_NOTEBOOKS)
def test_notebook_is_stored_with_the_outputs_of_its_code(name):
  path = _notebook_path(name)
  assert path.stat().st_size < run_notebooks.MAX_NOTEBOOK_BYTES, (
      f"{name} is {path.stat().st_size:,} bytes; keep it under "
      f"{run_notebooks.MAX_NOTEBOOK_BYTES:,} (smaller figures)")
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert code_cells, f"{name} has no code cells"
  assert any(c.cell_type == "markdown" for c in nb.cells), f"{name} has no explanatory text"
  assert nb.metadata.get(run_notebooks.CODE_HASH_KEY) == run_notebooks.code_hash(nb), (
      f"{name}: its code changed since its outputs were stored; run `{REGENERATE} {name}`")
  counts = [c.execution_count for c in code_cells]
  assert counts == list(range(1, len(code_cells) + 1)), (
      f"{name}: cells were not run top to bottom in one kernel (execution counts {counts}); "
      f"run `{REGENERATE} {name}`")
  assert not [o for c in code_cells for o in c.outputs if o.output_type == "error"]


def _execute(name: str, tmp_path: pathlib.Path, **env_overrides: str) -> nbformat.NotebookNode:
  """Runs a copy of notebook `name`; raises CellExecutionError on a cell error."""
  stored = _notebook_path(name)
  before = stored.read_bytes()
  copy = tmp_path / f"copy-{time.monotonic_ns()}-{name}"
  shutil.copyfile(stored, copy)
  start = time.perf_counter()
  nb = run_notebooks.execute(copy, tmp_path, **env_overrides)
  print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
  assert stored.read_bytes() == before, f"executing {name} rewrote the stored notebook"
  # Every code cell ran and none produced an error output (nbclient raises on the first
  # error already; this guards against a cell being skipped or an error being swallowed).
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code_cells)
  assert not [o for c in code_cells for o in c.outputs if o.output_type == "error"]
  return nb


def _files_under(root: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


COMPARE_NOTEBOOK = "03_reading_a_compare_run.ipynb"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in EXPECTED_NOTEBOOKS if n != COMPARE_NOTEBOOK])
def test_notebook_runs_top_to_bottom(name, tmp_path):
  _execute(name, tmp_path)


@pytest.mark.slow
def test_compare_notebook_runs_then_reads_an_existing_run(tmp_path):
  """Notebook 3 top to bottom twice: first it makes its own tiny compare run (under
  tmp_path, the kernel's TMPDIR); then, pointed at that run through SLJ_COMPARE_RUN_DIR, it
  must read it and train or write nothing."""
  name = COMPARE_NOTEBOOK
  _execute(name, tmp_path)
  runs = sorted(tmp_path.glob("slj-notebook-03-*/compare"))
  assert len(runs) == 1 and (runs[0] / "plan.json").is_file(), runs
  before = _files_under(runs[0])
  nb = _execute(name, tmp_path, SLJ_COMPARE_RUN_DIR=str(runs[0]))
  assert _files_under(runs[0]) == before
  assert len(list(tmp_path.glob("slj-notebook-03-*"))) == 1
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert str(runs[0]) in text
