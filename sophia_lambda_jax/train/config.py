"""Training configuration: one dataclass, a JSON file format and command-line flags.

A run is fully described by a `TrainConfig`. It can come from three places, later ones
overriding earlier ones:

1. the defaults below;
2. a JSON file (`--config run.json`) holding an object whose keys are field names, e.g.
   ``{"model": "qwen-tiny", "optimizer": "sophia_lambda", "optimizer_kwargs": {"rho": 0.03},
   "steps": 500, "mesh": "data=2,fsdp=4"}``; unknown keys are an error;
3. command-line flags, one per field with dashes (`--batch-size 32`), plus
   - `--opt.NAME VALUE` or `--NAME VALUE` for any hyperparameter a registered optimizer
     accepts (docs/design.md section 2.1): `--opt.rho 0.03`, `--rho 0.03`,
     `--hessian-interval 20`; values are parsed as JSON when they parse (numbers,
     true/false, null, objects) and kept as strings otherwise;
   - `--model.NAME VALUE` for a model-config override (`--model.num_layers 6`).

The config that a run used is written to `<out>/config.json` in this same format, so
`slj train --config runs/x/config.json` repeats it.

`batch_tokens` (tokens per optimizer step, which Sophia-G and Sophia-Lambda need) is not a
field: it is derived as `batch_size * seq_len` (batch_size counts sequences per optimizer
step over all devices, hosts and accumulation steps), so it can never disagree with the
batch that is actually used.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
from pathlib import Path
from typing import Any

import optax

from sophia_lambda_jax import optimizers
from sophia_lambda_jax.models import qwen
from sophia_lambda_jax.train.schedule import SCHEDULES, decay_steps

# Peak learning rates for `learning_rate=None` are each optimizer's
# `OptimizerSpec.base_learning_rate`, set for a model of hidden size 128 (qwen-cpu) and scaled
# as 1/width (the muP rule for hidden matrices under Adam-type updates).
_BASE_WIDTH = 128
# Hyperparameters that are not `--opt.*` flags: `learning_rate` is a field of its own (it
# becomes the peak of the `schedule`), `batch_tokens` is derived, `mask` is not JSON.
_NOT_OPTIMIZER_FLAGS = ("learning_rate", "batch_tokens", "mask")


def optimizer_hyperparameters() -> tuple[str, ...]:
  """Every hyperparameter name that some registered optimizer accepts (`--opt.NAME`)."""
  names = dict.fromkeys(name for spec in optimizers.OPTIMIZERS.values()
                        for name in spec.hyperparameters())
  return tuple(n for n in names if n not in _NOT_OPTIMIZER_FLAGS)


# Fields that change the trajectory of a run: resuming a checkpoint with any of them changed
# is refused (docs/design.md section 7: resume continues identically). The others (out,
# steps to log, eval and checkpoint cadence, mesh, distributed set-up) may change between
# restarts.
RESUME_MUST_MATCH = (
    "model", "model_overrides", "init_from", "compute_dtype", "optimizer", "optimizer_kwargs",
    "hessian_estimator", "learning_rate", "schedule", "warmup_steps", "decay_fraction",
    "final_lr_fraction", "steps",
    "batch_size", "seq_len",
    "grad_accum", "grad_clip", "data", "seed")
# Fields a finished run's results depend on: the trajectory and how the final validation
# loss is measured. A comparison reuses a finished run only when these match its plan.
RESULTS_DEPEND_ON = RESUME_MUST_MATCH + ("eval_batches", "final_eval_batches")


@dataclasses.dataclass(frozen=True)
class ResolvedOptimizer:
  """The optimizer of a `TrainConfig`, resolved from the registry once
  (`TrainConfig.resolve_optimizer`): validation, the training loop and the benchmarks all
  build the optimizer from it, so they build the same one.

  Attributes:
    spec: the registry record (name, factory, base learning rate).
    kwargs: the factory's keyword arguments but the learning rate: the config's
      optimizer_kwargs, plus a GNB-scaled optimizer's batch_tokens (B: the tokens per step
      under the GNB estimator, 1 under Hutchinson).
    estimator: the curvature estimate the train step hands to ``update`` as ``hessian_fn``
      ("gnb" or "hutchinson"); None for first-order optimizers.
    learning_rate: the config's peak learning rate; None: the optimizer's default
      (`peak_learning_rate`).
  """
  spec: optimizers.OptimizerSpec
  kwargs: dict[str, Any]
  estimator: str | None
  learning_rate: float | None

  @property
  def name(self) -> str:
    return self.spec.name

  def peak_learning_rate(self, hidden_size: int) -> float:
    """The configured peak, else the optimizer's base_learning_rate scaled to the width."""
    if self.learning_rate is not None:
      return float(self.learning_rate)
    return self.spec.base_learning_rate * _BASE_WIDTH / hidden_size

  def build(self, learning_rate: float | optax.Schedule
            ) -> optax.GradientTransformationExtraArgs:
    """The optax transformation, with `learning_rate` (a number or a schedule)."""
    return self.spec.build(learning_rate=learning_rate, **self.kwargs)

  def hyperparameter(self, name: str) -> Any:
    """The value of hyperparameter `name`: the configured one, else the factory's default."""
    if name in self.kwargs:
      return self.kwargs[name]
    return inspect.signature(self.spec.factory).parameters[name].default


