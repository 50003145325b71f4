"""Experiment protocols: which training runs a comparison is made of.

A protocol is a list of `RunSpec`s. Each spec is one training run: a label (the
configuration; seeds of one label are aggregated into mean +- std), an optimizer, a seed and
the `sophia_lambda_jax.train.TrainConfig` fields of the run. The compare runner gives every
spec its own run directory `<out>/<label>/seed<seed>`, so a configuration that two phases
share (the tuned sweep's seed 0 and the tuned final runs) is trained once.

The protocols (`PROTOCOLS`: cpu, paper, paper-short, tuned, cpu-long), with their settings
and budgets, are described in one table: docs/experiments.md, "Protocols"; the rules they
share (one b2 for all in the paper protocols, the regime rule, mean +- std): docs/design.md
section 8. The constants and `*_fields` functions below hold each protocol's numbers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

from sophia_lambda_jax.models.qwen import get_config
from sophia_lambda_jax.optimizers import OPTIMIZERS, resolve
from sophia_lambda_jax.train import TrainConfig
from sophia_lambda_jax.train.metrics import in_unclipped_band

# outcome(spec) -> (final validation loss or None, unclipped fraction or None) of a run that
# ended (a diverged run has no loss), or None while it has not: what adaptive protocols plan
# from.
Outcome = Callable[["RunSpec"], "tuple[float | None, float | None] | None"]

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
# band less a margin), measured by `python -m experiments.calibrate_rho` (see
# docs/decisions.md, 2026-12-02: the Sophia family's rho on the cpu setting); the protocol
# runs each at the better of the two. Only the cpu, tuned and ablation settings use them: the
# paper protocols keep the papers' settings.
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
# (see docs/decisions.md, 2026-12-02: the cpu-long protocol's size). Warmup stays a tenth of
# the run, as in cpu.
CPU_LONG_STEPS = 3000
CPU_LONG_EVAL_EVERY = 100
# Each optimizer at the setting `slj compare --protocol tuned` chose for it on the cpu setting
# at its first measurement (2026-12-02), which the committed cpu-long results ran with. The
# committed tuned results (2026-12-07, after the output-layer and attention changes) chose
# the same learning rates and rho 0.2 for Sophia-G and Sophia-Lambda, the rho both also run
# at here (CPU_LONG_LOWER_RHO); a test keeps every choice of
# docs/results/tuned-cpu/results.json ("best_settings") among this protocol's runs.
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
# Sophia-Lambda at 3,000 steps ended above the 10-50 % unclipped band (later in training |m|
# is small next to rho h for more coordinates). So the protocol also runs both at half that
# rho, labelled "<optimizer>/rho<value>"; the tables mark whichever configuration is out of
# band (see docs/decisions.md, 2026-12-02: cpu-long also runs Sophia-G and Sophia-Lambda at
# rho 0.2).
CPU_LONG_LOWER_RHO: dict[str, float] = {"sophia": 0.2, "sophia_lambda": 0.2}

# --- cpu-long-tuned protocol -------------------------------------------------------------
# The cpu-long setting with every optimizer tuned at that horizon: a learning-rate sweep on a
# selection seed that no table reports, then the chosen setting on seeds 0, 1, 2.
CPU_LONG_TUNED_SELECTION_SEED = 100
# Centre of each optimizer's sweep: the rate the tuned (120-step) protocol chose for it
# (docs/results/tuned-cpu/results.json "best_settings"; a test keeps the two equal).
CPU_LONG_TUNED_CENTRES: dict[str, float] = {
    "adamw": 1.5e-3, "lion": 1.2e-3, "stable_adamw": 3e-3, "lavsm": 3e-3, "lamvs": 3e-3,
    "sophia": 1e-3, "sophia_h": 2e-3, "sophia_lambda": 1e-3}
# Where the best rate is at an end of the sweep, the next rate in that direction (x2 or /2)
# is added, up to this many times per direction.
CPU_LONG_TUNED_MAX_EXTENSIONS = 3
# AdamW's b2 at its best rate: the library default 0.95 (the sweep) and this one.
CPU_LONG_TUNED_ADAMW_B2 = 0.99
# The Sophia family holds its unclipped band with the rho controller instead of a rho sweep.
CPU_LONG_TUNED_REGIME: dict[str, dict[str, Any]] = {
    opt: {"rho": "auto", "bias_correction": True}
    for opt in ("sophia", "sophia_h", "sophia_lambda")}

# The papers' shared hyperparameters ("same hyperparameters" for every optimizer).
PAPER_OPTIMIZER_KWARGS: dict[str, Any] = {"b1": 0.9, "b2": 0.95, "weight_decay": 0.1}
# The papers' fixed rho for the GNB Sophia family, pinned: the library's Sophia-Lambda
# adjusts rho itself by default (rho="auto"), which the papers did not.
PAPER_RHO_KWARGS: dict[str, dict[str, Any]] = {"sophia": {"rho": 0.04},
                                               "sophia_lambda": {"rho": 0.04}}
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
      eval_batches=CPU_EVAL_BATCHES, final_eval_batches=CPU_EVAL_BATCHES,
      checkpoint_every=CPU_STEPS // 2, keep_checkpoints=1,
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
      final_eval_batches=50,
      checkpoint_every=1_000, keep_checkpoints=2, log_every=10, mesh="auto",
      compute_dtype="bfloat16", learning_rate=PAPER_LR,
      optimizer_kwargs=dict(PAPER_OPTIMIZER_KWARGS))
  fields.update(overrides)
  return fields


def paper_short_fields(**overrides) -> dict:
  """About one GPU-hour for all eight optimizers, 131M tokens per run: an estimate from the
  model FLOPs (see docs/decisions.md, 2026-11-23: the paper-short protocol's size, an
  estimate).
  """
  fields = paper_fields(steps=1_000, batch_size=64, grad_accum=2, warmup_steps=100,
                        eval_every=100, eval_batches=20, final_eval_batches=20,
                        checkpoint_every=250)
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
  """The papers' setting, the same hyperparameters for every optimizer (and the papers'
  rho 0.04 for Sophia-G and Sophia-Lambda, PAPER_RHO_KWARGS)."""
  return _per_optimizer("paper", paper_fields(**overrides), seeds, optimizers,
                        regime=PAPER_RHO_KWARGS)


def paper_short(seeds: int = 1, optimizers: Sequence[str] | None = None,
                **overrides) -> list[RunSpec]:
  """The papers' hyperparameters at about one GPU-hour in total (rho as in `paper`)."""
  return _per_optimizer("paper-short", paper_short_fields(**overrides), seeds, optimizers,
                        regime=PAPER_RHO_KWARGS)


