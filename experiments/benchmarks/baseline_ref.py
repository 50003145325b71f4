"""A temporary checkout of another commit, for benchmarks that measure the library there.

    with checkout("HEAD~1") as (path, commit):
      subprocess.run([...], env=env_with_root(path))   # imports that commit's library

The checkout is a detached git worktree of this repository in a temporary directory,
removed on exit (also on error). A benchmark runs its own file (this tree's) with
PYTHONPATH set to the checkout, so `sophia_lambda_jax` and `experiments` come from there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def checkout(ref: str):
  """(path, full commit hash) of a temporary git worktree of `ref`, removed on exit."""
  found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True)
  if found.returncode != 0:
    raise ValueError(f"--baseline-ref: {ref!r} is not a commit of {ROOT}")
  commit = found.stdout.strip()
  with tempfile.TemporaryDirectory(prefix="slj-ref-") as parent:
    path = Path(parent) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                   check=True, capture_output=True)
    try:
      yield path, commit
    finally:
      subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                     capture_output=True)


def env_with_root(root: Path, env: dict | None = None) -> dict:
  """`env` (default os.environ) with `root` first on PYTHONPATH."""
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
  return env
