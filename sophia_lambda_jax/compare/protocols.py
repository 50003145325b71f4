"""Experiment protocols: which training runs a comparison is made of.

A protocol is a list of `RunSpec`s. Each spec is one training run: a label (the
configuration; seeds of one label are aggregated into mean +- std), an optimizer, a seed and
the `sophia_lambda_jax.train.TrainConfig` fields of the run. The compare runner gives every
spec its own run directory `<out>/<label>/seed<seed>`, so a configuration that two phases
share (the tuned sweep's seed 0 and the tuned final runs) is trained once.

Protocols (docs/design.md section 8):

  cpu          qwen-cpu (vocab 8192 compact, hidden 128, 4 layers) on the built-in corpus,
               every optimizer at the same token budget, each with its own default learning
               rate: 120 steps of 8 x 128 tokens. Budget: one seed of all eight optimizers
               in <= 10 min on 2 CPU cores, three seeds in <= 30 min; see CPU_STEPS below
               for how the size was chosen.
  paper        the papers' setting: qwen-134m, FineWeb shards, batch 512 x seq 2048,
               50,000 steps, lr 3e-4 with warmup + cosine, b1 0.9, b2 0.95, wd 0.1, and the
               same hyperparameters for every optimizer (as the papers did). For GPUs.
  paper-short  the same hyperparameters at about one GPU-hour for all eight optimizers on
               one H100-class GPU (batch 64 x 2048, 1,000 steps, 131M tokens per run).
  tuned        the fair comparison the papers did not make: on the cpu setting, a sweep of
               five log-spaced learning rates (x1/4 .. x4, factor 2) around each optimizer's
               default with seed 0, then the best learning rate of each with three seeds
               (40 sweep runs + 16 more seeds: about an hour on 2 CPU cores).
  cpu-long     the cpu setting at a longer budget (CPU_LONG_STEPS steps of 8 x 128 tokens):
               AdamW, Sophia-G, Sophia-Lambda, LAVSM and LAMVS, each at the setting the
               tuned protocol chose for it (CPU_LONG_SETTINGS), three seeds; Sophia-G
               and Sophia-Lambda also at half their tuned rho (CPU_LONG_LOWER_RHO), which
               keeps them in the unclipped band at this length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

# --- cpu protocol size -------------------------------------------------------------------
# Tokens per optimizer step = CPU_BATCH * CPU_SEQ = 1,024; CPU_STEPS * 1,024 = 122,880 tokens
# per run, identical for every optimizer. CPU_STEPS is sized so that one seed of every
# optimizer fits in 10 minutes on 2 CPU cores (the timings that chose it: docs/decisions.md;
# the protocol's own: docs/results/compare-cpu/).
CPU_BATCH = 8
CPU_SEQ = 128
CPU_STEPS = 120
CPU_WARMUP = 12
CPU_EVAL_EVERY = 30
CPU_EVAL_BATCHES = 8

# The Sophia family in its operating regime on the cpu setting: for each optimizer and
# Hessian-EMA bias correction off / on, the rho with the lowest validation loss among those
# that keep 15-45 % of coordinates unclipped over the second half of training (the 10-50 %
# band less a margin), measured by `python -m experiments.calibrate_rho`
# (docs/results/rho-calibration); the protocol runs each at the better of the two. Only the
# cpu, tuned and ablation settings use them: the paper protocols keep the papers' settings.
CPU_CALIBRATED_RHO: dict[str, dict[bool, float]] = {
    "sophia": {False: 5.0, True: 0.2},
    "sophia_h": {False: 0.25, True: 0.05},
    "sophia_lambda": {False: 5.0, True: 0.2},
}
CPU_BIAS_CORRECTION: dict[str, bool] = {"sophia": True, "sophia_h": True,
                                        "sophia_lambda": True}
CPU_REGIME_KWARGS: dict[str, dict[str, Any]] = {
    opt: {"rho": CPU_CALIBRATED_RHO[opt][bc], "bias_correction": bc}
    for opt, bc in CPU_BIAS_CORRECTION.items()}
# The tuned sweep also sweeps rho around the calibrated value for these optimizers.
TUNED_RHO_FACTORS: tuple[float, ...] = (0.5, 1.0, 2.0)

# The tuned sweep is centred on each optimizer's default learning rate, the one the training
# script uses when TrainConfig.learning_rate is None (the registry's base_learning_rate,
# scaled 1/width); the factors are log-spaced by 2 on either side.
SWEEP_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)

# --- cpu-long protocol -------------------------------------------------------------------
# The cpu setting (batch, sequence, model, data) with CPU_LONG_STEPS steps, so that AdamW ends
# well below the cpu protocol's validation loss; the size was chosen with a pilot AdamW run
# (docs/decisions.md). Warmup stays a tenth of the run, as in cpu.
CPU_LONG_STEPS = 3000
CPU_LONG_EVAL_EVERY = 100
# Each optimizer at the setting `slj compare --protocol tuned` chose for it on the cpu setting
# (docs/results/tuned-cpu/results.json, "best_settings"; a test keeps the two equal).
CPU_LONG_SETTINGS: dict[str, dict[str, Any]] = {
    "adamw": {"learning_rate": 1.5e-3, "optimizer_kwargs": {}},
    "sophia": {"learning_rate": 1e-3,
               "optimizer_kwargs": {"rho": 0.4, "bias_correction": True}},
    "sophia_lambda": {"learning_rate": 1e-3,
                      "optimizer_kwargs": {"rho": 0.4, "bias_correction": True}},
    "lavsm": {"learning_rate": 3e-3, "optimizer_kwargs": {}},
    "lamvs": {"learning_rate": 3e-3, "optimizer_kwargs": {}},
}
# At the tuned rho 0.4, tuned over 120 steps, the first three seeds of Sophia-G and
# Sophia-Lambda at 3,000 steps ended above the 10-50 % unclipped band (about 51 % and 59 %:
# later in training |m| is small next to rho h for more coordinates). So the protocol also
# runs both at half that rho, labelled "<optimizer>/rho<value>"; the tables mark whichever
# configuration is out of band (docs/decisions.md).
CPU_LONG_LOWER_RHO: dict[str, float] = {"sophia": 0.2, "sophia_lambda": 0.2}

# The papers' shared hyperparameters ("same hyperparameters" for every optimizer).
PAPER_OPTIMIZER_KWARGS: dict[str, Any] = {"b1": 0.9, "b2": 0.95, "weight_decay": 0.1}
PAPER_LR = 3e-4
# Default token directory of the paper protocols: `slj tokenize 'fineweb/*.parquet' fineweb`.
PAPER_DATA = "fineweb"


class RunSpec(NamedTuple):
  """One training run of a protocol.

  label: the configuration's name, also its directory (seeds of one label are aggregated).
  optimizer: a registered optimizer name (`sophia_lambda_jax.OPTIMIZERS`).
  seed: the TrainConfig seed (model init, data order and Hessian sampling).
  fields: TrainConfig keyword arguments except `out` and `seed`.
  protocol: the protocol this run belongs to.
  phase: "main" (cpu/paper), "sweep" or "final" (tuned), "ablation".
  group: what a plot/table groups by (the optimizer, or an ablation family).
  """
  label: str
  optimizer: str
  seed: int
  fields: dict
  protocol: str
  phase: str = "main"
  group: str = ""

  @property
  def run_name(self) -> str:
    """Directory of this run relative to the compare root."""
    return f"{self.label}/seed{self.seed}"

  def train_config(self, out: str):
    """The `sophia_lambda_jax.train.TrainConfig` of this run, writing into `out`."""
    from sophia_lambda_jax.train import TrainConfig  # experiments -> train, at call time

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(self.fields) - names)
    if unknown:
      raise ValueError(
          f"run {self.run_name}: TrainConfig has no field(s) {unknown}; "
          f"valid fields: {sorted(names)}")
    return TrainConfig(**self.fields, seed=self.seed, out=str(out))

  def to_json(self) -> dict:
    return {"label": self.label, "optimizer": self.optimizer, "seed": self.seed,
            "fields": dict(self.fields), "protocol": self.protocol, "phase": self.phase,
            "group": self.group or self.optimizer, "run_name": self.run_name}

  @classmethod
  def from_json(cls, d: dict) -> "RunSpec":
    return cls(label=d["label"], optimizer=d["optimizer"], seed=int(d["seed"]),
               fields=dict(d["fields"]), protocol=d["protocol"], phase=d.get("phase", "main"),
               group=d.get("group", ""))


def _check_seeds(seeds: int) -> None:
  if not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"seeds must be a positive integer, got {seeds!r}")


def check_optimizers(optimizers: Sequence[str] | None) -> tuple[str, ...]:
  """The registered names of `optimizers` (aliases resolved); None -> every registered one."""
  from sophia_lambda_jax.optimizers import OPTIMIZERS, resolve

  if optimizers is None:
    return tuple(OPTIMIZERS)
  optimizers = tuple(optimizers)
  if not optimizers:
    raise ValueError(f"optimizers must be a non-empty subset of {list(OPTIMIZERS)}, got []")
  try:
    return tuple(resolve(o).name for o in optimizers)
  except ValueError as e:
    raise ValueError(f"optimizers: {e}") from None


def lr_tag(learning_rate: float) -> str:
  """A directory-safe, exact-enough rendering of a learning rate: 3e-4 -> 'lr3e-04'."""
  return f"lr{learning_rate:.0e}" if _is_round(learning_rate) else f"lr{learning_rate:.3e}"


def _is_round(x: float) -> bool:
  return float(f"{x:.0e}") == x


# --- base settings ---------------------------------------------------------------------

def cpu_fields(**overrides) -> dict:
  """TrainConfig fields of the cpu setting (documented at CPU_STEPS)."""
  fields = dict(
      model="qwen-cpu", data="builtin", steps=CPU_STEPS, batch_size=CPU_BATCH,
      seq_len=CPU_SEQ, warmup_steps=CPU_WARMUP, eval_every=CPU_EVAL_EVERY,
      eval_batches=CPU_EVAL_BATCHES, checkpoint_every=CPU_STEPS // 2, keep_checkpoints=1,
      log_every=25, tensorboard=False, mesh="data=1,fsdp=1", compute_dtype="float32",
      learning_rate=None, optimizer_kwargs={})
  fields.update(overrides)
  return fields


def cpu_long_fields(**overrides) -> dict:
  """TrainConfig fields of the cpu-long setting: the cpu setting, CPU_LONG_STEPS steps (a
  `steps` override also rescales warmup and checkpoints)."""
  steps = overrides.get("steps", CPU_LONG_STEPS)
  return cpu_fields(**{
      "steps": steps, "warmup_steps": steps // 10,
      "eval_every": min(CPU_LONG_EVAL_EVERY, steps), "checkpoint_every": max(steps // 10, 1),
      "log_every": 50, **overrides})


def paper_fields(**overrides) -> dict:
  """TrainConfig fields of the papers' setting (LAVSM paper section 4).

  mesh "auto" shards params and optimizer state over every visible device (fsdp). The step
  holds neither the logits nor the attention scores (docs/memory.md): XLA plans about
  45 GB for a micro-batch of 32 sequences without remat (every optimizer, on the CPU;
  64 would need about 87), so one 80 GB GPU takes micro-batches of 32: grad_accum 16 for
  512 sequences per step. With G devices use grad_accum 16 / G (batch_size / grad_accum
  must divide by the device count): `--set grad_accum=2` on 8 GPUs.
  """
  fields = dict(
      model="qwen-134m", data=PAPER_DATA, steps=50_000, batch_size=512, seq_len=2048,
      grad_accum=16, warmup_steps=2_000, eval_every=1_000, eval_batches=50,
      checkpoint_every=1_000, keep_checkpoints=2, log_every=10, mesh="auto",
      compute_dtype="bfloat16", learning_rate=PAPER_LR,
      optimizer_kwargs=dict(PAPER_OPTIMIZER_KWARGS))
  fields.update(overrides)
  return fields


def paper_short_fields(**overrides) -> dict:
  """About one GPU-hour for all eight optimizers: 131M tokens per run.

  Arithmetic: qwen-134m costs ~6 * 134M + attention (12 * 18 * 512 * 2048) ~ 1.0 GFLOP per
  token for forward + backward; at ~35% of an H100's ~990 dense bf16 TFLOP/s that is
  ~340k tokens/s, so 1,000 steps of 64 x 2048 tokens take ~6.5 min per optimizer, ~55 min
  for eight (plus compiles and evaluations).
  """
  fields = paper_fields(steps=1_000, batch_size=64, grad_accum=2, warmup_steps=100,
                        eval_every=100, eval_batches=20, checkpoint_every=250)
  fields.update(overrides)
  return fields


# --- protocols ---------------------------------------------------------------------------

def _per_optimizer(protocol: str, base: dict, seeds: int, optimizers: Sequence[str],
                   phase: str = "main", regime: dict | None = None) -> list[RunSpec]:
  _check_seeds(seeds)
  specs = []
  for opt in check_optimizers(optimizers):
    kwargs = {**(regime or {}).get(opt, {}), **base["optimizer_kwargs"]}
    fields = dict(base, optimizer=opt, optimizer_kwargs=kwargs)
    specs += [RunSpec(opt, opt, s, fields, protocol, phase, opt) for s in range(seeds)]
  return specs


def cpu(seeds: int = 1, optimizers: Sequence[str] | None = None, **overrides) -> list[RunSpec]:
  """Every optimizer on qwen-cpu / built-in corpus at the same token budget; the Sophia
  family at its calibrated rho (CPU_REGIME_KWARGS; `--set optimizer_kwargs=...` overrides)."""
  return _per_optimizer("cpu", cpu_fields(**overrides), seeds, optimizers,
                        regime=CPU_REGIME_KWARGS)


def cpu_long(seeds: int = 3, optimizers: Sequence[str] | None = None,
             **overrides) -> list[RunSpec]:
  """AdamW, Sophia-G, Sophia-Lambda, LAVSM and LAMVS on the cpu setting at CPU_LONG_STEPS
  steps, each at its tuned setting (CPU_LONG_SETTINGS); Sophia-G and Sophia-Lambda also at
  CPU_LONG_LOWER_RHO."""
  _check_seeds(seeds)
  chosen = check_optimizers(list(CPU_LONG_SETTINGS) if optimizers is None else optimizers)
  missing = [o for o in chosen if o not in CPU_LONG_SETTINGS]
  if missing:
    raise ValueError(f"optimizers: cpu-long has tuned settings only for "
                     f"{list(CPU_LONG_SETTINGS)}, got {missing}")
  base = cpu_long_fields(**overrides)
  specs = []
  for opt in chosen:
    setting = CPU_LONG_SETTINGS[opt]
    fields = dict(base, optimizer=opt,
                  learning_rate=overrides.get("learning_rate", setting["learning_rate"]),
                  optimizer_kwargs={**setting["optimizer_kwargs"], **base["optimizer_kwargs"]})
    specs += [RunSpec(opt, opt, s, fields, "cpu-long", "main", opt) for s in range(seeds)]
    if opt in CPU_LONG_LOWER_RHO:
      rho = CPU_LONG_LOWER_RHO[opt]
      lower = dict(fields, optimizer_kwargs={**fields["optimizer_kwargs"], "rho": rho})
      specs += [RunSpec(f"{opt}/rho{rho:g}", opt, s, lower, "cpu-long", "main", opt)
                for s in range(seeds)]
  return specs


def paper(seeds: int = 1, optimizers: Sequence[str] | None = None, **overrides) -> list[RunSpec]:
  """The papers' setting, the same hyperparameters for every optimizer."""
  return _per_optimizer("paper", paper_fields(**overrides), seeds, optimizers)


