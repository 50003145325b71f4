"""hessian_ema: the largest-divisor block rule, block-reduced storage, the EMA equation and
its fixed / adaptive refresh schedule (docs/design.md section 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sophia_lambda_jax import transforms


@pytest.mark.parametrize("shape,block_size,expected", [
    ((8, 96), 64, 48),      # largest divisor of 96 that is <= 64
    ((8, 96), 8, 8),
    ((8, 96), 1, 1),
    ((10, 100), 64, 50),
    ((3, 7), 5, 1),         # 7 is prime: no divisor in 2..5
    ((3, 7), 64, 7),
    ((2, 3, 128), 64, 64),
    ((96,), 64, 1),         # vectors keep a full diagonal
    ((4, 1), 64, 1),        # last dimension < 2
    ((), 64, 1),
])
def test_block_size_rule(shape, block_size, expected):
  assert transforms.hessian_block_size(shape, block_size) == expected
  want = shape if expected == 1 else shape[:-1] + (shape[-1] // expected,)
  assert transforms.block_shape(shape, expected) == want


def test_block_mean_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 4, 96)).astype(np.float32)
  got = transforms.block_mean(jnp.asarray(x), 48)
  np.testing.assert_allclose(got, x.reshape(3, 4, 2, 48).mean(-1), rtol=1e-5, atol=1e-6)


def test_state_is_block_reduced_float32():
  params = {"w": jax.ShapeDtypeStruct((16, 96), jnp.bfloat16),
            "b": jax.ShapeDtypeStruct((96,), jnp.float32),
            "s": jax.ShapeDtypeStruct((), jnp.float32)}
  state = jax.eval_shape(transforms.hessian_ema(block_size=64).init, params)
  assert state.h["w"].shape == (16, 2) and state.h["w"].dtype == jnp.float32
  assert state.h["b"].shape == (96,)
  assert state.h["s"].shape == ()


def run(tx, estimates, params):
  """Runs tx for len(estimates) steps; returns h (numpy) and the state after each step."""
  state = tx.init(params)
  step = jax.jit(lambda s, e: tx.update(params, s, params, hessian_fn=lambda _: e))
  hs, states = [], []
  for e in estimates:
    h, state = step(state, e)
    hs.append(jax.tree.map(np.asarray, h))
    states.append(state)
  return hs, states


def test_fixed_interval_ema_equation():
  params = {"w": jnp.zeros((2, 8))}
  rng = np.random.default_rng(1)
  estimates = [{"w": jnp.asarray(rng.uniform(size=(2, 8)), jnp.float32)} for _ in range(7)]
  tx = transforms.hessian_ema(b2=0.7, block_size=4, hessian_interval=3)
  hs, states = run(tx, estimates, params)
  h = np.zeros((2, 2))
  for t in range(7):
    if t % 3 == 0:
      h = 0.7 * h + 0.3 * np.asarray(estimates[t]["w"], np.float64).reshape(2, 2, 4).mean(-1)
    np.testing.assert_allclose(hs[t]["w"], h, rtol=1e-6)
  assert [int(s.refresh_count) for s in states] == [1, 1, 1, 2, 2, 2, 3]
  assert [int(s.next_refresh) for s in states] == [3, 3, 3, 6, 6, 6, 9]
  assert all(int(s.interval) == 3 for s in states)


def levels_schedule(levels):
  return [{"w": jnp.full((2, 4), level, jnp.float32)} for level in levels]


def test_adaptive_interval_is_capped_and_floored():
  params = {"w": jnp.zeros((2, 4))}
  # b2 = 0: h is the latest estimate. Constant: r = 0 -> doubles, capped at max_interval 4.
  tx = transforms.hessian_ema(b2=0.0, hessian_interval=1, adaptive_interval=True,
                              min_interval=1, max_interval=4)
  _, states = run(tx, levels_schedule([1.0] * 16), params)
  intervals = [int(s.interval) for s in states]
  # refreshes at 0,1,2 (no adaptation), 3 (->2), 5 (->4), 9 (->4 capped), 13 (->4)
  assert intervals == [1, 1, 1, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]
  assert [int(s.refresh_count) for s in states][-1] == 7
  # Level 1 + t: r = (t - t_prev) / (t_prev + 1) > r_high at every refresh up to t ~ 150,
  # so from the 4th refresh the interval halves, floored at min_interval 3.
  tx = transforms.hessian_ema(b2=0.0, hessian_interval=12, adaptive_interval=True,
                              min_interval=3, max_interval=100)
  levels = [1.0 + t for t in range(60)]
  _, states = run(tx, levels_schedule(levels), params)
  refresh_steps = [t for t in range(60) if int(states[t].refresh_count) >
                   (int(states[t - 1].refresh_count) if t else 0)]
  assert refresh_steps[:4] == [0, 12, 24, 36]
  intervals_after = [int(states[t].interval) for t in refresh_steps]
  assert intervals_after[:4] == [12, 12, 12, 6]  # the 4th refresh (t = 36) halves
  assert intervals_after[4] == 3 and min(intervals_after) == 3  # floored, never below
  assert float(states[36].relative_change) == pytest.approx(12 / 25)  # level 25 -> 37


@pytest.mark.parametrize("adaptive", [False, True])
def test_refresh_due_predicts_the_next_update(adaptive):
  """hessian_refresh_due(state) is True exactly when the next update refreshes, through a
  chain and inject_hyperparams, with fixed and adaptive intervals."""
  import optax
  params = {"w": jnp.zeros((2, 4))}
  tx = optax.chain(optax.identity(), optax.inject_hyperparams(
      transforms.hessian_ema, static_args=("block_size", "adaptive_interval"))(
      b2=0.0, hessian_interval=3, adaptive_interval=adaptive, min_interval=1,
      max_interval=4))
  state = tx.init(params)
  step = jax.jit(lambda s, e: tx.update(params, s, params, hessian_fn=lambda _: e)[1])
  levels = [1.0 + (t % 5) for t in range(20)] if adaptive else [1.0] * 20
  predicted, refreshed = [], []
  for e in levels_schedule(levels):
    predicted.append(bool(transforms.hessian_refresh_due(state)))
    before = int(transforms.hessian_interval_and_count(state)[1])
    state = step(state, e)
    refreshed.append(int(transforms.hessian_interval_and_count(state)[1]) > before)
  assert predicted == refreshed
  assert sum(refreshed) >= 5 and not all(refreshed)
  assert transforms.hessian_refresh_due({"w": jnp.zeros(2)}) is None


def test_relative_change_uses_global_norm_over_leaves():
  params = {"a": jnp.zeros((2, 4)), "b": jnp.zeros((3,))}
  tx = transforms.hessian_ema(b2=0.5, hessian_interval=1, adaptive_interval=True)
  est = [{"a": jnp.full((2, 4), 2.0), "b": jnp.full((3,), 1.0)},
         {"a": jnp.full((2, 4), 4.0), "b": jnp.full((3,), 3.0)}]
  _, states = run(tx, est, params)
  before = np.concatenate([np.full(8, 1.0), np.full(3, 0.5)])    # after refresh 1
  after = np.concatenate([np.full(8, 2.5), np.full(3, 1.75)])    # after refresh 2
  want = np.linalg.norm(after - before) / np.linalg.norm(before)
  assert float(states[1].relative_change) == pytest.approx(want, rel=1e-6)


def test_missing_arguments_and_bad_hessian_fn():
  params = {"w": jnp.zeros((2, 4))}
  tx = transforms.hessian_ema()
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state, None, hessian_fn=lambda p: p)
  with pytest.raises(ValueError, match="hessian_fn"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="structure"):
    tx.update(params, state, params, hessian_fn=lambda p: [p["w"]])


@pytest.mark.parametrize("kwargs,named", [
    ({"b2": 1.0}, "b2"), ({"block_size": 0}, "block_size"),
    ({"hessian_interval": 0}, "hessian_interval"),
    ({"min_interval": 5, "max_interval": 4}, "min_interval"),
    ({"min_interval": 0}, "min_interval"), ({"r_low": -1.0}, "r_low"),
    ({"r_low": 0.5, "r_high": 0.1}, "r_low"), ({"block_size": jnp.asarray(0)}, "block_size"),
    ({"block_size": 2.5}, "block_size"),
])
def test_invalid_arguments(kwargs, named):
  with pytest.raises(ValueError, match=named):
    transforms.hessian_ema(**kwargs)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("adaptive", [False, True])
def test_a_non_finite_estimate_is_skipped_for_one_refresh(bad, adaptive):
  """One estimate with a +inf, -inf or NaN entry never enters h: that refresh is skipped
  (h, k, r and the interval as before, counted in `skipped`), the next one comes one
  interval later and h is then the EMA of the finite estimates alone."""
  params = {"w": jnp.zeros((2, 8)), "b": jnp.zeros((3,))}
  rng = np.random.default_rng(5)
  estimates = [{"w": rng.uniform(size=(2, 8)), "b": rng.uniform(size=3)} for _ in range(12)]
  estimates[3]["w"][1, 5] = bad  # the second refresh (interval 3)
  tx = transforms.hessian_ema(b2=0.7, block_size=4, hessian_interval=3,
                              adaptive_interval=adaptive, min_interval=3, max_interval=3,
                              bias_correction=True)
  hs, states = run(tx, [jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), e)
                        for e in estimates], params)
  assert [int(s.skipped) for s in states] == [0, 0, 0] + [1] * 9
  assert [int(s.refresh_count) for s in states] == [1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
  assert [int(s.next_refresh) for s in states][:7] == [3, 3, 3, 6, 6, 6, 9]
  assert float(states[3].relative_change) == float(states[2].relative_change)
  h = {"w": np.zeros((2, 2)), "b": np.zeros(3)}
  k = 0
  for t in range(12):
    if t % 3 == 0 and t != 3:
      h = {"w": 0.7 * h["w"] + 0.3 * estimates[t]["w"].reshape(2, 2, 4).mean(-1),
           "b": 0.7 * h["b"] + 0.3 * estimates[t]["b"]}
      k += 1
    for key in h:
      assert np.all(np.isfinite(hs[t][key]))
      np.testing.assert_allclose(hs[t][key], h[key] / (1 - 0.7 ** k), rtol=1e-5)


def test_an_estimate_whose_block_mean_overflows_is_skipped():
  params = {"w": jnp.zeros((2, 4))}
  big = {"w": jnp.full((2, 4), 3e38, jnp.float32)}  # finite, but its block sum is not
  tx = transforms.hessian_ema(b2=0.0, block_size=4, hessian_interval=1)
  hs, states = run(tx, [{"w": jnp.ones((2, 4))}, big, {"w": jnp.full((2, 4), 2.0)}], params)
  assert [float(h["w"][0, 0]) for h in hs] == [1.0, 1.0, 2.0]
  assert int(states[-1].skipped) == 1