@dataclasses.dataclass
class TrainConfig:
  """Everything one training run needs. Field order is the order of the flags."""

  # Model: a preset of `sophia_lambda_jax.models.qwen.PRESETS` and field overrides.
  model: str = "qwen-cpu"
  model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  # A HuggingFace Qwen2 directory to start from: its config.json replaces the preset (the
  # model_overrides still apply, e.g. scan_layers) and its weights the random init.
  init_from: str | None = None
  # Activation/matmul dtype; parameters and optimizer state stay float32 ("master" copy).
  compute_dtype: str = "bfloat16"

  # Optimizer: a name of `sophia_lambda_jax.OPTIMIZERS` and its hyperparameters.
  optimizer: str = "adamw"
  optimizer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Curvature estimator of a second-order optimizer: None -> the optimizer's own (GNB for
  # Sophia-G and Sophia-Lambda, Hutchinson for Sophia-H); "hutchinson" swaps a GNB
  # optimizer's estimator (its batch_tokens factor B becomes 1, as in Sophia-H).
  hessian_estimator: str | None = None
  # Peak learning rate; None -> the optimizer's base_learning_rate * 128 / hidden_size.
  learning_rate: float | None = None
  # Learning-rate schedule (train/schedule.py, docs/design.md section 7), each after a linear
  # warmup from 0 over warmup_steps: "cosine" decays to final_lr_fraction * peak at `steps`;
  # "constant" stays at the peak; "wsd" (warmup-stable-decay) stays at the peak, then decays
  # linearly to final_lr_fraction * peak over the last decay_fraction of the steps.
  schedule: str = "cosine"
  # None -> steps // 10.
  warmup_steps: int | None = None
  decay_fraction: float = 0.2
  final_lr_fraction: float = 0.1
  # Global-norm gradient clipping threshold (optax.clip_by_global_norm); None disables.
  grad_clip: float | None = 1.0

  # Run length and batch. batch_size counts sequences per optimizer step over all devices
  # and hosts; with grad_accum > 1 each step runs grad_accum micro-batches of
  # batch_size // grad_accum sequences.
  steps: int = 200
  batch_size: int = 16
  seq_len: int = 128
  grad_accum: int = 1

  # Data: "builtin" or a directory written by `slj tokenize` (see sophia_lambda_jax.data).
  data: str = "builtin"
  # Device mesh "data=D,fsdp=F" (D*F devices; "auto" = data=1, fsdp=all devices).
  mesh: str = "data=1,fsdp=1"
  # Run directory: metrics.jsonl, summary.json, config.json, checkpoints/.
  # None -> runs/<model>-<optimizer>-s<seed>.
  out: str | None = None
  seed: int = 0

  # Evaluation, logging and checkpoint cadence, in optimizer steps. Evaluation also runs at
  # the last step; eval_every=0 disables it. checkpoint_every=0 checkpoints only at the end.
  eval_every: int = 50
  eval_batches: int = 8
  # Validation batches of the last evaluation, the run's final_val_loss; None: the whole
  # validation split (each batch once).
  final_eval_batches: int | None = None
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  # Write TensorBoard event files when tensorboardX (or torch's writer) is installed.
  tensorboard: bool = True

  # Multi-host: jax.distributed.initialize arguments. When all are None, JAX's own cluster
  # auto-detection (SLURM, Open MPI, TPU pods, ...) is tried only when a cluster environment
  # is visible; otherwise the run is single-process.
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    self.validate()

  # ------------------------------------------------------------------------- validation
  def validate(self) -> ResolvedOptimizer:
    """Raise ValueError naming the field for any value that cannot work; return the
    resolved optimizer, which validation builds (cheap, no arrays) to check its
    hyperparameters."""
    _check_types(self)

    def positive_int(name):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def non_negative_int(name):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches",
                 "keep_checkpoints", "log_every"):
      positive_int(name)
    for name in ("eval_every", "checkpoint_every"):
      non_negative_int(name)
    if self.steps > _MAX_STEPS:
      raise ValueError(f"steps must be at most {_MAX_STEPS:,} (the step counter is a 32-bit "
                       f"integer), got {self.steps:,}")
    if self.warmup_steps is not None:
      non_negative_int("warmup_steps")
    if self.final_eval_batches is not None:
      positive_int("final_eval_batches")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                       f"({self.grad_accum})")
    if self.learning_rate is not None and not (
        isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
        and self.learning_rate > 0):
      raise ValueError(f"learning_rate must be a finite number > 0 or None, "
                       f"got {self.learning_rate!r}")
    if self.grad_clip is not None and not (
        isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
      raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
    if not 0.0 <= self.final_lr_fraction <= 1.0:
      raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
    if not 0.0 < self.decay_fraction <= 1.0:
      raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
    if self.schedule == "wsd" and (
        self.resolved_warmup_steps() + decay_steps(self.steps, self.decay_fraction)
        > self.steps):
      raise ValueError(
          f"decay_fraction {self.decay_fraction} with warmup_steps "
          f"{self.resolved_warmup_steps()}: warmup and decay of the wsd schedule take more "
          f"than the {self.steps} steps; lower decay_fraction or warmup_steps")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', "
                       f"got {self.compute_dtype!r}")
    if not isinstance(self.optimizer_kwargs, dict):
      raise ValueError(f"optimizer_kwargs must be a dict, got {self.optimizer_kwargs!r}")
    if not isinstance(self.model_overrides, dict):
      raise ValueError(f"model_overrides must be a dict, got {self.model_overrides!r}")
    for name in ("batch_tokens", "learning_rate"):
      if name in self.optimizer_kwargs:
        where = ("it is derived as batch_size * seq_len" if name == "batch_tokens" else
                 "use the learning_rate field (--learning-rate)")
        raise ValueError(f"optimizer_kwargs must not contain {name!r}: {where}")
    if "compute_dtype" in self.model_overrides:
      raise ValueError("model_overrides must not contain 'compute_dtype': use the "
                       "compute_dtype field (--compute-dtype)")
    parse_mesh(self.mesh)  # raises on a malformed spec
    # The optimizer and the model config are built here (both cheap, no arrays), so that a
    # bad hyperparameter or model override is refused before any data, compile or run.
    optimizer = self.resolve_optimizer()
    try:
      optimizer.build(self.learning_rate or 1e-3)
    except (ValueError, TypeError) as e:
      raise ValueError(f"optimizer_kwargs: {e}") from None
    try:
      qwen.get_config(self.model, **self.model_overrides)
    except (ValueError, TypeError) as e:
      raise ValueError(f"model: {e}") from None
    return optimizer

  def resolve_optimizer(self) -> ResolvedOptimizer:
    """The optimizer this config trains with, looked up in the registry (the one call of
    `optimizers.resolve` a run makes); ValueError for an unknown optimizer or estimator."""
    try:
      spec = optimizers.resolve(self.optimizer)
    except ValueError as e:
      raise ValueError(f"optimizer: {e}") from None
    estimator = self.hessian_estimator
    if estimator is None:
      estimator = spec.hessian_estimator
    elif not spec.second_order:
      raise ValueError(f"hessian_estimator applies to second-order optimizers only; "
                       f"{self.optimizer!r} takes no Hessian estimate")
    else:
      allowed = (optimizers.HESSIAN_ESTIMATORS if spec.needs_batch_tokens
                 else (spec.hessian_estimator,))
      if estimator not in allowed:
        raise ValueError(f"hessian_estimator for {self.optimizer!r} must be one of "
                         f"{list(allowed)} or null, got {estimator!r}")
    kwargs = dict(self.optimizer_kwargs)
    if spec.needs_batch_tokens:
      # GNB's estimate is a per-token mean, scaled back by B; Hutchinson's is the Hessian of
      # the mean loss itself (B = 1, as in Sophia-H).
      kwargs["batch_tokens"] = self.batch_tokens if estimator == "gnb" else 1
    return ResolvedOptimizer(spec, kwargs, estimator, self.learning_rate)

  # ------------------------------------------------------------------------- derived values
  @property
  def batch_tokens(self) -> int:
    """Tokens per optimizer step over all devices, hosts and accumulation steps."""
    return self.batch_size * self.seq_len

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.grad_accum

  def resolved_warmup_steps(self) -> int:
    warmup = self.steps // 10 if self.warmup_steps is None else self.warmup_steps
    return min(warmup, self.steps)

  def resolved_out(self) -> Path:
    if self.out is not None:
      return Path(self.out)
    model = Path(self.init_from).name if self.init_from else self.model
    return Path("runs") / f"{model}-{self.optimizer}-s{self.seed}"

  def resolved_hessian_estimator(self) -> str | None:
    """The curvature estimator the train step builds: None for first-order optimizers."""
    return self.resolve_optimizer().estimator

  def resolved_learning_rate(self, hidden_size: int) -> float:
    """The peak learning rate for a model of width `hidden_size`."""
    return self.resolve_optimizer().peak_learning_rate(hidden_size)

  # ------------------------------------------------------------------------- (de)serialise
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**values)

  @classmethod
  def from_json(cls, path: str | Path) -> "TrainConfig":
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"config file {path} does not exist")
    try:
      values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
      raise ValueError(f"config file {path} must hold a JSON object of TrainConfig fields")
    return cls.from_dict(values)

  def to_json(self, path: str | Path) -> None:
    Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")