def default_learning_rate(optimizer: str, model: str = "qwen-cpu") -> float:
  """The peak learning rate the training script uses for `optimizer` on `model` when none
  is given (TrainConfig.resolved_learning_rate)."""
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
  """Phase 2 of `tuned`: each optimizer at its chosen setting (``best_settings``) on seeds
  1..`seeds`; seed 0 chose the setting, so it is never reported."""
  _check_seeds(seeds)
  check_optimizers(list(best))
  base = cpu_fields(**overrides)
  return [_tuned_spec(opt, setting, s, base, "final")
          for opt, setting in best.items() for s in range(1, seeds + 1)]


def tuned(seeds: int = 3, optimizers: Sequence[str] | None = None,
          outcome: Outcome | None = None, **overrides) -> list[RunSpec]:
  """The tuned protocol as far as `outcome` allows: the sweep, then, once every sweep run
  has finished, the final runs of each optimizer's chosen setting."""
  sweep = tuned_sweep(optimizers, **overrides)
  if outcome is None or any(outcome(spec) is None for spec in sweep):
    return sweep
  return sweep + tuned_final(best_settings(sweep, outcome), seeds, **overrides)


def _rate(x: float) -> float:
  return float(f"{x:.6g}")


def _long_tuned_spec(opt: str, lr: float, kwargs: dict, seed: int, base: dict,
                     phase: str) -> RunSpec:
  fields = dict(base, optimizer=opt, learning_rate=lr,
                optimizer_kwargs={**kwargs, **base["optimizer_kwargs"]})
  label = f"{opt}/{lr_tag(lr)}" + (f"/b2{kwargs['b2']:g}" if "b2" in kwargs else "")
  return RunSpec(label, opt, seed, fields, "cpu-long-tuned", phase, opt)


def _long_tuned_selection(opt: str, base: dict, outcome: Outcome
                          ) -> tuple[list[RunSpec], dict | None]:
  """The selection runs of `opt` known so far and its chosen setting (None until chosen).

  Five rates x{1/4, 1/2, 1, 2, 4} around CPU_LONG_TUNED_CENTRES; while the best (by
  `best_settings`' rule) is the lowest or highest rate, the next rate beyond it is added
  (at most CPU_LONG_TUNED_MAX_EXTENSIONS per direction); AdamW then also runs its best rate
  with b2 = CPU_LONG_TUNED_ADAMW_B2, and the better of the two is chosen."""
  kwargs = dict(CPU_LONG_TUNED_REGIME.get(opt, {}))
  centre = CPU_LONG_TUNED_CENTRES[opt]
  rates = [_rate(centre * f) for f in SWEEP_FACTORS]
  seed = CPU_LONG_TUNED_SELECTION_SEED

  def spec(lr, extra=None):
    return _long_tuned_spec(opt, lr, {**kwargs, **(extra or {})}, seed, base, "sweep")

  down = up = 0
  while True:
    sweep = [spec(lr) for lr in rates]
    if any(outcome(s) is None for s in sweep):
      return sweep, None
    best = best_settings(sweep, outcome)[opt]
    if best["learning_rate"] == rates[0] and down < CPU_LONG_TUNED_MAX_EXTENSIONS:
      rates.insert(0, _rate(rates[0] / 2))
      down += 1
    elif best["learning_rate"] == rates[-1] and up < CPU_LONG_TUNED_MAX_EXTENSIONS:
      rates.append(_rate(rates[-1] * 2))
      up += 1
    else:
      break
  if opt != "adamw":
    return sweep, best
  b2 = spec(best["learning_rate"], {"b2": CPU_LONG_TUNED_ADAMW_B2})
  if outcome(b2) is None:
    return sweep + [b2], None
  pair = [s for s in sweep if s.fields["learning_rate"] == best["learning_rate"]] + [b2]
  return sweep + [b2], best_settings(pair, outcome)[opt]


