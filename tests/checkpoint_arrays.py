"""`restore_arrays`: a checkpoint's every array by name, for tests that compare final states."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


def restore_arrays(directory, step: int | None = None) -> dict[str, np.ndarray]:
  """The flat {key: numpy array} of checkpoint `step` (default: the newest) in `directory`:
  the `state` item's keys, and each parameter as "params/<path>" (none in a checkpoint of
  the old layout, whose `state` holds the parameters)."""
  directory = Path(directory).absolute()
  if step is None:
    step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  step_dir = directory / str(step)
  restore = ocp.StandardCheckpointer().restore
  flat = dict(restore(step_dir / "state"))
  if (step_dir / "params").is_dir():
    for path, leaf in jax.tree_util.tree_flatten_with_path(restore(step_dir / "params"))[0]:
      flat["params/" + "/".join(str(k.key) for k in path)] = leaf
  return {k: np.asarray(v) for k, v in flat.items()}
