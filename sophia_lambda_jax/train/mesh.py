"""Device mesh, multi-host start-up and shardings for params, optimizer state and batches.

The mesh has two axes:

- `data`: pure data parallelism; parameters and optimizer state are replicated along it.
- `fsdp`: fully sharded data parallelism; the batch is split along it too, and every
  parameter (and its optimizer state) is split along one of its dimensions, chosen from the
  model's logical axis names through `LOGICAL_AXIS_RULES`. XLA's SPMD partitioner inserts
  the all-gathers (forward/backward) and reduce-scatters (gradients).

A batch of shape (batch, ...) is split over both axes on its batch dimension.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sophia_lambda_jax.train.config import parse_mesh

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# Logical axis name (from `models.qwen.logical_axes`) -> mesh axis. The first rule whose
# logical name appears in a leaf's axes *and* whose dimension divides the mesh axis size wins,
# so each leaf is split along at most one dimension. "embed" (the residual width) comes first:
# every matrix of the model has it, so all of them shard the same way; the others are
# fall-backs for leaves without an embed dimension or with one that does not divide.
LOGICAL_AXIS_RULES: tuple[tuple[str, str], ...] = (
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("vocab", "fsdp"),
    ("heads", "fsdp"),
    ("kv", "fsdp"),
)

# Environment variables of the cluster managers JAX auto-detects (jax._src.clusters).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                "MV2_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Start jax.distributed when asked to (flags) or when a cluster environment is visible.

  Returns True when this is a multi-process run. Must run before any other JAX call that
  touches devices.
  """
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit):
    if coordinator is None or num_processes is None or process_id is None:
      raise ValueError("multi-host runs need all of coordinator, num_processes and "
                       f"process_id; got coordinator={coordinator!r}, "
                       f"num_processes={num_processes!r}, process_id={process_id!r}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must be in [0, num_processes={num_processes}), "
                       f"got {process_id}")
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if coordinator is not None:
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
      # CPU processes need a collectives backend to talk to each other (GPUs use NCCL).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes, process_id=process_id)
    return True
  if any(name in os.environ for name in _CLUSTER_ENV):
    jax.distributed.initialize()  # JAX's cluster auto-detection fills in everything
    return jax.process_count() > 1
  return False


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh of shape (data, fsdp) from a spec like "data=2,fsdp=4" (or "auto").

  Devices are taken in `jax.devices()` order (grouped by process), so the batch rows a
  process owns are contiguous. A single process may use fewer devices than it has (the first
  data*fsdp ones); a multi-process mesh must use every device.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec)
  if sizes is None:
    sizes = {"data": 1, "fsdp": len(devices)}
  count = sizes["data"] * sizes["fsdp"]
  if count > len(devices):
    raise ValueError(f"mesh {spec!r} needs {count} devices but only {len(devices)} are "
                     f"available; pass e.g. --mesh data=1,fsdp={len(devices)}")
  if count < len(devices) and jax.process_count() > 1:
    raise ValueError(f"mesh {spec!r} uses {count} of {len(devices)} devices; a multi-process "
                     "run must use all of them")
  grid = np.asarray(devices[:count], dtype=object).reshape(sizes["data"], sizes["fsdp"])
  return Mesh(grid, MESH_AXES)


def _leaf_spec(axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh,
               rules: Sequence[tuple[str, str]]) -> P:
  """PartitionSpec splitting one dimension of a leaf along a mesh axis (or none)."""
  if axes is None or len(shape) == 0:
    return P()
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match a parameter of shape {shape}")
  for logical, mesh_axis in rules:
    size = mesh.shape[mesh_axis]
    if size == 1:
      return P()
    for dim, name in enumerate(axes):
      if name == logical and shape[dim] % size == 0:
        spec = [None] * len(shape)
        spec[dim] = mesh_axis
        return P(*spec)
  return P()


def _is_axes_leaf(x: Any) -> bool:
  return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def param_specs(params: Any, logical_axes: Any, mesh: Mesh,
                rules: Sequence[tuple[str, str]] = LOGICAL_AXIS_RULES) -> Any:
  """PartitionSpecs like `params` (arrays or ShapeDtypeStructs) from their logical axes."""
  return jax.tree.map(lambda axes, p: _leaf_spec(axes, tuple(p.shape), mesh, rules),
                      logical_axes, params, is_leaf=_is_axes_leaf)


def _path_keys(path) -> tuple[str, ...]:
  keys = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        keys.append(str(getattr(entry, attr)))
        break
    else:
      keys.append(str(entry))
  return tuple(keys)


def state_specs(state: Any, params: Any, specs: Any, mesh: Mesh) -> Any:
  """PartitionSpecs for an optimizer state (or any pytree holding param-like subtrees).

  A state leaf whose key path ends with a parameter's key path (moments, Hessian EMA, ...)
  takes that parameter's spec on every dimension whose size still matches the parameter's
  or is still divisible by the mesh axis size (so a block-reduced last dimension,
  (..., n / block), stays split when it can); counters, scalars and unmatched leaves are
  replicated.
  """
  by_path: dict[tuple[str, ...], tuple[tuple[int, ...], P]] = {}
  for (path, p), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
    by_path[_path_keys(path)] = (tuple(p.shape), spec)
  longest = max((len(k) for k in by_path), default=0)

  def spec_for(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    keys = _path_keys(path)
    for start in range(max(0, len(keys) - longest), len(keys)):
      match = by_path.get(keys[start:])
      if match is None:
        continue
      param_shape, spec = match
      if len(shape) != len(param_shape):
        return P()
      out = []
      for dim, axis in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        keep = axis is not None and (shape[dim] == param_shape[dim]
                                     or shape[dim] % mesh.shape[axis] == 0)
        out.append(axis if keep else None)
      return P(*out)
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, state)


def named(mesh: Mesh, specs: Any) -> Any:
  """NamedShardings from a pytree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """Sharding of a (..., batch, seq) array: batch split over (data, fsdp)."""
  return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_rows: np.ndarray, sharding: NamedSharding,
                 global_shape: tuple[int, ...]) -> jax.Array:
  """Assemble the global batch from the rows this process read (multi-host safe)."""
  return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


def gather_for_compute(params: Any, mesh: Mesh) -> Any:
  """FSDP's all-gather: constrain the (fsdp-sharded) params to be whole where they are used.

  Inside the jitted step the model then runs purely data-parallel over (data, fsdp) on its
  batch rows, and the transpose of this constraint reduce-scatters the gradients back to the
  params' shardings. Without it XLA may propagate the params' feature-dimension split into the
  activations and reshard them back and forth.
  """
  if mesh.shape["fsdp"] == 1:
    return params
  whole = NamedSharding(mesh, P())
  return jax.tree.map(lambda p: jax.lax.with_sharding_constraint(p, whole), params)


def describe(mesh: Mesh) -> str:
  return ", ".join(f"{name}={size}" for name, size in mesh.shape.items())

