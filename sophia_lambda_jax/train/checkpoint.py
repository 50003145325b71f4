"""Checkpoints with orbax's CheckpointManager: save, find the newest complete one, restore.

A checkpoint at step s holds (items of one orbax step directory `<out>/checkpoints/<s>`):

- `params`: the parameters after s optimizer steps as their nested dict of arrays, keyed by
  path name ("embed"/"embedding", "layers"/"0"/"attn"/...; layer indices become strings),
  so orbax's own restore of this one item yields the parameter dict:
  `ocp.StandardCheckpointer().restore(<out>/checkpoints/<s>/params)`;
- `state`: the rest of the TrainState (optimizer state, step, RNG) as a flat dict of arrays
  keyed "<index>.<key path>" (flat keys keep orbax away from the empty optax states; the
  index keeps the order, the path keeps it readable);
- `config`: the full TrainConfig of the run (JSON);
- `meta`: the data position (the next batch index, = s) and the key path list, JSON.

Checkpoints written before `params` was its own item hold the whole TrainState, parameters
included, in the flat `state` item ("00001.params_embed_embedding", ...); they still
restore, for resuming (`Checkpointer.restore`) and for loading (`restore_params`).

Saving is asynchronous: `save` returns once the arrays are copied off the devices and
writes in a background thread. Orbax writes into a temporary directory and renames it when
complete, so a process killed mid-write leaves no directory that `latest_step` would
return.

Each step directory also holds `checksums.json`: the size and CRC-32 of every file of its
items (`params` included), written by process 0 from orbax's post-finalisation hook, i.e.
after the items are complete and before the directory is renamed into place, so a committed
checkpoint always has one (runs saved before it existed do not; those saved before it covered
`params` list the other items only: what they list is verified, the parameters are read
with a warning). Every read verifies first (`check`, `newest_intact`): resuming, and
`restore_params` for `runs.load`, `slj generate`, `slj eval` and `slj export`. A read takes
the newest checkpoint whose files match, saying which damaged one it skipped; a step asked
for by number that does not match is refused. CRC-32 because the threat is accidental damage,
not tampering, and it is the fastest checksum of the standard library (zlib, releases the
GIL; see docs/decisions.md, 2026-12-02: CRC-32 checksums for checkpoints and token
shards): the cost lands on orbax's background thread, not on the train step; a read pays it
once more.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from sophia_lambda_jax.train.config import RESUME_MUST_MATCH, with_old_run_defaults
from sophia_lambda_jax.train.step import TrainState

_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")
CHECKSUMS = "checksums.json"
_ITEMS = ("params", "state", "config", "meta")
# What a checksums.json without an "items" entry covers: those written before `params` was.
_ITEMS_BEFORE_PARAMS = ("state", "config", "meta")
_BLOCK = 1 << 23


def file_crc32(path: Path) -> int:
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(_BLOCK):
      crc = zlib.crc32(block, crc)
  return crc


def _item_files(step_dir: Path, items=_ITEMS) -> list[Path]:
  return sorted(p for item in items for p in (step_dir / item).rglob("*") if p.is_file())


def write_checksums(step_dir: Path) -> None:
  """`checksums.json` of a step directory: {relative path: [size, crc32]} of its items."""
  files = {str(p.relative_to(step_dir)): [p.stat().st_size, file_crc32(p)]
           for p in _item_files(step_dir)}
  tmp = step_dir / f".{CHECKSUMS}.tmp"
  tmp.write_text(json.dumps({"algorithm": "crc32", "items": list(_ITEMS), "files": files}))
  os.replace(tmp, step_dir / CHECKSUMS)


class Check(NamedTuple):
  """What verifying a step directory found. `damaged`: why it must not be read (None when
  its files match); `unverified`: what could not be checked, for a warning (None when
  everything was)."""
  damaged: str | None
  unverified: str | None


def check(step_dir: Path) -> Check:
  """Verify a step directory's files against its `checksums.json`."""
  path = step_dir / CHECKSUMS
  if not path.is_file():
    return Check(None, "has no checksums (saved by an older version, or killed while "
                       "writing them)")
  try:
    manifest = json.loads(path.read_text())
    expected = manifest["files"]
    items = tuple(manifest.get("items", _ITEMS_BEFORE_PARAMS))
  except (ValueError, KeyError, TypeError, AttributeError):
    return Check(f"{CHECKSUMS} is unreadable", None)
  unverified = None
  if "params" not in items and _item_files(step_dir, ("params",)):
    unverified = ("has checksums that do not cover its parameters (saved by an older "
                  "version)")
  present = {str(p.relative_to(step_dir)) for p in _item_files(step_dir, items)}
  for name in sorted(set(expected) - present):
    return Check(f"{name} is missing", unverified)
  for name in sorted(present - set(expected)):
    return Check(f"{name} was added after the checkpoint was written", unverified)
  for name, (size, crc) in sorted(expected.items()):
    file = step_dir / name
    if file.stat().st_size != size:
      return Check(f"{name} has {file.stat().st_size} bytes, {size} were written", unverified)
    if file_crc32(file) != crc:
      return Check(f"{name} differs from what was written (CRC-32 mismatch)", unverified)
  return Check(None, unverified)