_MAX_STEPS = 2**31 - 1
# What each annotation of a TrainConfig field accepts (bool is not an int here: a JSON
# `true` for `steps` is a mistake, and "no" for `tensorboard` is not false).
_KINDS = {"int": ((int,), "an integer"), "float": ((int, float), "a number"),
          "bool": ((bool,), "true or false"), "str": ((str,), "a string"),
          "dict": ((dict,), "a JSON object"), "None": ((type(None),), "null")}


def _check_types(config: TrainConfig) -> None:
  """ValueError naming the first field whose value is not of its annotated type (values
  from a --config file or the API are not parsed by the flags' types)."""
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    names = [part.strip().split("[")[0] for part in str(field.type).split("|")]
    if not all(name in _KINDS for name in names):  # a type this check does not know
      continue
    kinds = [_KINDS[name] for name in names]
    types = tuple(t for accepted, _ in kinds for t in accepted)
    if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
      continue
    raise ValueError(f"{field.name} must be {' or '.join(words for _, words in kinds)}, "
                     f"got {value!r}")


def with_old_run_defaults(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config (a run's config.json, a checkpoint's config) with the fields it lacks,
  written before they existed, set to what such runs did: their defaults, but for the
  fields below whose defaults could change."""
  defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING
              else f.default_factory() for f in dataclasses.fields(TrainConfig)}
  return {**defaults,
          # Runs written before final_eval_batches existed ended with an eval_batches
          # evaluation.
          "final_eval_batches": saved.get("eval_batches", defaults["eval_batches"]),
          # Runs written before `schedule` existed followed a warmup + cosine schedule (and
          # had no decay_fraction, which only "wsd" reads).
          "schedule": "cosine", "decay_fraction": 0.2,
          **saved}


def result_differences(saved: dict[str, Any], planned: "TrainConfig") -> list[str]:
  """"field: X there, Y planned" for each RESULTS_DEPEND_ON field where a run directory's
  config.json (`saved`; fields it lacks as `with_old_run_defaults`) differs from
  `planned`."""
  saved = with_old_run_defaults(saved)
  planned_dict = json.loads(json.dumps(planned.to_dict()))  # tuples -> lists, as on disk
  return [f"{name}: {saved.get(name)!r} there, {planned_dict.get(name)!r} planned"
          for name in RESULTS_DEPEND_ON if saved.get(name) != planned_dict.get(name)]


def parse_mesh(spec: str) -> dict[str, int] | None:
  """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4}; "auto" -> None. Missing axes are 1."""
  if not isinstance(spec, str):
    raise ValueError(f"mesh must be a string like 'data=2,fsdp=4', got {spec!r}")
  if spec.strip() == "auto":
    return None
  sizes = {"data": 1, "fsdp": 1}
  seen = set()
  for part in spec.split(","):
    name, sep, value = part.strip().partition("=")
    name = name.strip()
    if not sep or name not in sizes or name in seen:
      raise ValueError(f"mesh {spec!r}: expected 'data=D,fsdp=F' (axes data and fsdp, each "
                       f"at most once) or 'auto'")
    try:
      size = int(value)
    except ValueError:
      size = 0
    if size < 1:
      raise ValueError(f"mesh {spec!r}: axis {name} needs a positive integer size")
    sizes[name] = size
    seen.add(name)
  return sizes


# ----------------------------------------------------------------------------- flags
_FLAG_HELP = {
    "model": "model preset (qwen-tiny, qwen-cpu, qwen-134m, qwen2.5-0.5b)",
    "model_overrides": "JSON object of QwenConfig overrides (or use --model.NAME VALUE)",
    "init_from": "HuggingFace Qwen2 directory to start from (replaces --model's preset)",
    "compute_dtype": "float32 or bfloat16 activations (params stay float32)",
    "optimizer": "optimizer name (sophia_lambda_jax.OPTIMIZERS)",
    "optimizer_kwargs": "JSON object of optimizer hyperparameters (or --opt.NAME VALUE)",
    "hessian_estimator": "gnb or hutchinson",
    "learning_rate": "peak learning rate",
    "schedule": f"learning-rate schedule after the warmup: {', '.join(SCHEDULES)} "
                "(wsd: warmup-stable-decay)",
    "warmup_steps": "linear warmup steps",
    "decay_fraction": "fraction of the steps of wsd's final linear decay",
    "final_lr_fraction": "cosine and wsd decay to this fraction of the peak",
    "grad_clip": "global-norm clipping threshold ('null' disables)",
    "steps": "optimizer steps",
    "batch_size": "sequences per optimizer step, global over devices/hosts/accumulation",
    "seq_len": "tokens per sequence",
    "grad_accum": "micro-batches per optimizer step",
    "data": "'builtin' or a directory prepared by `slj tokenize`",
    "mesh": "device mesh, e.g. data=2,fsdp=4 or auto",
    "out": "run directory (resumes from its newest complete checkpoint)",
    "seed": "seed for init, data order and Hessian-estimator sampling",
    "eval_every": "validate every N steps and at the end (0: never)",
    "eval_batches": "validation batches per evaluation",
    "final_eval_batches": "validation batches of the last evaluation ('null': the whole "
                          "split)",
    "log_every": "print a line every N steps when not on a terminal",
    "checkpoint_every": "checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "tensorboard": "write TensorBoard events when a writer is installed (true/false)",
    "coordinator": "jax.distributed coordinator address host:port (multi-host)",
    "num_processes": "number of processes (multi-host)",
    "process_id": "this process's index (multi-host)",
}


# What a default of None means, in the help of its flag.
_NONE_MEANS = {
    "init_from": "null (the preset's random init)",
    "hessian_estimator": "the optimizer's own",
    "learning_rate": "per optimizer, scaled as 1/width",
    "warmup_steps": "steps // 10",
    "grad_clip": "null",
    "out": "runs/<model>-<optimizer>-s<seed>",
    "final_eval_batches": "null",
    "coordinator": "null (cluster auto-detection, else one process)",
    "num_processes": "null",
    "process_id": "null",
}


def _help_with_default(field: dataclasses.Field) -> str:
  """The flag's help, ending in its default (as JSON but strings, which are shown bare)."""
  default = field.default if field.default_factory is dataclasses.MISSING else \
      field.default_factory()
  shown = (_NONE_MEANS[field.name] if default is None else
           default if isinstance(default, str) else json.dumps(default))
  # argparse formats help with %: a literal one is written %%.
  return f"{_FLAG_HELP[field.name]} (default: {shown})".replace("%", "%%")


