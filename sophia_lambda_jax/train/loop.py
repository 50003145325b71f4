"""`run_training(config)`: build everything, resume if possible, train, evaluate, summarise.

Order of a run:
1. jax.distributed (multi-host), the lock on <out> (process 0) and the device mesh;
2. the checkpoints in <out>/checkpoints, newest first, verified against their checksums (a
   damaged one is reported and skipped), the newest intact one's config checked against
   this run's (the trajectory-changing fields must match); a run already finished stops here;
3. data (`TokenBatches`, each process reads only its rows; its fingerprint must match the
   checkpoint's), model, schedule, optimizer;
4. shardings for params (logical axes -> mesh), optimizer state and batches;
5. state: restored from that checkpoint (one that does not restore is refused, with the
   reason, and kept: only damaged ones are ever deleted), else initialised under jit
   directly into its shardings;
6. the jitted step, compiled ahead of time (its compiled memory analysis gives the peak
   device memory), then the loop: step, metrics, eval every eval_every, checkpoint every
   checkpoint_every, NaN/Inf guard;
7. summary.json, its timings over every segment of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from sophia_lambda_jax import interrupts
from sophia_lambda_jax.directory_lock import DirectoryInUse, directory_lock
from sophia_lambda_jax.train import flops
from sophia_lambda_jax.train import mesh as mesh_lib
from sophia_lambda_jax.train.checkpoint import Checkpointer, set_aside_partial, steps_on_disk
from sophia_lambda_jax.train.config import TrainConfig, config_from_argv
from sophia_lambda_jax.train.metrics import (UNCLIPPED_BAND, MetricsLogger, finite_or_none,
                                             in_unclipped_band, read_metrics,
                                             unclipped_fractions)
from sophia_lambda_jax.train.schedule import learning_rate_schedule
from sophia_lambda_jax.train.step import TrainState, make_eval_step, make_train_step


def build_optimizer(config: TrainConfig, schedule: optax.Schedule):
  from sophia_lambda_jax import optimizers

  kwargs = dict(config.optimizer_kwargs)
  if optimizers.resolve(config.optimizer).needs_batch_tokens:
    # GNB's estimate is a per-token mean, scaled back by B; Hutchinson's is the Hessian of
    # the mean loss itself (B = 1, as in Sophia-H).
    gnb = config.resolved_hessian_estimator() == "gnb"
    kwargs["batch_tokens"] = config.batch_tokens if gnb else 1
  return optimizers.get_optimizer(config.optimizer, learning_rate=schedule, **kwargs)


def optimizer_metrics(opt_state, roles=None) -> dict[str, jax.Array]:
  """Refresh interval, refresh count, refreshes skipped for a non-finite estimate, rho and
  clipped fraction of a Sophia-family state.

  roles: optional pytree like params of role names (``labels.label_params``); the clipped
  fraction is then also reported per role as "clip_fraction/<role>" (the tied embedding is
  about half of a small model's coordinates, so the overall fraction can hide the rest).
  """
  from sophia_lambda_jax import optimizers

  out = {}
  interval_and_count = optimizers.hessian_interval_and_count(opt_state)
  if interval_and_count is not None:
    interval, count = interval_and_count
    out["hessian_interval"] = jnp.asarray(interval, jnp.int32)
    out["hessian_refreshes"] = jnp.asarray(count, jnp.int32)
    out["hessian_relative_change"] = jnp.asarray(
        optimizers.hessian_relative_change(opt_state), jnp.float32)
    out["hessian_skipped"] = jnp.asarray(optimizers.hessian_skipped(opt_state), jnp.int32)
  rho = optimizers.current_rho(opt_state)
  if rho is not None:
    out["rho"] = jnp.asarray(rho, jnp.float32)
  fractions = optimizers.clip_fraction(opt_state, roles)
  if fractions is None:
    return out
  if roles is None:
    fractions = {None: fractions}
  out.update({"clip_fraction" if r is None else f"clip_fraction/{r}":
              jnp.asarray(f, jnp.float32) for r, f in fractions.items()})
  return out


def parameter_roles(abstract_params):
  """Each parameter's role name (embedding, attention, mlp, norm, head, other)."""
  from sophia_lambda_jax import labels

  return jax.tree.map(lambda info: info.role,
                      labels.label_params(abstract_params, strict=False),
                      is_leaf=lambda x: isinstance(x, labels.ParamInfo))


def _host(x) -> Any:
  """A replicated (or this-process-local) jax value as numpy, multi-host safe."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)


def _tree_size(tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def _tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def compiled_memory(compiled) -> dict[str, int] | None:
  """The byte counts of a compiled step's `memory_analysis()` (argument, output, alias,
  temp) and their total argument + output - alias + temp: the step's peak as XLA's buffer
  assignment plans it. None where the backend has no memory analysis."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if stats is None:
    return None
  parts = {name: int(getattr(stats, f"{name}_size_in_bytes"))
           for name in ("argument", "output", "alias", "temp")}
  parts["total"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
  return parts


class ModelFunctions:
  """The Qwen model as pure functions: features, logical axes, and (cached) jitted
  init/eval.

  The jitted parameter init and eval step depend only on the model config, seed and mesh
  layout, not on the optimizer, so they are cached across runs in one process (a
  comparison of several optimizers compiles them once).
  """

  def __init__(self, config: TrainConfig, mesh):
    from flax import nnx
    from sophia_lambda_jax.models import qwen

    overrides = dict(config.model_overrides, compute_dtype=config.compute_dtype)
    if config.resolved_hessian_estimator() == "hutchinson":
      # Its Hessian-vector products differentiate the attention twice; cuDNN's kernel
      # has no forward-mode derivative.
      overrides["attention"] = "xla"
    self.init_from, self.overrides = config.init_from, overrides
    self.init_compact_vocab = None
    if config.init_from:
      from sophia_lambda_jax.models import hf

      self.config = hf.config_from_hf(hf.read_config(config.init_from), **overrides)
      self.init_compact_vocab = hf.read_compact_vocab(config.init_from)
    else:
      self.config = qwen.get_config(config.model, **overrides)
    if config.seq_len > self.config.max_seq_len:
      raise ValueError(f"seq_len {config.seq_len} exceeds {config.init_from or config.model}'s "
                       f"max_seq_len {self.config.max_seq_len}")
    self.mesh = mesh
    self.seed = config.seed
    self.graphdef, self.abstract_params = _abstract_model(self.config)
    self.logical_axes = qwen.logical_axes(self.config)
    self.specs = mesh_lib.param_specs(self.abstract_params, self.logical_axes, mesh)
    self.shardings = mesh_lib.named(mesh, self.specs)
    self.features = _features_fn(self.graphdef, mesh)

  def _key(self):
    leaves, treedef = jax.tree.flatten(self.specs, is_leaf=lambda s: isinstance(s, P))
    return self.config, self.mesh, treedef, tuple(leaves)

  def init_params(self):
    if self.init_from:
      from sophia_lambda_jax.models import hf, qwen

      weights = qwen.split_params(hf.from_hf(self.init_from, **self.overrides))[1]
      # Host arrays: every process read the same files, each puts its own shards.
      return jax.device_put(jax.tree.map(np.asarray, weights), self.shardings)
    return _jitted_param_init(*self._key(), self.seed)()

  def eval_loss(self, params, batch):
    return _jitted_eval(*self._key())(params, batch)


@functools.lru_cache(maxsize=8)
def _abstract_model(model_config):
  from flax import nnx
  from sophia_lambda_jax.models import qwen

  abstract = nnx.eval_shape(lambda: qwen.Qwen(model_config, rngs=nnx.Rngs(0)))
  graphdef, params = qwen.split_params(abstract)
  if jax.tree.leaves(graphdef[1]):  # non-parameter state: take it from a real model
    graphdef = qwen.split_params(qwen.Qwen(model_config, rngs=nnx.Rngs(0)))[0]
  return graphdef, params


def _features_fn(graphdef, mesh):
  from sophia_lambda_jax.models import qwen

  def features(params, input_ids):
    return qwen.features(graphdef, mesh_lib.gather_for_compute(params, mesh), input_ids)
  return features


@functools.lru_cache(maxsize=8)
def _jitted_param_init(model_config, mesh, treedef, spec_leaves, seed):
  from flax import nnx
  from sophia_lambda_jax.models import qwen

  shardings = mesh_lib.named(mesh, jax.tree.unflatten(treedef, spec_leaves))
  return jax.jit(lambda: qwen.split_params(qwen.Qwen(model_config, rngs=nnx.Rngs(seed)))[1],
                 out_shardings=shardings)


@functools.lru_cache(maxsize=8)
def _jitted_eval(model_config, mesh, treedef, spec_leaves):
  shardings = mesh_lib.named(mesh, jax.tree.unflatten(treedef, spec_leaves))
  features = _features_fn(_abstract_model(model_config)[0], mesh)
  return jax.jit(make_eval_step(features),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


class TrainProgram:
  """Optimizer, shardings, initial state and the compiled train step of one config.

  Used by `run_training` and by the benchmarks (which time `compile()`'s step directly).
  """

  def __init__(self, config: TrainConfig, model: "ModelFunctions", mesh):
    self.config, self.model, self.mesh = config, model, mesh
    # Optimizer with a warmup + cosine schedule; batch_tokens from the global batch.
    self.peak_lr = config.resolved_learning_rate(model.config.hidden_size)
    self.schedule = learning_rate_schedule(config, self.peak_lr)
    self.tx = build_optimizer(config, self.schedule)
    self.estimator = config.resolved_hessian_estimator()

    # Shardings: params from their logical axes, optimizer state following the params.
    self.abstract_opt = jax.eval_shape(self.tx.init, model.abstract_params)
    o_specs = mesh_lib.state_specs(self.abstract_opt, model.abstract_params, model.specs,
                                   mesh)
    replicated = mesh_lib.replicated(mesh)
    self.replicated = replicated
    self.state_shardings = TrainState(step=replicated, params=model.shardings,
                                      opt_state=mesh_lib.named(mesh, o_specs),
                                      rng=replicated)
    accum = config.grad_accum
    self.batch_shape = ((accum,) if accum > 1 else ()) + (config.micro_batch_size,
                                                          config.seq_len + 1)
    self.batch_sharding = mesh_lib.batch_sharding(mesh, leading_dims=1 if accum > 1 else 0)
    self.abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=model.abstract_params,
                   opt_state=self.abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32)),
        self.state_shardings)

  def fresh_state(self) -> TrainState:
    params = self.model.init_params()
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    # The run's base key: a stream separate from the parameter init's.
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 0x5EED)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
                      params=params, opt_state=opt_state,
                      rng=jax.device_put(rng, self.replicated))

  def train_step(self):
    """The pure step function (see step.py)."""
    return make_train_step(
        self.model.features, self.tx, estimator=self.estimator,
        grad_accum=self.config.grad_accum, grad_clip=self.config.grad_clip,
        learning_rate_fn=self.schedule,
        optimizer_metrics=(functools.partial(optimizer_metrics,
                                             roles=parameter_roles(self.model.abstract_params))
                           if self.estimator else None))

  def lower(self, donate: bool = True):
    abstract_batch = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32,
                                          sharding=self.batch_sharding)
    return jax.jit(
        self.train_step(), in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, self.replicated),
        donate_argnums=(0,) if donate else (),
    ).lower(self.abstract_state, abstract_batch)

  def compile(self, donate: bool = True):
    """The jitted step compiled ahead of time: compiled(state, batch) -> (state, metrics);
    the state argument is donated (`donate=False` only to measure what donation is worth,
    experiments/benchmarks/bench_cpu_throughput.py)."""
    return self.lower(donate).compile()


