"""Checkpoints with orbax's CheckpointManager: save, find the newest complete one, restore.

A checkpoint at step s holds (items of one orbax step directory `<out>/checkpoints/<s>`):

- `state`: the TrainState after s optimizer steps (params, optimizer state, step, RNG), as a
  flat dict of arrays keyed "<index>.<key path>" (flat keys keep orbax away from integer
  dict keys and empty optax states; the index keeps the order, the path keeps it readable);
- `config`: the full TrainConfig of the run (JSON);
- `meta`: the data position (the next batch index, = s) and the key path list, JSON.

Saving is asynchronous: `save` returns once the arrays are copied off the devices and
writes in a background thread. Orbax writes into a temporary directory and renames it when
complete, so a process killed mid-write leaves no directory that `latest_step` would
return: the newest complete checkpoint is always the one restored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sophia_lambda_jax.train.config import RESUME_MUST_MATCH

_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


def _flat_keys(tree: Any) -> list[str]:
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(tree)[0]]
  return [f"{i:05d}.{_UNSAFE.sub('_', p).strip('_')}" for i, p in enumerate(paths)]


def flatten_state(tree: Any) -> dict[str, Any]:
  """Pytree -> {"<index>.<path>": leaf} (the on-disk layout of `state`)."""
  return dict(zip(_flat_keys(tree), jax.tree.leaves(tree)))


def unflatten_state(like: Any, flat: dict[str, Any]) -> Any:
  """Inverse of `flatten_state` given a pytree with the target structure."""
  keys = _flat_keys(like)
  if sorted(keys) != sorted(flat):
    missing = sorted(set(keys) - set(flat))[:5]
    extra = sorted(set(flat) - set(keys))[:5]
    raise ValueError(f"checkpoint state does not match this run's state structure "
                     f"(missing {missing}, unexpected {extra})")
  return jax.tree.unflatten(jax.tree.structure(like), [flat[k] for k in keys])


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Human-readable list of trajectory-changing fields that differ between two configs."""
  diffs = []
  for name in RESUME_MUST_MATCH:
    if saved.get(name) != current.get(name):
      diffs.append(f"{name}: checkpoint has {saved.get(name)!r}, this run has "
                   f"{current.get(name)!r}")
  return diffs


def _handlers() -> dict[str, Any]:
  return {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler()}


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for one run directory."""

  def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_handlers())

  def latest_step(self) -> int | None:
    """Newest complete checkpoint's step (partial writes are never listed)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, config: dict[str, Any]) -> None:
    meta = {"step": int(step), "data_position": int(step),
            "keys": _flat_keys(state)}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flatten_state(state)),
        config=ocp.args.JsonSave(config),
        meta=ocp.args.JsonSave(meta)), force=True)

  def read_config(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
    return dict(restored.config)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restore the state at `step` into the structure, dtypes and shardings of
    `abstract_state` (a pytree of jax.ShapeDtypeStruct with shardings)."""
    flat_abstract = flatten_state(abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(flat_abstract)))
    return unflatten_state(abstract_state, dict(restored.state))

  def check_config(self, step: int, config: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written with a different model/optimizer/run config."""
    diffs = config_differences(self.read_config(step), config)
    if diffs:
      raise ValueError(
          f"refusing to resume from {self.directory} (step {step}): it was written with a "
          "different configuration:\n  " + "\n  ".join(diffs) +
          "\nUse another --out directory, or the checkpoint's settings.")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_arrays(directory: str | Path, step: int | None = None) -> dict[str, np.ndarray]:
  """The flat {key: numpy array} of a checkpoint's state (on whatever devices this process
  has), for tests and inspection."""
  manager = ocp.CheckpointManager(Path(directory).absolute(),
                                  options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=_handlers())
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {directory}")
    metadata = manager.item_metadata(step).state
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                for k, m in metadata.items()}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
  finally:
    manager.close()
  return {k: np.asarray(v) for k, v in restored.state.items()}