class Choice(NamedTuple):
  """The checkpoint a read takes: `step` (None when every one is damaged), what of it could
  not be verified (`Check.unverified`), and the newer steps found damaged, with why."""
  step: int | None
  unverified: str | None
  damaged: list[tuple[int, str]]


def newest_intact(directory: Path, steps) -> Choice:
  """The newest of `steps` in `directory` not proven damaged (one without checksums cannot
  be: it is taken, unverified), and the damaged ones newer than it."""
  damaged = []
  for step in sorted(steps, reverse=True):
    found = check(Path(directory) / str(step))
    if found.damaged is None:
      return Choice(step, found.unverified, damaged)
    damaged.append((step, found.damaged))
  return Choice(None, None, damaged)


def _warn(message: str) -> None:
  """One warning line on stderr from process 0."""
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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


def params_by_name(params: Any) -> Any:
  """The nested parameter dict with every key a string (the on-disk layout of `params`)."""
  if isinstance(params, dict):
    return {str(k): params_by_name(v) for k, v in params.items()}
  return params


def params_from_names(like: Any, named: Any) -> Any:
  """Inverse of `params_by_name` given the parameter tree `like` (keys as the model has
  them)."""
  if isinstance(like, dict):
    found = sorted(named) if isinstance(named, dict) else type(named).__name__
    if found != sorted(map(str, like)):
      raise ValueError(f"checkpoint parameters {found} do not match the model's "
                       f"{sorted(map(str, like))}")
    return {k: params_from_names(v, named[str(k)]) for k, v in like.items()}
  return named


def _without_params(state: Any) -> Any:
  return state._replace(params=None)