# Seconds a stop requested by Ctrl-C or SIGTERM may take: the step in flight finishes and
# so does the checkpoint being written, unless it takes longer; then it is abandoned
# (`interrupts.deferred`) and the process exits within about this time of the signal.
INTERRUPT_GRACE_S = 10.0


def _say(message: str) -> None:
  """One line on stderr from process 0 (warnings and refusals the user must see)."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def run_training(config: TrainConfig) -> dict[str, Any]:
  """Train (or resume) one run; returns the summary also written to <out>/summary.json.

  Only one process writes into a run directory: process 0 holds `<out>/.lock` for the run
  (a second `slj train` on the same --out is refused at once, naming the holder's PID)."""
  wall_start = time.perf_counter()
  config.validate()
  mesh_lib.initialize_distributed(config.coordinator, config.num_processes, config.process_id)
  out = config.resolved_out().absolute()
  lock = (directory_lock(out, what="training run") if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    # An existing run in `out` is resumed only with the same trajectory-changing settings:
    # refuse before building anything.
    checkpointer = Checkpointer(out / "checkpoints", keep=config.keep_checkpoints)
    try:
      resume = _checkpoint_to_resume(checkpointer, config.to_dict())
    except BaseException:
      checkpointer.close()
      raise
    summary_path = out / "summary.json"
    if resume.step == config.steps and summary_path.is_file():
      checkpointer.close()
      _say(f"{out}: this run already finished its {config.steps} steps; nothing to do "
           f"({summary_path.name} left as it is)")
      return json.loads(summary_path.read_text())
    try:
      run = _set_up(config, out, checkpointer, resume)
    except KeyboardInterrupt as e:
      checkpointer.close()
      raise interrupts.Interrupted(_interrupted(checkpointer.directory,
                                                interrupts.signal_of(e)),
                                   interrupts.signal_of(e)) from None
    except BaseException:
      checkpointer.close()
      raise
    return _train(config, out, run, wall_start)  # closes the checkpointer


class _Run(NamedTuple):
  """What `_set_up` prepared: everything the step loop needs."""
  mesh: Any
  model: ModelFunctions
  program: TrainProgram | None
  train_data: Any
  val_data: Any
  data_fingerprint: str | None
  checkpointer: Checkpointer
  start_step: int
  state: Any


def _set_up(config: TrainConfig, out: Path, checkpointer: Checkpointer,
            resume: "_Resume") -> _Run:
  """Mesh, data (its fingerprint checked against the checkpoint's), model, program, and the
  state: restored from the checkpoint `resume` names, or initialised."""
  from sophia_lambda_jax import data as data_lib

  process, process_count = jax.process_index(), jax.process_count()
  mesh = mesh_lib.make_mesh(config.mesh)
  if config.micro_batch_size % mesh.size:
    raise ValueError(
        f"batch_size / grad_accum = {config.micro_batch_size} sequences must be divisible by "
        f"the {mesh.size} devices of mesh {config.mesh!r} (the batch is split over data and "
        "fsdp)")

  # Data: each process reads only its rows of every global batch.
  model = ModelFunctions(config, mesh)
  data_dir = data_lib.resolve_data(config.data)
  data_vocab = int(data_lib.load_manifest(data_dir)["vocab_size"])
  # The export of a compact-vocabulary run carries its id table: the data is read through it.
  compact = model.init_compact_vocab
  if config.init_from and compact is None and model.config.vocab_size < data_vocab:
    raise ValueError(
        f"--init-from {config.init_from} has vocab_size {model.config.vocab_size}, but "
        f"{data_dir} holds token ids of a {data_vocab}-token vocabulary; starting from a "
        f"checkpoint needs its full vocabulary, or the compact_vocab.npy of an slj export")
  train_data = data_lib.TokenBatches(
      data_dir, "train", config.batch_size, config.seq_len, config.seed,
      vocab_size=model.config.vocab_size, process_index=process,
      process_count=process_count, compact_vocab=compact)
  val_data = data_lib.TokenBatches(
      data_dir, "val", config.micro_batch_size, config.seq_len, config.seed,
      vocab_size=model.config.vocab_size, process_index=process,
      process_count=process_count, compact_vocab=compact)
  fingerprint = train_data.fingerprint
  if resume.step is not None:
    _check_data_fingerprint(resume.meta, fingerprint, data_dir, checkpointer.directory)

  program = TrainProgram(config, model, mesh)
  if resume.step is not None:
    checkpointer.check_layout(resume.step, resume.meta, program.abstract_state)
  start_step, state = _restore(checkpointer, resume, program)
  if process == 0:
    config.to_json(out / "config.json")
    # What `runs.load` needs to rebuild and decode the model without the presets, the
    # HF directory or the data folder.
    (out / "model.json").write_text(json.dumps(dataclasses.asdict(model.config)) + "\n")
    if train_data.vocab is not None:
      train_data.vocab.save(out / data_lib.COMPACT_VOCAB_FILE)
  return _Run(mesh, model, program, train_data, val_data, fingerprint, checkpointer,
              start_step, state)


class _Resume(NamedTuple):
  """The checkpoint a run resumes from (`step` None: from scratch), its meta, and the newer
  checkpoints proven damaged (deleted once the run is restored: their steps are trained
  again)."""
  step: int | None
  meta: dict | None
  damaged: list[int]


def _checkpoint_to_resume(checkpointer: Checkpointer, config_dict: dict[str, Any]) -> _Resume:
  """The newest checkpoint not proven damaged (its files match its checksums, or it has none
  to tell), each damaged newer one reported in one line. Its config must match this run's
  (a ValueError otherwise: a refusal, not damage); one that cannot be read is refused too,
  every checkpoint left in place."""
  directory = checkpointer.directory
  choice = checkpointer.newest_intact()
  for step, problem in choice.damaged:
    _say(f"warning: checkpoint step {step} in {directory} is damaged ({problem}); "
         + (f"resuming from step {choice.step}" if choice.step is not None else
            "no older checkpoint is intact"))
  damaged = [step for step, _ in choice.damaged]
  if choice.step is None:
    return _Resume(None, None, damaged)
  try:
    saved_config, meta = (checkpointer.read_config(choice.step),
                          checkpointer.read_meta(choice.step))
  except Exception as e:  # orbax raises many kinds
    raise ValueError(f"refusing to resume from checkpoint step {choice.step} in {directory}: "
                     f"its config or meta cannot be read ({_reason(e)}); every checkpoint is "
                     "left in place") from e
  checkpointer.check_config(choice.step, config_dict, saved=saved_config)
  if choice.unverified:
    _say(f"warning: checkpoint step {choice.step} in {directory} {choice.unverified}: "
         "resuming from it unverified")
  return _Resume(choice.step, meta, damaged)


def _reason(error: BaseException) -> str:
  """An exception as one line: its type and the first line of its message."""
  lines = str(error).strip().splitlines()
  return type(error).__name__ + (f": {lines[0]}" if lines else "")


def _check_data_fingerprint(meta: dict, fingerprint: str, data_dir: Path,
                            directory: Path) -> None:
  saved = meta.get("data_fingerprint")
  if saved is None:
    _say(f"warning: {directory} was saved without a data fingerprint (an older run); "
         f"resuming on {data_dir} without checking it is the same data")
  elif saved != fingerprint:
    raise ValueError(
        f"refusing to resume from {directory}: the data in {data_dir} is not the data the "
        f"run started on (data fingerprint {fingerprint}, the checkpoint's {saved}); restore "
        "that folder, or use another --out")


def _restore(checkpointer: Checkpointer, resume: _Resume, program: TrainProgram):
  """(start step, state): restored from the checkpoint `resume` names, else (0, fresh state).
  A checkpoint that does not restore is refused (ValueError with the reason), never deleted:
  only the damaged ones are, after a successful restore."""
  if resume.step is None:
    state = program.fresh_state()
  else:
    try:
      state = checkpointer.restore(resume.step, program.abstract_state)
    except Exception as e:  # a shape mismatch, out of memory, ...: not proof of damage
      raise ValueError(f"refusing to resume from checkpoint step {resume.step} in "
                       f"{checkpointer.directory}: it cannot be restored ({_reason(e)}); "
                       "every checkpoint is left in place") from e
  for step in resume.damaged:
    checkpointer.delete(step)
  if resume.step is None and resume.damaged:
    _say(f"warning: no usable checkpoint left in {checkpointer.directory}; the run restarts "
         "from step 0")
  return resume.step or 0, state


def _train(config: TrainConfig, out: Path, run: _Run, wall_start: float) -> dict[str, Any]:
  """Compile, run the steps from run.start_step (eval, checkpoints), write summary.json."""
  is_main = jax.process_index() == 0
  model, program, checkpointer = run.model, run.program, run.checkpointer
  logger = None
  # From here a signal stops the run at the next step boundary (an exception could cut
  # orbax's save in flight), or abandons what is still running INTERRUPT_GRACE_S later.
  with interrupts.deferred(INTERRUPT_GRACE_S,
                           functools.partial(_abandon, checkpointer.directory)) as stop:
    try:
      compile_start = time.perf_counter()
      compiled_step = program.compile()
      compile_s = time.perf_counter() - compile_start
      logger = MetricsLogger(out, config.steps, run.start_step, enabled=is_main,
                             log_every=config.log_every, tensorboard=config.tensorboard)
      logger.message(
          f"{config.init_from or config.model} ({_tree_size(model.abstract_params):,} "
          f"params) | {config.optimizer} lr {program.peak_lr:.3g} | mesh "
          f"{mesh_lib.describe(run.mesh)} x {jax.process_count()} process(es) | "
          f"{config.batch_tokens:,} tokens/step | "
          + (f"resumed at step {run.start_step}" if run.start_step else
             f"from the weights of {config.init_from}" if config.init_from else "from scratch"))
      last_val = _step_loop(config, run, compiled_step, logger, stop)
    except KeyboardInterrupt as e:
      checkpointer.wait()  # the save in flight completes (or the watchdog abandons it)
      signum = stop.signum or interrupts.signal_of(e)
      raise interrupts.Interrupted(_interrupted(checkpointer.directory, signum),
                                   signum) from None
    finally:
      checkpointer.close()
      if logger is not None:
        logger.close()

  summary = _summary(config, out, model, program.abstract_opt, compiled_step, compile_s,
                     last_val, wall_start)
  if is_main:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  if summary["unclipped_in_band"] is False:
    _say(_out_of_band_warning(config, summary["unclipped_fraction"]))
  return summary


def _interrupted(directory: Path, signum: int, abandoned: bool = False) -> str:
  """The one line of an interrupted run: where the same command resumes (and, when the
  process is ending with a save in flight, which checkpoint it abandons)."""
  if abandoned:  # the save in flight can no longer complete after this line is written
    set_aside_partial(directory)
  complete, partial = steps_on_disk(directory)
  line = interrupts.interrupted_by(signum)
  if abandoned and partial:
    line += (f" while checkpoint step {partial[-1]} was being written: abandoned (the next "
             "run removes its partial files)")
  if not complete:
    return line + "; the same command starts again from step 0 (no checkpoint was written yet)"
  return (line + f"; the same command resumes from step {complete[-1]} (the newest checkpoint "
          f"in {directory})")


def _abandon(directory: Path, signum: int) -> None:
  """The watchdog of `interrupts.deferred`: the run did not stop in time; end it now."""
  interrupts.exit_now(f"slj: {_interrupted(directory, signum, abandoned=True)}", signum)


def _out_of_band_warning(config: TrainConfig, unclipped: float) -> str:
  """The one line a Sophia-family run outside the 10-50 % unclipped band ends with."""
  from sophia_lambda_jax import optimizers

  rho = config.optimizer_kwargs.get("rho", inspect.signature(
      optimizers.resolve(config.optimizer).factory).parameters["rho"].default)
  side = ("sign momentum: rho too small" if unclipped < UNCLIPPED_BAND[0] else
          "the clip rarely acts: rho too large")
  hint = ("the rho controller did not reach its target in this run" if rho == "auto" else
          f"rho {rho} is fixed: pass --rho auto, or calibrate rho for this setting")
  return (f"warning: {100 * unclipped:.1f} % of coordinates unclipped over the second half, "
          f"outside the {100 * UNCLIPPED_BAND[0]:.0f}-{100 * UNCLIPPED_BAND[1]:.0f} % band "
          f"Sophia is tuned for ({side}); {hint}")


def _step_loop(config: TrainConfig, run: _Run, compiled_step, logger,
               stop: interrupts.Deferred) -> float | None:
  """Steps run.start_step..config.steps: train, log, evaluate, checkpoint, until `stop`
  records a signal. Returns the last validation loss (None when evaluation is off)."""
  model, program, checkpointer = run.model, run.program, run.checkpointer
  state, config_dict = run.state, config.to_dict()
  accum, batch_shape = config.grad_accum, program.batch_shape
  eval_sharding = mesh_lib.batch_sharding(run.mesh)

  def load_batch(step: int) -> jax.Array:
    rows = run.train_data.batch(step)  # (batch_size / processes, seq + 1)
    if accum > 1:
      # Micro-batch a takes rows a, a + A, a + 2A, ...: the same global rows whatever the
      # number of processes (each process holds a contiguous block of rows).
      rows = rows.reshape(-1, accum, rows.shape[-1]).swapaxes(0, 1)
    return mesh_lib.global_batch(np.ascontiguousarray(rows), program.batch_sharding,
                                 batch_shape)

  def eval_batches(final: bool) -> int:
    batches = config.final_eval_batches if final else config.eval_batches
    return run.val_data.num_batches if batches is None else min(batches,
                                                                run.val_data.num_batches)

  def evaluate(n: int) -> float:
    total = 0.0
    for i in range(n):
      batch = mesh_lib.global_batch(run.val_data.batch(i), eval_sharding,
                                    (config.micro_batch_size, config.seq_len + 1))
      total += float(_host(model.eval_loss(state.params, batch)))
    return total / n

  step_flops = flops.step_flops(config, model.config)
  last_val: float | None = None
  batch = load_batch(run.start_step) if run.start_step < config.steps else None
  for step in range(run.start_step, config.steps):
    if stop.signum is not None:
      raise interrupts.Interrupted(signum=stop.signum)
    t0 = time.perf_counter()
    state, metrics = compiled_step(state, batch)
    if step + 1 < config.steps:
      batch = load_batch(step + 1)  # overlaps the device's work on this step
    metrics = {k: _host(v) for k, v in metrics.items()}
    dt = time.perf_counter() - t0
    done = step + 1
    _check_finite(metrics, done, checkpointer, logger)
    logger.log_step(_step_record(config, metrics, done, dt, warmup=step == run.start_step,
                                 step_flops=step_flops))
    if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
      n = eval_batches(final=done == config.steps)
      last_val = evaluate(n)
      logger.log_eval(done, last_val, n)
    if (config.checkpoint_every and done % config.checkpoint_every == 0) or \
       done == config.steps:
      checkpointer.save(done, state, config_dict, run.data_fingerprint)
  if last_val is None and config.eval_every:  # resumed a run whose last checkpoint is final
    last_val = evaluate(eval_batches(final=True))
  return last_val


def _check_finite(metrics: dict, done: int, checkpointer: Checkpointer, logger) -> None:
  """Stop on a non-finite loss or gradient norm, naming the last good checkpoint."""
  loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
  if math.isfinite(loss) and math.isfinite(grad_norm):
    return
  checkpointer.wait()
  last_good = checkpointer.latest_step()
  logger.log_step({"step": done, "loss": finite_or_none(loss),
                   "grad_norm": finite_or_none(grad_norm),
                   "lr": float(metrics["lr"]), "nonfinite": True})
  raise FloatingPointError(
      f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
      f"(loss={loss}, grad_norm={grad_norm}) at step {done}; stopping. The last good "
      f"checkpoint is "
      + (f"step {last_good} in {checkpointer.directory}" if last_good is not None
         else "none (no checkpoint was written yet)")
      + "; lower the learning rate or check the data.")


def _step_record(config: TrainConfig, metrics: dict, done: int, dt: float,
                 warmup: bool, step_flops: flops.StepFlops) -> dict[str, Any]:
  """The metrics.jsonl record of one step. `warmup` marks the first step a process runs
  (start-up and caches: left out of the summary's timings, for every segment of a resumed
  run)."""
  record = {"step": done, "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
            "grad_norm": float(metrics["grad_norm"]), "step_time_s": dt,
            "tokens_per_s": config.batch_tokens / dt,
            "mfu": step_flops.mfu(config.batch_tokens, dt, bool(metrics.get("refresh")))}
  if warmup:
    record["warmup"] = True
  if "hessian_interval" in metrics:
    refreshed = bool(metrics["refresh"])
    record.update(hessian_interval=int(metrics["hessian_interval"]),
                  hessian_refreshes=int(metrics["hessian_refreshes"]), refresh=refreshed,
                  hessian_skipped=int(metrics["hessian_skipped"]))
    if refreshed:
      record["hessian_relative_change"] = float(metrics["hessian_relative_change"])
  if "rho" in metrics:
    record["rho"] = float(metrics["rho"])
  record.update({k: float(v) for k, v in metrics.items() if k.startswith("clip_fraction")})
  return record


def _summary(config, out, model, abstract_opt, compiled_step, compile_s, last_val,
             wall_start) -> dict[str, Any]:
  """Final losses, throughput, memory and Hessian overhead. Timings come from the step
  records of metrics.jsonl, so a resumed run's cover all its segments; each segment's
  first step is left out of the means as warm-up."""
  records = read_metrics(out / "metrics.jsonl")
  logged = len({r["step"] for r in records if "loss" in r})
  if logged < config.steps:  # the file was deleted or cut while the run was stopped
    _say(f"warning: {out / 'metrics.jsonl'} holds the records of {logged} of the run's "
         f"{config.steps} steps (deleted or cut since); the summary's losses, timings and "
         "clip fractions cover those steps only")
  train_losses = [r["loss"] for r in records if "loss" in r and r.get("loss") is not None]
  tail = train_losses[-max(1, min(10, len(train_losses) // 10)):] if train_losses else []
  timed = [r for r in records if "step_time_s" in r]
  steady = [r for r in timed if not r.get("warmup")] or timed
  times = [r["step_time_s"] for r in steady]
  mean_step = float(np.mean(times)) if times else None
  overhead = None
  if any("refresh" in r for r in steady):
    refresh_t = [r["step_time_s"] for r in steady if r.get("refresh")]
    other_t = [r["step_time_s"] for r in steady if not r.get("refresh")]
    if refresh_t and other_t:
      overhead = {
          "refresh_step_s": float(np.mean(refresh_t)),
          "other_step_s": float(np.mean(other_t)),
          "refresh_over_other": float(np.mean(refresh_t) / np.mean(other_t)),
          "mean_over_other": float(np.mean(times) / np.mean(other_t)),
      }
  unclipped = unclipped_fractions(records, config.steps)
  rhos = [r["rho"] for r in records if isinstance(r.get("rho"), (int, float))]
  skipped = [r["hessian_skipped"] for r in records
             if isinstance(r.get("hessian_skipped"), int)]
  device_peak = None
  stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    device_peak = int(stats["peak_bytes_in_use"])
  return {
      "model": config.model,
      "optimizer": config.optimizer,
      "steps": config.steps,
      "logged_steps": logged,
      "tokens": config.steps * config.batch_tokens,
      "batch_tokens": config.batch_tokens,
      "param_count": _tree_size(model.abstract_params),
      "final_train_loss": float(np.mean(tail)) if tail else None,
      "last_train_loss": train_losses[-1] if train_losses else None,
      "final_val_loss": last_val,
      "final_val_batches": next((r.get("val_batches") for r in reversed(records)
                                 if "val_loss" in r), None),
      "mean_step_s": mean_step,
      "tokens_per_s": config.batch_tokens / mean_step if mean_step else None,
      # mfu over the steady steps and their mean flops_per_token (docs/design.md section 7.1).
      **flops.step_flops(config, model.config).summary(steady),
      "wall_s": time.perf_counter() - wall_start,
      "compile_s": compile_s,
      "peak_memory_bytes": (compiled_memory(compiled_step) or {}).get("total"),
      "device_peak_bytes_in_use": device_peak,
      "opt_state_bytes": _tree_bytes(abstract_opt),
      "hessian_overhead": overhead,
      # 1 - clip fraction over the second half of training (Sophia family; see metrics.py).
      "unclipped_fraction": unclipped.get("all"),
      "unclipped_fraction_by_role": {k: v for k, v in unclipped.items() if k != "all"} or None,
      "unclipped_in_band": in_unclipped_band(unclipped.get("all")),
      # rho of the last update (the controller's with rho "auto"; Sophia family).
      "final_rho": rhos[-1] if rhos else None,
      # Hessian refreshes skipped because their estimate was not finite.
      "hessian_skipped": skipped[-1] if skipped else None,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "backend": jax.default_backend(),
  }


def cli_train(argv: list[str]) -> int:
  """`slj train [flags]`: parse flags (see train.config), run, print the summary."""
  try:
    config = config_from_argv(list(argv))
  except ValueError as e:  # a bad field or value: a usage error, before anything runs
    if os.environ.get("SLJ_DEBUG"):
      raise
    print(f"slj train: error: {e}", file=sys.stderr)
    return 2
  try:
    summary = run_training(config)
  except (ValueError, FileNotFoundError, FloatingPointError, DirectoryInUse) as e:
    if os.environ.get("SLJ_DEBUG"):
      raise
    print(f"slj train: error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(json.dumps({k: summary.get(k) for k in (
        "final_train_loss", "final_val_loss", "tokens_per_s", "wall_s", "peak_memory_bytes",
        "opt_state_bytes")}, indent=2))
  return 0