def paper_short(seeds: int = 1, optimizers: Sequence[str] | None = None,
                **overrides) -> list[RunSpec]:
  """The papers' hyperparameters at about one GPU-hour in total."""
  return _per_optimizer("paper-short", paper_short_fields(**overrides), seeds, optimizers)


def default_learning_rate(optimizer: str, model: str = "qwen-cpu") -> float:
  """The peak learning rate the training script uses for `optimizer` on `model` when none
  is given (TrainConfig.resolved_learning_rate)."""
  from sophia_lambda_jax.models.qwen import get_config
  from sophia_lambda_jax.train import TrainConfig

  check_optimizers([optimizer])
  config = TrainConfig(model=model, optimizer=optimizer)
  return config.resolved_learning_rate(get_config(model).hidden_size)


def sweep_learning_rates(optimizer: str, model: str = "qwen-cpu") -> tuple[float, ...]:
  """The tuned sweep's learning rates of `optimizer`: SWEEP_FACTORS x its default."""
  centre = default_learning_rate(optimizer, model)
  return tuple(float(f"{centre * f:.6g}") for f in SWEEP_FACTORS)


def tuned_kwargs(optimizer: str) -> list[dict[str, Any]]:
  """The optimizer hyperparameters the tuned sweep tries with each learning rate: for the
  Sophia family TUNED_RHO_FACTORS x its calibrated rho, for the others the defaults."""
  regime = CPU_REGIME_KWARGS.get(optimizer)
  if regime is None:
    return [{}]
  return [dict(regime, rho=float(f"{regime['rho'] * f:.6g}")) for f in TUNED_RHO_FACTORS]