def _parse_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def _flag_type(field: dataclasses.Field):
  annotation = str(field.type)
  if annotation.startswith("dict"):
    return _json_object(field.name)
  if annotation in ("bool",):
    return _parse_bool(field.name)
  if "int" in annotation and "float" not in annotation:
    return _optional(int) if "None" in annotation else int
  if "float" in annotation:
    return _optional(float) if "None" in annotation else float
  return _optional(str) if "None" in annotation else str


def _optional(kind):
  def parse(text):
    return None if text.lower() in ("none", "null") else kind(text)
  parse.__name__ = kind.__name__
  return parse


def _parse_bool(name):
  def parse(text):
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} expects true or false")
  return parse


def _json_object(name):
  def parse(text):
    value = _parse_value(text)
    if not isinstance(value, dict):
      raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} expects a JSON object")
    return value
  return parse


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="slj train", allow_abbrev=False,
      description="Train one model with one optimizer; resumes from the newest complete "
                  "checkpoint in --out.",
      epilog="Optimizer hyperparameters: --opt.NAME VALUE or --NAME VALUE for NAME in "
             f"{', '.join(optimizer_hyperparameters())}. Model overrides: --model.NAME VALUE. "
             "batch_tokens is derived (batch_size * seq_len).")
  parser.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
  for field in dataclasses.fields(TrainConfig):
    flag = "--" + field.name.replace("_", "-")
    aliases = [flag]
    if field.name == "learning_rate":
      aliases.append("--lr")
    parser.add_argument(*aliases, dest=field.name, type=_flag_type(field),
                        default=argparse.SUPPRESS, help=_help_with_default(field))
  return parser


