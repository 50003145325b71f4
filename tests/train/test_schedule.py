"""The three learning-rate schedules against hand-written formulas at chosen steps."""

import math

import numpy as np
import pytest

from sophia_lambda_jax.train.config import TrainConfig
from sophia_lambda_jax.train.schedule import learning_rate_schedule

PEAK, FINAL = 2.0, 0.1  # final_lr_fraction
STEPS, WARMUP = 100, 10


def reference(schedule: str, step: int, warmup: int = WARMUP, decay: int = 20) -> float:
  """The schedules as written in docs/design.md section 7."""
  if step < warmup:
    return PEAK * step / warmup
  if schedule == "cosine":
    progress = (step - warmup) / (STEPS - warmup)
    return FINAL * PEAK + (PEAK - FINAL * PEAK) * 0.5 * (1 + math.cos(math.pi * progress))
  if schedule == "constant":
    return PEAK
  start = STEPS - decay  # wsd
  if step < start:
    return PEAK
  return PEAK + (FINAL * PEAK - PEAK) * (step - start) / decay


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_schedule_values_at_chosen_steps(schedule):
  config = TrainConfig(schedule=schedule, steps=STEPS, warmup_steps=WARMUP,
                       final_lr_fraction=FINAL, decay_fraction=0.2)
  fn = learning_rate_schedule(config, PEAK)
  steps = [0, 1, 5, 9, 10, 11, 40, 55, 79, 80, 81, 90, 99, 100]
  got = [float(fn(s)) for s in steps]
  np.testing.assert_allclose(got, [reference(schedule, s) for s in steps], rtol=1e-6,
                             atol=1e-7)


def test_hand_values_of_each_schedule():
  """A few values worked out by hand, so that the reference itself is checked."""
  config = dict(steps=STEPS, warmup_steps=WARMUP, final_lr_fraction=FINAL)
  cosine = learning_rate_schedule(TrainConfig(**config), PEAK)
  assert float(cosine(5)) == pytest.approx(1.0)        # half-way up the warmup
  assert float(cosine(55)) == pytest.approx(1.1)       # half-way down: (2 + 0.2) / 2
  assert float(cosine(100)) == pytest.approx(0.2)
  constant = learning_rate_schedule(TrainConfig(schedule="constant", **config), PEAK)
  assert [float(constant(s)) for s in (5, 10, 100)] == pytest.approx([1.0, 2.0, 2.0])
  wsd = learning_rate_schedule(TrainConfig(schedule="wsd", decay_fraction=0.3, **config),
                               PEAK)
  # Stable until step 70, then linear to 0.2 at 100.
  assert [float(wsd(s)) for s in (50, 70, 85, 100)] == pytest.approx([2.0, 2.0, 1.1, 0.2])


@pytest.mark.parametrize("schedule", ["constant", "wsd"])
def test_no_warmup_starts_at_the_peak(schedule):
  config = TrainConfig(schedule=schedule, steps=STEPS, warmup_steps=0,
                       final_lr_fraction=FINAL)
  fn = learning_rate_schedule(config, PEAK)
  steps = [0, 1, 50, 80, 90, 100]
  np.testing.assert_allclose([float(fn(s)) for s in steps],
                             [reference(schedule, s, warmup=0) for s in steps], rtol=1e-6)