def _tuned_spec(opt: str, setting: dict, seed: int, base: dict, phase: str) -> RunSpec:
  lr, kwargs = setting["learning_rate"], setting["optimizer_kwargs"]
  fields = dict(base, optimizer=opt, learning_rate=lr,
                optimizer_kwargs={**base["optimizer_kwargs"], **kwargs})
  label = f"{opt}/{lr_tag(lr)}" + (f"/rho{kwargs['rho']:g}" if "rho" in kwargs else "")
  return RunSpec(label, opt, seed, fields, "tuned", phase, opt)


def tuned_sweep(optimizers: Sequence[str] | None = None, **overrides) -> list[RunSpec]:
  """Phase 1 of `tuned`: every optimizer at each sweep learning rate (and, for the Sophia
  family, each sweep rho), seed 0."""
  base = cpu_fields(**overrides)
  return [_tuned_spec(opt, {"learning_rate": lr, "optimizer_kwargs": kwargs}, 0, base,
                      "sweep")
          for opt in check_optimizers(optimizers)
          for lr in sweep_learning_rates(opt, base["model"]) for kwargs in tuned_kwargs(opt)]


def tuned_final(best: dict[str, dict], seeds: int = 3, **overrides) -> list[RunSpec]:
  """Phase 2 of `tuned`: each optimizer at its chosen setting (``best_settings``) with
  `seeds` seeds (seed 0 is the sweep's own run, which the runner finds already finished)."""
  _check_seeds(seeds)
  check_optimizers(list(best))
  base = cpu_fields(**overrides)
  return [_tuned_spec(opt, setting, s, base, "final")
          for opt, setting in best.items() for s in range(seeds)]


