"""Execute the notebooks in `notebooks/` and store them with their outputs.

    python -m experiments.run_notebooks [NAME.ipynb ...]

Every `notebooks/*.ipynb` (or the ones named) runs top to bottom in a fresh ipykernel on
this interpreter, with `notebooks/` as its working directory, and is written back in place
with its outputs, so a code host shows the figures. A cell that raises stops the command
with exit status 1 and leaves that notebook's file untouched. The notebook's metadata records
a hash of its code cells (`CODE_HASH_KEY`); tests/test_notebooks.py checks it, so a code
change without a rerun of this command fails the suite.

`execute` is also what tests/test_notebooks.py runs, on copies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
# Generous next to what a whole notebook takes on 2 cores: it only has to catch a hang (see
# docs/decisions.md, 2026-11-23: the notebooks' cell timeout).
CELL_TIMEOUT_S = 300
# A stored notebook (figures included) stays readable on a code host below this size.
MAX_NOTEBOOK_BYTES = 1_000_000
# Figures are stored at this resolution (matplotlib's default is 100 dpi), which keeps the
# notebooks with the most figures under MAX_NOTEBOOK_BYTES.
FIGURE_DPI = 60
KERNEL_NAME = "slj-notebook"
CODE_HASH_KEY = "slj_code_sha256"
# Variables that would point a notebook at state outside the run (notebook 3 reads an
# existing run directory when this is set; a stored notebook makes its own).
_ENV_TO_DROP = ("SLJ_COMPARE_RUN_DIR",)
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def notebook_paths(names: list[str] | None = None) -> list[pathlib.Path]:
  """notebooks/NAME for each name, or every notebooks/*.ipynb; a missing one is an error."""
  if not names:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))
  paths = [NOTEBOOK_DIR / pathlib.Path(n).name for n in names]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"no such notebook(s): {', '.join(missing)}")
  return paths


def code_hash(nb) -> str:
  """sha256 of the notebook's code cells, in order: what its stored outputs came from."""
  h = hashlib.sha256()
  for cell in nb.cells:
    if cell.cell_type == "code":
      h.update(cell.source.encode() + b"\0")
  return h.hexdigest()


def kernel_env(tmp_dir: pathlib.Path) -> dict[str, str]:
  """This process's environment, minus what a reader's Jupyter would not have.

  The test suite simulates 8 CPU devices (conftest.py); a reader running a notebook has one,
  so the flag is dropped. Temporary files a notebook makes (notebook 3's tiny compare run)
  go under `tmp_dir`, and so does the matplotlibrc that sets `FIGURE_DPI`.
  """
  env = {k: v for k, v in os.environ.items() if k not in _ENV_TO_DROP}
  env["TMPDIR"] = str(tmp_dir)
  rc = pathlib.Path(tmp_dir) / "matplotlibrc"
  rc.write_text(f"figure.dpi: {FIGURE_DPI}\n")
  env["MATPLOTLIBRC"] = str(rc)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  return env


def _kernel_manager(kernel_dir: pathlib.Path):
  """A kernel manager whose only kernel is ipykernel on this very interpreter.

  The installed "python3" kernelspec may name a bare `python`, which could resolve to another
  environment; a private spec with `sys.executable` removes the doubt.
  """
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager

  spec_dir = kernel_dir / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "sophia-lambda-jax",
      "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  specs = KernelSpecManager(kernel_dirs=[str(kernel_dir / "kernels")])
  return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def execute(path: pathlib.Path, tmp_dir: pathlib.Path, **env_overrides: str):
  """Runs the notebook at `path` (read, never written) in a fresh kernel whose working
  directory is notebooks/; returns the executed notebook. A cell error raises nbclient's
  CellExecutionError with the cell's traceback."""
  import nbformat
  from jupyter_core.utils import run_sync
  from nbclient import NotebookClient

  nb = nbformat.read(path, as_version=4)
  kernelspec = nb.metadata.get("kernelspec")
  kernel_dir = pathlib.Path(tempfile.mkdtemp(prefix="kernel-", dir=tmp_dir))
  km = _kernel_manager(kernel_dir)
  client = NotebookClient(
      nb,
      km=km,
      timeout=CELL_TIMEOUT_S,
      allow_errors=False,
      record_timing=False,
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  try:
    client.execute(env={**kernel_env(tmp_dir), **env_overrides})
  finally:  # nbclient leaves a kernel it was handed running; end it with the notebook
    if km.has_kernel:
      run_sync(km.shutdown_kernel)(now=True)
  if kernelspec is not None:  # keep the reader's kernel name, not this private one
    nb.metadata["kernelspec"] = kernelspec
  nb.metadata[CODE_HASH_KEY] = code_hash(nb)
  return nb


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.run_notebooks",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("names", nargs="*", help="notebook file names (default: every notebook)")
  args = p.parse_args(argv)
  import nbformat

  try:
    paths = notebook_paths(args.names)
  except FileNotFoundError as e:
    print(f"run_notebooks: {e}", file=sys.stderr)
    return 2
  for path in paths:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slj-run-notebooks-") as tmp:
      try:
        nb = execute(path, pathlib.Path(tmp))
      except Exception as e:  # nbclient's CellExecutionError carries the cell's traceback
        print(f"run_notebooks: {path.name} failed, file left as it was:\n{e}", file=sys.stderr)
        return 1
    text = nbformat.writes(nb) + "\n"
    path.write_text(text, encoding="utf-8")
    size = len(text.encode())
    print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s, {size / 1e3:.0f} kB")
    if size > MAX_NOTEBOOK_BYTES:
      print(f"run_notebooks: {path.name} is {size:,} bytes with its outputs, over "
            f"{MAX_NOTEBOOK_BYTES:,}: make its figures smaller", file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
