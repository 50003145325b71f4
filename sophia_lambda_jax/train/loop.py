"""`run_training(config)`: build everything, resume if possible, train, evaluate, summarise.

Order of a run:
1. jax.distributed (multi-host) and the device mesh;
2. data (`TokenBatches`, each process reads only its rows), model, schedule, optimizer;
3. shardings for params (logical axes -> mesh), optimizer state and batches;
4. state: restored from the newest complete checkpoint in <out>/checkpoints (after checking
   that the trajectory-changing config fields match), else initialised under jit directly
   into its shardings;
5. the jitted step, compiled ahead of time (its compiled memory analysis gives the peak
   device memory), then the loop: step, metrics, eval every eval_every, checkpoint every
   checkpoint_every, NaN/Inf guard;
6. summary.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from sophia_lambda_jax.train import mesh as mesh_lib
from sophia_lambda_jax.train.checkpoint import Checkpointer
from sophia_lambda_jax.train.config import TrainConfig, config_from_argv
from sophia_lambda_jax.train.metrics import (MetricsLogger, finite_or_none, read_metrics,
                                             unclipped_fractions)
from sophia_lambda_jax.train.step import TrainState, make_eval_step, make_train_step


def learning_rate_schedule(config: TrainConfig, peak: float) -> optax.Schedule:
  """Linear warmup 0 -> peak over warmup steps, then cosine to final_lr_fraction * peak."""
  warmup = config.resolved_warmup_steps()
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(config.steps, warmup + 1), end_value=peak * config.final_lr_fraction)


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
  """Refresh interval, refresh count and clipped fraction of a Sophia-family state.

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
  fraction = optimizers.clip_fraction(opt_state)
  if fraction is not None:
    out["clip_fraction"] = jnp.asarray(fraction, jnp.float32)
    if roles is not None:
      by_role = optimizers.clip_fraction(opt_state, roles)
      out.update({f"clip_fraction/{r}": jnp.asarray(f, jnp.float32)
                  for r, f in by_role.items()})
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