def best_settings(sweep: Sequence[RunSpec],
                  outcome: Callable[[RunSpec], tuple[float | None, float | None]]
                  ) -> dict[str, dict]:
  """Per optimizer, the sweep setting the tuned protocol continues with.

  outcome(spec) -> (final validation loss, unclipped fraction or None). First-order
  optimizers: the lowest loss. The Sophia family: the lowest loss among settings in the
  10-50 % unclipped band; the unconstrained best is recorded beside it, and when no setting
  is in band the best one is used with ``in_band`` False (a finding, reported as such).
  Non-finite or missing losses (a diverged run) never win; an optimizer whose every run
  diverged raises ValueError naming it.
  """
  from sophia_lambda_jax.train.metrics import in_unclipped_band

  results: dict[str, list[tuple[float, dict]]] = {}
  for spec in sweep:
    loss, unclipped = outcome(spec)
    if loss is None or not math.isfinite(loss):
      continue
    setting = {"learning_rate": spec.fields["learning_rate"],
               "optimizer_kwargs": {k: v for k, v in spec.fields["optimizer_kwargs"].items()
                                    if k in ("rho", "bias_correction")},
               "val_loss": loss, "unclipped": unclipped, "in_band": in_unclipped_band(unclipped)}
    results.setdefault(spec.optimizer, []).append((loss, setting))
  missing = sorted({s.optimizer for s in sweep} - set(results))
  if missing:
    raise ValueError(f"tuned sweep: no finite validation loss for optimizer(s) {missing}")
  best = {}
  for opt in [o for o in check_optimizers(None) if o in results] + sorted(
      set(results) - set(check_optimizers(None))):
    ranked = [setting for _, setting in sorted(results[opt], key=lambda x: x[0])]
    if opt not in CPU_REGIME_KWARGS:
      best[opt] = ranked[0]
      continue
    in_band = [setting for setting in ranked if setting["in_band"]]
    best[opt] = dict(in_band[0] if in_band else ranked[0], unconstrained=ranked[0])
  return best


PROTOCOLS: dict[str, Callable[..., list[RunSpec]]] = {
    "cpu": cpu,
    "paper": paper,
    "paper-short": paper_short,
    "tuned": tuned_sweep,   # the runner follows it with tuned_final
    "cpu-long": cpu_long,
}

DEFAULT_SEEDS = {"cpu": 1, "paper": 1, "paper-short": 1, "tuned": 3, "cpu-long": 3}


def get_protocol(name: str) -> Callable[..., list[RunSpec]]:
  if name not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}")
  return PROTOCOLS[name]