def _legacy_param_keys(params: Any) -> list[str]:
  """Flat keys of the parameters inside an old all-in-`state` checkpoint (TrainState field
  order: step, params, opt_state, rng; the index of the first parameter is 1)."""
  keys = _flat_keys(TrainState(step=0, params=params, opt_state=None, rng=None))
  return keys[1:]


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Human-readable list of trajectory-changing fields that differ between two configs
  (fields the checkpoint's lacks as `with_old_run_defaults`)."""
  saved = with_old_run_defaults(saved)
  diffs = []
  for name in RESUME_MUST_MATCH:
    if saved.get(name) != current.get(name):
      diffs.append(f"{name}: checkpoint has {saved.get(name)!r}, this run has "
                   f"{current.get(name)!r}")
  return diffs


def _handlers() -> dict[str, Any]:
  return {"params": ocp.StandardCheckpointHandler(), "state": ocp.StandardCheckpointHandler(),
          "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _has_params_item(directory: Path, step: int) -> bool:
  return (directory / str(step) / "params").is_dir()


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for one run directory."""

  def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self._async = async_save
    self._saving: int | None = None  # the step whose save is in flight
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        async_options=ocp.options.AsyncOptions(
            post_finalization_callback=self._write_checksums) if async_save else None)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_handlers())

  def _write_checksums(self) -> None:
    """After orbax finalised the step in flight: checksums into its (still temporary)
    directory, so that it is renamed into place with them."""
    if jax.process_index() != 0 or self._saving is None:
      return
    step = self._saving
    temporary = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
    step_dir = temporary[-1] if temporary else self.directory / str(step)
    if step_dir.is_dir():
      write_checksums(step_dir)

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def newest_intact(self) -> Choice:
    """The newest checkpoint not proven damaged, and the damaged ones newer than it."""
    return newest_intact(self.directory, self.all_steps())

  def delete(self, step: int) -> None:
    self._manager.delete(step)

  def latest_step(self) -> int | None:
    """Newest complete checkpoint's step (partial writes are never listed)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, config: dict[str, Any],
           data_fingerprint: str | None = None) -> None:
    rest = _without_params(state)
    meta = {"step": int(step), "data_position": int(step), "keys": _flat_keys(rest),
            "data_fingerprint": data_fingerprint}
    self.wait()  # orbax would too: one save in flight
    _check_space(self.directory, step, state)
    self._saving = int(step)
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params_by_name(state.params)),
        state=ocp.args.StandardSave(flatten_state(rest)),
        config=ocp.args.JsonSave(config),
        meta=ocp.args.JsonSave(meta)), force=True)
    if not self._async:
      self._write_checksums()

  def read_config(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
    return dict(restored.config)

  def read_meta(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return dict(restored.meta)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restore the state at `step` into the structure, dtypes and shardings of
    `abstract_state` (a pytree of jax.ShapeDtypeStruct with shardings). A tensor saved with
    another shape is a ValueError naming it and both shapes."""
    if not _has_params_item(self.directory, step):  # written before `params` was an item
      target = flatten_state(abstract_state)
      _check_shapes(self._manager.item_metadata(step).state, target, "state")
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
      return unflatten_state(abstract_state, dict(restored.state))
    rest = _without_params(abstract_state)
    saved = self._manager.item_metadata(step)
    _check_shapes(saved.params, params_by_name(abstract_state.params), "params")
    _check_shapes(saved.state, flatten_state(rest), "state")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params_by_name(abstract_state.params)),
        state=ocp.args.StandardRestore(flatten_state(rest))))
    params = params_from_names(abstract_state.params, restored.params)
    return unflatten_state(rest, dict(restored.state))._replace(params=params)

  def check_layout(self, step: int, meta: dict[str, Any], abstract_state: Any) -> None:
    """Refuse, in one line, to resume a checkpoint whose state holds other leaves than this
    version's (`meta["keys"]` against the flat keys of `abstract_state`): a version that
    added or removed an optimizer-state field wrote it. Restoring would fail inside orbax;
    refusing here leaves every checkpoint in place."""
    saved = meta.get("keys")
    if saved is None:
      return
    state = abstract_state if not _has_params_item(self.directory, step) else \
        _without_params(abstract_state)
    expected = _flat_keys(state)
    if list(saved) == expected:
      return
    path = lambda key: key.split(".", 1)[-1]  # without the index, which later leaves shift
    saved_paths, expected_paths = {path(k) for k in saved}, {path(k) for k in expected}
    missing = [path(k) for k in expected if path(k) not in saved_paths]
    extra = [path(k) for k in saved if path(k) not in expected_paths]
    difference = (f"this version's state has {missing[0]!r}, which it lacks" if missing else
                  f"it holds {extra[0]!r}, which this version's state lacks" if extra else
                  "its leaves are in another order")
    raise ValueError(
        f"refusing to resume from {self.directory} (step {step}): it was written by another "
        f"version of the optimizer state ({difference}); resume it with that version, or "
        "use another --out")

  def check_config(self, step: int, config: dict[str, Any],
                   saved: dict[str, Any] | None = None) -> None:
    """Refuse to resume a checkpoint written with a different model/optimizer/run config
    (`saved`: its config when already read)."""
    diffs = config_differences(self.read_config(step) if saved is None else saved, config)
    if diffs:
      raise ValueError(
          f"refusing to resume from {self.directory} (step {step}): it was written with a "
          "different configuration:\n  " + "\n  ".join(diffs) +
          "\nUse another --out directory, or the checkpoint's settings.")

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      error = _as_os_error(e, self.directory)
      if error is e:
        raise
      raise error from e

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _check_space(directory: Path, step: int, state: Any) -> None:
  """OSError ENOSPC naming `directory` when its disk has less room than checkpoint `step`
  takes (its arrays, and a tenth more for orbax's metadata): refused before orbax starts,
  as a write that fails midway floods stderr from orbax's threads."""
  need = sum(x.nbytes for x in jax.tree.leaves(state)) * 11 // 10
  free = shutil.disk_usage(directory).free
  if free < need:
    raise OSError(errno.ENOSPC, f"no room for checkpoint step {step} ({need:,} bytes, "
                  f"{free:,} free)", str(directory))


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _as_os_error(error: Exception, directory: Path) -> Exception:
  """tensorstore reports a failed write ("No space left on device") as a ValueError whose
  message carries the OS error code: an OSError with it, naming `directory`; any other
  error unchanged."""
  found = _OS_ERROR_CODE.search(str(error))
  if found is None:
    return error
  code = int(found.group(1))
  return OSError(code, os.strerror(code), str(directory))


def _check_shapes(saved: Any, expected: Any, item: str) -> None:
  """ValueError naming the first tensor whose saved shape differs from the expected one."""
  saved_shapes = {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in
                  jax.tree_util.tree_flatten_with_path(saved)[0] if hasattr(leaf, "shape")}
  for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    name = jax.tree_util.keystr(path)
    if name in saved_shapes and saved_shapes[name] != tuple(leaf.shape):
      shown = "/".join(str(getattr(k, "key", k)) for k in path)
      raise ValueError(f"{item} {shown} was saved with shape {saved_shapes[name]}, "
                       f"{tuple(leaf.shape)} is expected")


def _read_only_manager(directory: Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers=_handlers())


def _on_one_device(abstract: Any) -> Any:
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      abstract)


def _restore_item(manager: ocp.CheckpointManager, step: int, name: str) -> Any:
  """One item of a checkpoint, whatever its structure, on this process's first device."""
  abstract = _on_one_device(getattr(manager.item_metadata(step), name))
  restored = manager.restore(step, args=ocp.args.Composite(
      **{name: ocp.args.StandardRestore(abstract)}))
  return getattr(restored, name)


def steps_on_disk(directory: Path) -> tuple[list[int], list[int]]:
  """(complete steps, steps being written) from the directory listing alone (safe from any
  thread): orbax writes a step into "<step>.orbax-checkpoint-tmp-*" and renames it when
  complete."""
  complete, partial = [], []
  for path in Path(directory).iterdir() if Path(directory).is_dir() else ():
    step, _, suffix = path.name.partition(".")
    if step.isdigit() and not suffix:
      complete.append(int(step))
    elif step.isdigit() and suffix.startswith("orbax-checkpoint-tmp"):
      partial.append(int(step))
  return sorted(complete), sorted(partial)


def set_aside_partial(directory: Path) -> None:
  """Rename each save in flight ("<step>.orbax-checkpoint-tmp*") to that name plus
  "-abandoned" (still a partial save: the next run's manager removes it), so that orbax can
  no longer rename it into place: a process that abandons its save then names, from
  `steps_on_disk`, the checkpoint the next run resumes from. A save that completed first is
  left as it is."""
  for path in Path(directory).iterdir() if Path(directory).is_dir() else ():
    step, _, suffix = path.name.partition(".")
    if step.isdigit() and suffix.startswith("orbax-checkpoint-tmp") and \
        not suffix.endswith("-abandoned"):
      try:
        os.rename(path, path.with_name(f"{path.name}-abandoned"))
      except OSError:  # renamed into place (or removed) meanwhile
        pass


def latest_step(directory: str | Path) -> int | None:
  """Newest complete checkpoint's step in `directory` (None when there is none)."""
  directory = Path(directory).absolute()
  if not directory.is_dir():
    return None
  manager = _read_only_manager(directory)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def readable_step(directory: str | Path, step: int | None = None) -> int:
  """The checkpoint a read takes, verified against its checksums: `step`, refused (ValueError)
  when damaged; else the newest one not proven damaged, with one warning line for each newer
  damaged one skipped. A warning line too when it could not be fully verified (saved
  without checksums, or with checksums that do not cover its parameters).
  FileNotFoundError when there is no complete checkpoint (or none at `step`)."""
  directory = Path(directory).absolute()
  steps = _all_steps(directory)
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {directory}")
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"no complete checkpoint at step {step} in {directory} (it has "
                              f"steps {', '.join(map(str, steps))})")
    found = check(directory / str(step))
    if found.damaged is not None:
      raise ValueError(f"checkpoint step {step} in {directory} is damaged ({found.damaged}); "
                       "refusing to read it")
    choice = Choice(step, found.unverified, [])
  else:
    choice = newest_intact(directory, steps)
  for bad, problem in choice.damaged:
    _warn(f"checkpoint step {bad} in {directory} is damaged ({problem}); "
          + (f"using step {choice.step}" if choice.step is not None else
             "no older checkpoint is intact"))
  if choice.step is None:
    raise ValueError(f"every checkpoint in {directory} is damaged (steps "
                     f"{', '.join(str(bad) for bad, _ in choice.damaged)}); none can be read")
  if choice.unverified:
    _warn(f"checkpoint step {choice.step} in {directory} {choice.unverified}: reading it "
          "unverified")
  return choice.step


def _all_steps(directory: Path) -> list[int]:
  if not directory.is_dir():
    return []
  manager = _read_only_manager(directory)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def restore_params(directory: str | Path, abstract_params: Any,
                   step: int | None = None) -> tuple[int, Any]:
  """(step, parameters) of the checkpoint `readable_step` takes in `directory` (the newest
  intact one, or `step`), on this process's first device, in the tree of `abstract_params`
  (e.g. `qwen.abstract_params(config)`); reads both checkpoint layouts (module docstring).

  A run training into `directory` meanwhile deletes its older checkpoints: one removed
  while it was read is read again from the then newest (FileNotFoundError, in one line,
  when that keeps happening or `step` was asked for)."""
  directory = Path(directory).absolute()
  for _ in range(3):
    chosen = None
    try:
      chosen = readable_step(directory, step)
      return chosen, _read_params(directory, chosen, abstract_params)
    except Exception as e:
      if not _removed_meanwhile(e, directory, step if step is not None else chosen):
        raise
      if step is not None:
        break
  which = step if step is not None else chosen
  raise FileNotFoundError(
      f"{'a checkpoint' if which is None else f'checkpoint step {which}'} in {directory} was "
      "removed while it was read (a run training there deletes its older checkpoints); run "
      "the command again")


def _removed_meanwhile(error: Exception, directory: Path, step: int | None) -> bool:
  """Whether `error` came from checkpoint `step` disappearing as it was read (`step` None:
  a file vanishing as checkpoints were verified)."""
  if step is None:
    return isinstance(error, OSError) and error.errno == errno.ENOENT
  return step not in steps_on_disk(directory)[0]


def _read_params(directory: Path, step: int, abstract_params: Any) -> Any:
  manager = _read_only_manager(directory)
  try:
    if _has_params_item(directory, step):
      saved = manager.item_metadata(step).params
      named_abstract = params_by_name(abstract_params)
      _check_shapes(saved, named_abstract, "params")
      named = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(
          _on_one_device(named_abstract)))).params
      return params_from_names(abstract_params, named)
    flat = _restore_item(manager, step, "state")
    keys = _legacy_param_keys(abstract_params)
    missing = [k for k in keys if k not in flat]
    if missing:
      raise ValueError(f"checkpoint {directory / str(step)} has neither a 'params' item nor "
                       f"this model's parameters under flat keys (no {missing[0]!r}); it was "
                       f"written by another model or version and cannot be loaded")
    for key, leaf in zip(keys, jax.tree.leaves(abstract_params)):
      if flat[key].shape != leaf.shape:
        raise ValueError(f"checkpoint {directory / str(step)}: {key} has shape "
                         f"{flat[key].shape}, the model expects {leaf.shape}")
    return jax.tree.unflatten(jax.tree.structure(abstract_params), [flat[k] for k in keys])
  finally:
    manager.close()
