"""`run_training(config)`: build everything, resume if possible, train, evaluate, summarise.

The program of a run (model functions, optimizer, shardings, compiled step, the state it
starts from) is `train.program`; this module runs it: data, the steps, logging, evaluation,
checkpoint cadence, interrupts and the summary.

Order of a run:
1. the config validated (its optimizer resolved once, `TrainConfig.validate`), jax.distributed
   (multi-host), the lock on <out> (process 0) and the device mesh;
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
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from sophia_lambda_jax import data as data_lib
from sophia_lambda_jax import interrupts
from sophia_lambda_jax.directory_lock import DirectoryInUse, directory_lock
from sophia_lambda_jax.train import flops
from sophia_lambda_jax.train import mesh as mesh_lib
from sophia_lambda_jax.train.checkpoint import Checkpointer, set_aside_partial, steps_on_disk
from sophia_lambda_jax.train.config import ResolvedOptimizer, TrainConfig, config_from_argv
from sophia_lambda_jax.train.metrics import (UNCLIPPED_BAND, MetricsLogger, finite_or_none,
                                             in_unclipped_band, read_metrics, say,
                                             unclipped_fractions)
from sophia_lambda_jax.train.program import (ModelFunctions, Resume, TrainProgram,
                                             check_data_fingerprint, checkpoint_to_resume,
                                             compiled_memory, restore)


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


# Seconds a stop requested by Ctrl-C or SIGTERM may take: the step in flight finishes and
# so does the checkpoint being written, unless it takes longer; then it is abandoned
# (`interrupts.deferred`) and the process exits within about this time of the signal.
INTERRUPT_GRACE_S = 10.0


def run_training(config: TrainConfig) -> dict[str, Any]:
  """Train (or resume) one run; returns the summary also written to <out>/summary.json.

  Only one process writes into a run directory: process 0 holds `<out>/.lock` for the run
  (a second `slj train` on the same --out is refused at once, naming the holder's PID)."""
  wall_start = time.perf_counter()
  optimizer = config.validate()
  mesh_lib.initialize_distributed(config.coordinator, config.num_processes, config.process_id)
  out = config.resolved_out().absolute()
  lock = (directory_lock(out, what="training run") if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    # An existing run in `out` is resumed only with the same trajectory-changing settings:
    # refuse before building anything.
    checkpointer = Checkpointer(out / "checkpoints", keep=config.keep_checkpoints)
    try:
      resume = checkpoint_to_resume(checkpointer, config.to_dict())
    except BaseException:
      checkpointer.close()
      raise
    summary_path = out / "summary.json"
    if resume.step == config.steps and summary_path.is_file():
      checkpointer.close()
      say(f"{out}: this run already finished its {config.steps} steps; nothing to do "
          f"({summary_path.name} left as it is)")
      return json.loads(summary_path.read_text())
    try:
      run = _set_up(config, optimizer, out, checkpointer, resume)
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


def _set_up(config: TrainConfig, optimizer: ResolvedOptimizer, out: Path,
            checkpointer: Checkpointer, resume: Resume) -> _Run:
  """Mesh, data (its fingerprint checked against the checkpoint's), model, program, and the
  state: restored from the checkpoint `resume` names, or initialised."""
  process, process_count = jax.process_index(), jax.process_count()
  mesh = mesh_lib.make_mesh(config.mesh)
  if config.micro_batch_size % mesh.size:
    raise ValueError(
        f"batch_size / grad_accum = {config.micro_batch_size} sequences must be divisible by "
        f"the {mesh.size} devices of mesh {config.mesh!r} (the batch is split over data and "
        "fsdp)")

  # Data: each process reads only its rows of every global batch.
  model = ModelFunctions(config, mesh, optimizer)
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
    check_data_fingerprint(resume.meta, fingerprint, data_dir, checkpointer.directory)

  program = TrainProgram(config, model, mesh, optimizer)
  if resume.step is not None:
    checkpointer.check_layout(resume.step, resume.meta, program.abstract_state)
  start_step, state = restore(checkpointer, resume, program)
  if process == 0:
    config.to_json(out / "config.json")
    # What `runs.load` needs to rebuild and decode the model without the presets, the
    # HF directory or the data folder.
    (out / "model.json").write_text(json.dumps(dataclasses.asdict(model.config)) + "\n")
    if train_data.vocab is not None:
      train_data.vocab.save(out / data_lib.COMPACT_VOCAB_FILE)
  return _Run(mesh, model, program, train_data, val_data, fingerprint, checkpointer,
              start_step, state)


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
      step_flops = flops.step_flops(config, model.config, program.optimizer.estimator)
      logger = MetricsLogger(out, config.steps, run.start_step, enabled=is_main,
                             log_every=config.log_every, tensorboard=config.tensorboard)
      logger.message(
          f"{config.init_from or config.model} ({_tree_size(model.abstract_params):,} "
          f"params) | {config.optimizer} lr {program.peak_lr:.3g} | mesh "
          f"{mesh_lib.describe(run.mesh)} x {jax.process_count()} process(es) | "
          f"{config.batch_tokens:,} tokens/step | "
          + (f"resumed at step {run.start_step}" if run.start_step else
             f"from the weights of {config.init_from}" if config.init_from else "from scratch"))
      last_val = _step_loop(config, run, compiled_step, logger, stop, step_flops)
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
                     last_val, wall_start, step_flops)
  if is_main:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  if summary["unclipped_in_band"] is False:
    say(_out_of_band_warning(program.optimizer, summary["unclipped_fraction"]))
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


def _out_of_band_warning(optimizer: ResolvedOptimizer, unclipped: float) -> str:
  """The one line a Sophia-family run outside the 10-50 % unclipped band ends with."""
  rho = optimizer.hyperparameter("rho")
  side = ("sign momentum: rho too small" if unclipped < UNCLIPPED_BAND[0] else
          "the clip rarely acts: rho too large")
  hint = ("the rho controller did not reach its target in this run" if rho == "auto" else
          f"rho {rho} is fixed: pass --rho auto, or calibrate rho for this setting")
  return (f"warning: {100 * unclipped:.1f} % of coordinates unclipped over the second half, "
          f"outside the {100 * UNCLIPPED_BAND[0]:.0f}-{100 * UNCLIPPED_BAND[1]:.0f} % band "
          f"Sophia is tuned for ({side}); {hint}")


def _step_loop(config: TrainConfig, run: _Run, compiled_step, logger,
               stop: interrupts.Deferred, step_flops: flops.StepFlops) -> float | None:
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
             wall_start, step_flops: flops.StepFlops) -> dict[str, Any]:
  """Final losses, throughput, memory and Hessian overhead. Timings come from the step
  records of metrics.jsonl, so a resumed run's cover all its segments; each segment's
  first step is left out of the means as warm-up."""
  records = read_metrics(out / "metrics.jsonl")
  logged = len({r["step"] for r in records if "loss" in r})
  if logged < config.steps:  # the file was deleted or cut while the run was stopped
    say(f"warning: {out / 'metrics.jsonl'} holds the records of {logged} of the run's "
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
      **step_flops.summary(steady),
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