def _peak_memory(compiled) -> int | None:
  """Peak device bytes of one step from XLA's compiled memory analysis."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


class _Model:
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
    self.init_from, self.overrides = config.init_from, overrides
    if config.init_from:
      from sophia_lambda_jax.models import hf

      self.config = hf.config_from_hf(hf.read_config(config.init_from), **overrides)
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

  def __init__(self, config: TrainConfig, model: "_Model", mesh):
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

  def lower(self):
    abstract_batch = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32,
                                          sharding=self.batch_sharding)
    return jax.jit(
        self.train_step(), in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,),
    ).lower(self.abstract_state, abstract_batch)

  def compile(self):
    """The jitted step compiled ahead of time: compiled(state, batch) -> (state, metrics);
    the state argument is donated."""
    return self.lower().compile()


def run_training(config: TrainConfig) -> dict[str, Any]:
  """Train (or resume) one run; returns the summary also written to <out>/summary.json."""
  wall_start = time.perf_counter()
  config.validate()
  mesh_lib.initialize_distributed(config.coordinator, config.num_processes, config.process_id)
  from sophia_lambda_jax import data as data_lib

  process, process_count = jax.process_index(), jax.process_count()
  is_main = process == 0
  out = config.resolved_out().absolute()
  config_dict = config.to_dict()
  mesh = mesh_lib.make_mesh(config.mesh)
  if config.micro_batch_size % mesh.size:
    raise ValueError(
        f"batch_size / grad_accum = {config.micro_batch_size} sequences must be divisible by "
        f"the {mesh.size} devices of mesh {config.mesh!r} (the batch is split over data and "
        "fsdp)")

  # An existing run in `out` is resumed only with the same trajectory-changing settings;
  # refuse before building anything.
  if is_main:
    out.mkdir(parents=True, exist_ok=True)
  checkpointer = Checkpointer(out / "checkpoints", keep=config.keep_checkpoints)
  start_step = checkpointer.latest_step()
  if start_step is not None:
    checkpointer.check_config(start_step, config_dict)

  # Data: each process reads only its rows of every global batch.
  model = _Model(config, mesh)
  data_dir = data_lib.resolve_data(config.data)
  data_vocab = int(data_lib.load_manifest(data_dir)["vocab_size"])
  if config.init_from and model.config.vocab_size < data_vocab:
    raise ValueError(
        f"--init-from {config.init_from} has vocab_size {model.config.vocab_size}, but "
        f"{data_dir} holds token ids of a {data_vocab}-token vocabulary; starting from a "
        f"checkpoint needs its full vocabulary (no compact remapping of its rows)")
  train_data = data_lib.TokenBatches(
      data_dir, "train", config.batch_size, config.seq_len, config.seed,
      vocab_size=model.config.vocab_size, process_index=process,
      process_count=process_count)
  val_data = data_lib.TokenBatches(
      data_dir, "val", config.micro_batch_size, config.seq_len, config.seed,
      vocab_size=model.config.vocab_size, process_index=process,
      process_count=process_count)

  program = TrainProgram(config, model, mesh)
  accum, batch_shape = config.grad_accum, program.batch_shape
  batch_sharding = program.batch_sharding
  eval_sharding = mesh_lib.batch_sharding(mesh)

  # Resume from the newest complete checkpoint (its config was checked above), or start
  # fresh.
  if start_step is not None:
    state = checkpointer.restore(start_step, program.abstract_state)
  else:
    start_step = 0
    state = program.fresh_state()
  if is_main:
    config.to_json(out / "config.json")
    # What `models.load` needs to rebuild and decode the model without the presets, the
    # HF directory or the data folder.
    (out / "model.json").write_text(json.dumps(dataclasses.asdict(model.config)) + "\n")
    if train_data.vocab is not None:
      train_data.vocab.save(out / data_lib.COMPACT_VOCAB_FILE)

  compile_start = time.perf_counter()
  compiled_step = program.compile()
  compile_s = time.perf_counter() - compile_start

  def load_batch(step: int) -> jax.Array:
    rows = train_data.batch(step)  # (batch_size / processes, seq + 1)
    if accum > 1:
      # Micro-batch a takes rows a, a + A, a + 2A, ...: the same global rows whatever the
      # number of processes (each process holds a contiguous block of rows).
      rows = rows.reshape(-1, accum, rows.shape[-1]).swapaxes(0, 1)
    return mesh_lib.global_batch(np.ascontiguousarray(rows), batch_sharding, batch_shape)

  def evaluate() -> float:
    n = min(config.eval_batches, val_data.num_batches)
    total = 0.0
    for i in range(n):
      batch = mesh_lib.global_batch(val_data.batch(i), eval_sharding,
                                    (config.micro_batch_size, config.seq_len + 1))
      total += float(_host(model.eval_loss(state.params, batch)))
    return total / n

  logger = MetricsLogger(out, config.steps, start_step, enabled=is_main,
                         log_every=config.log_every, tensorboard=config.tensorboard)
  logger.message(
      f"{config.init_from or config.model} ({_tree_size(model.abstract_params):,} params) | "
      f"{config.optimizer} lr {program.peak_lr:.3g} | mesh {mesh_lib.describe(mesh)} x "
      f"{process_count} process(es) | {config.batch_tokens:,} tokens/step | "
      + (f"resumed at step {start_step}" if start_step else "from scratch"))

  step_times: list[float] = []
  refresh_flags: list[bool] = []
  last_val: float | None = None
  try:
    batch = load_batch(start_step) if start_step < config.steps else None
    for step in range(start_step, config.steps):
      t0 = time.perf_counter()
      state, metrics = compiled_step(state, batch)
      if step + 1 < config.steps:
        batch = load_batch(step + 1)  # overlaps the device's work on this step
      metrics = {k: _host(v) for k, v in metrics.items()}
      dt = time.perf_counter() - t0
      done = step + 1
      loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
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
      step_times.append(dt)
      record = {"step": done, "loss": loss, "lr": float(metrics["lr"]),
                "grad_norm": grad_norm, "step_time_s": dt,
                "tokens_per_s": config.batch_tokens / dt}
      if "hessian_interval" in metrics:
        refreshed = bool(metrics["refresh"])
        refresh_flags.append(refreshed)
        record.update(hessian_interval=int(metrics["hessian_interval"]),
                      hessian_refreshes=int(metrics["hessian_refreshes"]), refresh=refreshed)
        if refreshed:
          record["hessian_relative_change"] = float(metrics["hessian_relative_change"])
      record.update({k: float(v) for k, v in metrics.items() if k.startswith("clip_fraction")})
      logger.log_step(record)
      if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
        last_val = evaluate()
        logger.log_eval(done, last_val)
      if (config.checkpoint_every and done % config.checkpoint_every == 0) or \
         done == config.steps:
        checkpointer.save(done, state, config_dict)
    if last_val is None and config.eval_every:  # resumed a finished run
      last_val = evaluate()
  finally:
    checkpointer.close()
    logger.close()

  summary = _summary(config, out, model, program.abstract_opt, compiled_step, compile_s,
                     step_times, refresh_flags, last_val, wall_start)
  if is_main:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _summary(config, out, model, abstract_opt, compiled_step, compile_s, step_times,
             refresh_flags, last_val, wall_start) -> dict[str, Any]:
  """Final losses, throughput, memory and Hessian overhead (timings of this process's steps;
  the first step after start-up is left out of the means as warm-up)."""
  records = [r for r in read_metrics(out / "metrics.jsonl")] \
      if (out / "metrics.jsonl").exists() else []
  train_losses = [r["loss"] for r in records if "loss" in r and r.get("loss") is not None]
  tail = train_losses[-max(1, min(10, len(train_losses) // 10)):] if train_losses else []
  times = step_times[1:] if len(step_times) > 1 else step_times
  flags = refresh_flags[1:] if len(refresh_flags) > 1 else refresh_flags
  mean_step = float(np.mean(times)) if times else None
  overhead = None
  if flags:
    refresh_t = [t for t, f in zip(times, flags) if f]
    other_t = [t for t, f in zip(times, flags) if not f]
    if refresh_t and other_t:
      overhead = {
          "refresh_step_s": float(np.mean(refresh_t)),
          "other_step_s": float(np.mean(other_t)),
          "refresh_over_other": float(np.mean(refresh_t) / np.mean(other_t)),
          "mean_over_other": float(np.mean(times) / np.mean(other_t)),
      }
  unclipped = unclipped_fractions(records, config.steps)
  device_peak = None
  stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    device_peak = int(stats["peak_bytes_in_use"])
  return {
      "model": config.model,
      "optimizer": config.optimizer,
      "steps": config.steps,
      "tokens": config.steps * config.batch_tokens,
      "batch_tokens": config.batch_tokens,
      "param_count": _tree_size(model.abstract_params),
      "final_train_loss": float(np.mean(tail)) if tail else None,
      "last_train_loss": train_losses[-1] if train_losses else None,
      "final_val_loss": last_val,
      "mean_step_s": mean_step,
      "tokens_per_s": config.batch_tokens / mean_step if mean_step else None,
      "wall_s": time.perf_counter() - wall_start,
      "compile_s": compile_s,
      "peak_memory_bytes": _peak_memory(compiled_step),
      "device_peak_bytes_in_use": device_peak,
      "opt_state_bytes": _tree_bytes(abstract_opt),
      "hessian_overhead": overhead,
      # 1 - clip fraction over the second half of training (Sophia family; see metrics.py).
      "unclipped_fraction": unclipped.pop("all", None),
      "unclipped_fraction_by_role": unclipped or None,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "backend": jax.default_backend(),
  }


def cli_train(argv: list[str]) -> int:
  """`slj train [flags]`: parse flags (see train.config), run, print the summary."""
  try:
    config = config_from_argv(list(argv))
    summary = run_training(config)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"slj train: error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(json.dumps({k: summary[k] for k in (
        "final_train_loss", "final_val_loss", "tokens_per_s", "wall_s", "peak_memory_bytes",
        "opt_state_bytes")}, indent=2))
  return 0