def config_from_argv(argv: list[str]) -> TrainConfig:
  """Parse `slj train` flags (see the module docstring) into a TrainConfig."""
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  optimizer_kwargs: dict[str, Any] = {}
  model_overrides: dict[str, Any] = {}
  i = 0
  while i < len(rest):
    token = rest[i]
    if not token.startswith("--"):
      parser.error(f"unexpected argument {token!r}")
    name, eq, value = token[2:].partition("=")
    if not eq:
      if i + 1 >= len(rest):
        parser.error(f"{token} needs a value")
      value = rest[i + 1]
      i += 1
    i += 1
    if name.startswith("model."):
      model_overrides[name[len("model."):].replace("-", "_")] = _parse_value(value)
      continue
    if name.startswith("opt."):
      name = name[len("opt."):]
    key = name.replace("-", "_")
    if key not in optimizer_hyperparameters():
      parser.error(f"unknown flag --{name}; optimizer hyperparameters are "
                   f"{', '.join(optimizer_hyperparameters())}")
    optimizer_kwargs[key] = _parse_value(value)

  values = TrainConfig.from_json(args.config).to_dict() if getattr(args, "config", None) \
      else {}
  for key, value in vars(args).items():
    if key != "config":
      values[key] = value
  values["optimizer_kwargs"] = {**values.get("optimizer_kwargs", {}), **optimizer_kwargs}
  values["model_overrides"] = {**values.get("model_overrides", {}), **model_overrides}
  return TrainConfig.from_dict(values)
