"""Execute every notebook in `notebooks/` top to bottom, as a reader would.

Each notebook runs in a fresh ipykernel started with the interpreter running the tests, with
`notebooks/` as its working directory (so relative paths resolve as they do in Jupyter). A
cell that raises fails the test with the cell's traceback; a cell that runs past
`CELL_TIMEOUT_S` fails it too. Notebooks are committed without outputs, which is checked
before anything runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED_NOTEBOOKS = (
    "01_optimizers_on_toy_problems.ipynb",
    "02_optax_chain_anatomy.ipynb",
    "03_reading_a_compare_run.ipynb",
    "04_sophia_lambda_on_your_flax_model.ipynb",
)
# Generous next to the < 60 s a whole notebook takes on 2 cores: it only has to catch a hang.
CELL_TIMEOUT_S = 300
KERNEL_NAME = "slj-notebook-test"
# Variables that would point a notebook at state outside the test (notebook 3 reads an
# existing run directory when this is set; the test wants it to make its own).
_ENV_TO_DROP = ("SLJ_COMPARE_RUN_DIR",)
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _kernel_env(tmp_path: pathlib.Path) -> dict[str, str]:
  """The test process's environment, minus what a reader's Jupyter would not have.

  conftest.py simulates 8 CPU devices for the library tests; a reader running the notebook
  has one, so the flag is dropped and the notebooks run the way they do in Jupyter.
  Temporary files a notebook makes (notebook 3's tiny compare run) go under `tmp_path`.
  """
  env = {k: v for k, v in os.environ.items() if k not in _ENV_TO_DROP}
  env["TMPDIR"] = str(tmp_path)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  return env


def _kernel_manager(tmp_path: pathlib.Path) -> AsyncKernelManager:
  """A kernel manager whose only kernel is ipykernel on this very interpreter.

  The installed "python3" kernelspec may name a bare `python`, which could resolve to another
  environment; a private spec with `sys.executable` removes the doubt.
  """
  spec_dir = tmp_path / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "sophia-lambda-jax tests",
      "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _notebook_path(name: str) -> pathlib.Path:
  path = NOTEBOOK_DIR / name
  if not path.is_file():
    raise FileNotFoundError(f"notebook {path} is missing")
  return path


def test_every_notebook_is_listed_here():
  """A notebook added to notebooks/ must be added to EXPECTED_NOTEBOOKS to be executed."""
  found = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
  assert found == sorted(EXPECTED_NOTEBOOKS)


@pytest.mark.parametrize("name", EXPECTED_NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
  nb = nbformat.read(_notebook_path(name), as_version=4)
  nbformat.validate(nb)
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert code_cells, f"{name} has no code cells"
  dirty = [i for i, c in enumerate(nb.cells)
           if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
  assert not dirty, f"{name}: cells {dirty} carry outputs; clear them before committing"
  assert any(c.cell_type == "markdown" for c in nb.cells), f"{name} has no explanatory text"


def _execute(name: str, tmp_path: pathlib.Path, **env_overrides: str) -> nbformat.NotebookNode:
  """Runs notebook `name` in a fresh kernel; raises CellExecutionError on a cell error."""
  nb = nbformat.read(_notebook_path(name), as_version=4)
  kernel_dir = tmp_path / f"kernel-{time.monotonic_ns()}"
  client = NotebookClient(
      nb,
      km=_kernel_manager(kernel_dir),
      timeout=CELL_TIMEOUT_S,
      allow_errors=False,
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  start = time.perf_counter()
  client.execute(env={**_kernel_env(tmp_path), **env_overrides})
  print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
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
