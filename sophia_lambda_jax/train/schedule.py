"""The learning-rate schedule of a run: `learning_rate_schedule(config, peak)`.

Every schedule starts with a linear warmup from 0 to `peak` over W = warmup steps, and is an
optax schedule of the optimizer step (docs/design.md section 7):

- "cosine": cosine decay from `peak` at step W to `final_lr_fraction * peak` at `steps`
  (`optax.warmup_cosine_decay_schedule`);
- "constant": `peak` from step W on;
- "wsd" (warmup-stable-decay): `peak` until step S = steps - D, then a linear decay to
  `final_lr_fraction * peak` at `steps`, D = max(1, round(decay_fraction * steps)) steps
  (`optax.join_schedules` of a warmup, a constant and a linear schedule). Linear, as in
  Hägele et al. (2024), "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
  Durations", where a linear cool-down over the last 20 % of steps matched cosine.
"""

from __future__ import annotations

import optax

SCHEDULES = ("cosine", "constant", "wsd")


def decay_steps(steps: int, decay_fraction: float) -> int:
  """D of the "wsd" schedule: the steps of its final decay (at least one)."""
  return max(1, round(decay_fraction * steps))


def learning_rate_schedule(config, peak: float) -> optax.Schedule:
  """The schedule `config.schedule` names (a `TrainConfig`), peaking at `peak`."""
  warmup, steps = config.resolved_warmup_steps(), config.steps
  final = peak * config.final_lr_fraction
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=final)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if config.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  if config.schedule == "wsd":
    decay = decay_steps(steps, config.decay_fraction)
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay)],
        [warmup, steps - decay])
  raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {config.schedule!r}")
