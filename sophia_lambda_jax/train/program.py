"""The program of a training run: the model as functions, the optimizer, the shardings of the
state, the compiled train step, and the state it starts from.

- `ModelFunctions`: the Qwen model of a config as pure functions (features, logical axes,
  a jitted init and eval, cached across runs in one process);
- `TrainProgram`: the config's optimizer (`TrainConfig.resolve_optimizer`) with its
  learning-rate schedule (`train.schedule`), the shardings of params, optimizer state and
  batches, a fresh state, and the train step compiled ahead of time; the benchmarks time
  its `compile()` directly;
- where a run starts: `checkpoint_to_resume` picks the newest checkpoint not proven damaged
  (its config checked against this run's), `check_data_fingerprint` refuses other data, and
  `restore` returns the restored state, or a fresh one.

`loop.run_training` puts these together with the data and runs the steps.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sophia_lambda_jax import labels, optimizers
from sophia_lambda_jax.models import hf, qwen
from sophia_lambda_jax.train import mesh as mesh_lib
from sophia_lambda_jax.train.checkpoint import Checkpointer
from sophia_lambda_jax.train.config import ResolvedOptimizer, TrainConfig
from sophia_lambda_jax.train.metrics import say
from sophia_lambda_jax.train.schedule import learning_rate_schedule
from sophia_lambda_jax.train.step import TrainState, make_eval_step, make_train_step


def optimizer_metrics(opt_state, roles=None) -> dict[str, jax.Array]:
  """Refresh interval, refresh count, refreshes skipped for a non-finite estimate, rho and
  clipped fraction of a Sophia-family state.

  roles: optional pytree like params of role names (``labels.label_params``); the clipped
  fraction is then also reported per role as "clip_fraction/<role>" (the tied embedding is
  about half of a small model's coordinates, so the overall fraction can hide the rest).
  """
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
  return jax.tree.map(lambda info: info.role,
                      labels.label_params(abstract_params, strict=False),
                      is_leaf=lambda x: isinstance(x, labels.ParamInfo))


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
  comparison of several optimizers compiles them once). `optimizer`: the config's resolved
  optimizer (its estimator picks the attention); None resolves it here.
  """

  def __init__(self, config: TrainConfig, mesh, optimizer: ResolvedOptimizer | None = None):
    optimizer = optimizer or config.resolve_optimizer()
    overrides = dict(config.model_overrides, compute_dtype=config.compute_dtype)
    if optimizer.estimator == "hutchinson":
      # Its Hessian-vector products differentiate the attention twice; cuDNN's kernel
      # has no forward-mode derivative.
      overrides["attention"] = "xla"
    self.init_from, self.overrides = config.init_from, overrides
    self.init_compact_vocab = None
    if config.init_from:
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
      weights = qwen.split_params(hf.from_hf(self.init_from, **self.overrides))[1]
      # Host arrays: every process read the same files, each puts its own shards.
      return jax.device_put(jax.tree.map(np.asarray, weights), self.shardings)
    return _jitted_param_init(*self._key(), self.seed)()

  def eval_loss(self, params, batch):
    return _jitted_eval(*self._key())(params, batch)


@functools.lru_cache(maxsize=8)
def _abstract_model(model_config):
  abstract = nnx.eval_shape(lambda: qwen.Qwen(model_config, rngs=nnx.Rngs(0)))
  graphdef, params = qwen.split_params(abstract)
  if jax.tree.leaves(graphdef[1]):  # non-parameter state: take it from a real model
    graphdef = qwen.split_params(qwen.Qwen(model_config, rngs=nnx.Rngs(0)))[0]
  return graphdef, params


def _features_fn(graphdef, mesh):
  def features(params, input_ids):
    return qwen.features(graphdef, mesh_lib.gather_for_compute(params, mesh), input_ids)
  return features


@functools.lru_cache(maxsize=8)
def _jitted_param_init(model_config, mesh, treedef, spec_leaves, seed):
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
  `optimizer`: the config's resolved optimizer (what `config.validate()` returned); None
  resolves it here.
  """

  def __init__(self, config: TrainConfig, model: ModelFunctions, mesh,
               optimizer: ResolvedOptimizer | None = None):
    self.config, self.model, self.mesh = config, model, mesh
    self.optimizer = optimizer or config.resolve_optimizer()
    # Optimizer with the config's schedule; batch_tokens from the global batch.
    self.peak_lr = self.optimizer.peak_learning_rate(model.config.hidden_size)
    self.schedule = learning_rate_schedule(config, self.peak_lr)
    self.tx = self.optimizer.build(self.schedule)
    self.estimator = self.optimizer.estimator

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


class Resume(NamedTuple):
  """The checkpoint a run resumes from (`step` None: from scratch), its meta, and the newer
  checkpoints proven damaged (deleted once the run is restored: their steps are trained
  again)."""
  step: int | None
  meta: dict | None
  damaged: list[int]


def checkpoint_to_resume(checkpointer: Checkpointer, config_dict: dict[str, Any]) -> Resume:
  """The newest checkpoint not proven damaged (its files match its checksums, or it has none
  to tell), each damaged newer one reported in one line. Its config must match this run's
  (a ValueError otherwise: a refusal, not damage); one that cannot be read is refused too,
  every checkpoint left in place."""
  directory = checkpointer.directory
  choice = checkpointer.newest_intact()
  for step, problem in choice.damaged:
    say(f"warning: checkpoint step {step} in {directory} is damaged ({problem}); "
        + (f"resuming from step {choice.step}" if choice.step is not None else
           "no older checkpoint is intact"))
  damaged = [step for step, _ in choice.damaged]
  if choice.step is None:
    return Resume(None, None, damaged)
  try:
    saved_config, meta = (checkpointer.read_config(choice.step),
                          checkpointer.read_meta(choice.step))
  except Exception as e:  # orbax raises many kinds
    raise ValueError(f"refusing to resume from checkpoint step {choice.step} in {directory}: "
                     f"its config or meta cannot be read ({_reason(e)}); every checkpoint is "
                     "left in place") from e
  checkpointer.check_config(choice.step, config_dict, saved=saved_config)
  if choice.unverified:
    say(f"warning: checkpoint step {choice.step} in {directory} {choice.unverified}: "
        "resuming from it unverified")
  return Resume(choice.step, meta, damaged)


def _reason(error: BaseException) -> str:
  """An exception as one line: its type and the first line of its message."""
  lines = str(error).strip().splitlines()
  return type(error).__name__ + (f": {lines[0]}" if lines else "")


def check_data_fingerprint(meta: dict, fingerprint: str, data_dir: Path,
                           directory: Path) -> None:
  """Refuse to resume on other data than the checkpoint's (a run saved without a
  fingerprint resumes with a warning)."""
  saved = meta.get("data_fingerprint")
  if saved is None:
    say(f"warning: {directory} was saved without a data fingerprint (an older run); "
        f"resuming on {data_dir} without checking it is the same data")
  elif saved != fingerprint:
    raise ValueError(
        f"refusing to resume from {directory}: the data in {data_dir} is not the data the "
        f"run started on (data fingerprint {fingerprint}, the checkpoint's {saved}); restore "
        "that folder, or use another --out")


def restore(checkpointer: Checkpointer, resume: Resume, program: TrainProgram):
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
    say(f"warning: no usable checkpoint left in {checkpointer.directory}; the run restarts "
        "from step 0")
  return resume.step or 0, state