def cpu_long_tuned(seeds: int = 3, optimizers: Sequence[str] | None = None,
                   outcome: Outcome | None = None, **overrides) -> list[RunSpec]:
  """Every optimizer tuned at the cpu-long horizon, as far as `outcome` allows: the
  selection runs on CPU_LONG_TUNED_SELECTION_SEED (`_long_tuned_selection`), then each
  chosen setting on seeds 0..`seeds`-1. The final evaluation covers the whole validation
  split (`final_eval_batches` None)."""
  _check_seeds(seeds)
  outcome = outcome or (lambda spec: None)
  base = cpu_long_fields(**{"final_eval_batches": None, **overrides})
  sweep, final = [], []
  for opt in check_optimizers(optimizers):
    runs, chosen = _long_tuned_selection(opt, base, outcome)
    sweep += runs
    if chosen is not None:
      kwargs = {**CPU_LONG_TUNED_REGIME.get(opt, {}), **chosen["optimizer_kwargs"]}
      final += [_long_tuned_spec(opt, chosen["learning_rate"], kwargs, s, base, "final")
                for s in range(seeds)]
  return sweep + final


def cpu_long_tuned_extensions(specs: Sequence[RunSpec]) -> dict[str, list[float]]:
  """Per optimizer, the selection rates of a cpu-long-tuned plan beyond its first five (the
  runs added because the best rate was at an end of the sweep)."""
  out: dict[str, list[float]] = {}
  for spec in specs:
    if spec.phase != "sweep" or "b2" in spec.fields["optimizer_kwargs"]:
      continue
    first = {_rate(CPU_LONG_TUNED_CENTRES[spec.optimizer] * f) for f in SWEEP_FACTORS}
    if spec.fields["learning_rate"] not in first:
      out.setdefault(spec.optimizer, []).append(spec.fields["learning_rate"])
  return {opt: sorted(rates) for opt, rates in out.items()}


def chosen_settings(specs: Sequence[RunSpec], outcome: Outcome) -> dict[str, dict]:
  """The `best_settings` record of each optimizer that has final runs in `specs` (an
  adaptive protocol's plan), over its selection runs: the setting its final runs use."""
  finals = {s.optimizer for s in specs if s.phase == "final"}
  return best_settings([s for s in specs if s.phase == "sweep" and s.optimizer in finals],
                       outcome)


def best_settings(sweep: Sequence[RunSpec], outcome: Outcome) -> dict[str, dict]:
  """Per optimizer, the sweep setting the tuned protocol continues with.

  outcome(spec) -> (final validation loss, unclipped fraction or None). First-order
  optimizers: the lowest loss. The Sophia family: the lowest loss among settings in the
  10-50 % unclipped band; the unconstrained best is recorded beside it, and when no setting
  is in band the best one is used with ``in_band`` False (a finding, reported as such).
  Non-finite or missing losses (a diverged run) never win; an optimizer whose every run
  diverged raises ValueError naming it.
  """
  results: dict[str, list[tuple[float, dict]]] = {}
  for spec in sweep:
    result = outcome(spec)
    if result is None:  # not finished yet
      continue
    loss, unclipped = result
    if loss is None or not math.isfinite(loss):
      continue
    setting = {"learning_rate": spec.fields["learning_rate"],
               "optimizer_kwargs": {k: v for k, v in spec.fields["optimizer_kwargs"].items()
                                    if k in ("rho", "bias_correction", "b2")},
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
    "tuned": tuned,
    "cpu-long": cpu_long,
    "cpu-long-tuned": cpu_long_tuned,
}
# Protocols whose later runs depend on the results of earlier ones: called with `outcome=`.
ADAPTIVE = ("tuned", "cpu-long-tuned")

DEFAULT_SEEDS = {"cpu": 1, "paper": 1, "paper-short": 1, "tuned": 3, "cpu-long": 3,
                 "cpu-long-tuned": 3}


def get_protocol(name: str) -> Callable[..., list[RunSpec]]:
  if name not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}")
  return PROTOCOLS[name]
