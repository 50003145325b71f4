"""The rho controller of scale_by_clipped_curvature (rho="auto", docs/design.md section 3.5):
its law against a float64 reference, the target it holds, its bounds on degenerate trees,
bad input, resume, inject_hyperparams and MultiSteps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sophia_lambda_jax import transforms

# The law's constants as docs/design.md section 3.5 states them.
INITIAL, LOW, HIGH, GAIN, MIN_SLOPE, MAX_STEP = 0.04, 1e-6, 1e4, 0.5, 0.05, math.log(2)


def test_constants_are_the_documented_ones():
  assert (transforms.RHO_AUTO_INITIAL, transforms.RHO_AUTO_MIN, transforms.RHO_AUTO_MAX,
          transforms.RHO_AUTO_GAIN, transforms.RHO_AUTO_MIN_SLOPE,
          transforms.RHO_AUTO_MAX_STEP) == (INITIAL, LOW, HIGH, GAIN, MIN_SLOPE, MAX_STEP)
  assert 0.15 <= transforms.DEFAULT_TARGET_UNCLIPPED <= 0.45


def controller_reference(log_rho, ratios, target):
  """float64: the next log rho from the ratios |m| / (rho B h + eps) of one update."""
  r = np.abs(np.concatenate([np.ravel(x) for x in ratios]))
  f_half, f_one, f_two = (np.mean(r < c) for c in (0.5, 1.0, 2.0))
  slope = (f_two - f_half) / math.log(4)
  step = np.clip(GAIN * (target - f_one) / max(slope, MIN_SLOPE), -MAX_STEP, MAX_STEP)
  return float(np.clip(log_rho + step, math.log(LOW), math.log(HIGH)))


def transform(target=None, b1=0.9, b2=0.9, block_size=8, interval=3, batch_tokens=50,
              bias_correction=True):
  return transforms.scale_by_clipped_curvature(
      b1=b1, rho="auto", eps=1e-12, batch_tokens=batch_tokens, target_unclipped=target,
      hessian=transforms.hessian_ema(b2=b2, block_size=block_size, hessian_interval=interval,
                                     bias_correction=bias_correction))


def run(tx, grads, estimates, params):
  """(updates, state) after every step, jitted."""
  state = tx.init(params)
  step = jax.jit(lambda g, s, e: tx.update(g, s, params, hessian_fn=lambda _: e))
  out = []
  for g, e in zip(grads, estimates):
    u, state = step(g, state, e)
    out.append((u, state))
  return out


PARAMS = {"w": jnp.zeros((6, 32)), "b": jnp.zeros((32,))}


def random_tree(rng, scale, positive=False, like=PARAMS):
  tree = {k: rng.normal(size=v.shape) * scale for k, v in like.items()}
  return {k: np.abs(v) if positive else v for k, v in tree.items()}


def f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


@pytest.mark.parametrize("target", [None, 0.15, 0.45])
def test_law_matches_float64_reference_step_by_step(target):
  """m, the block-reduced bias-corrected h, rho_t, the clipped update and log rho_(t+1),
  stepped side by side with a float64 NumPy implementation of section 3.5."""
  rng = np.random.default_rng(3)
  steps, b1, b2, batch, eps, block = 14, 0.9, 0.9, 50, 1e-12, 8
  grads = [random_tree(rng, 1e-2) for _ in range(steps)]
  estimates = [random_tree(rng, 1e-4, positive=t != 6) for t in range(steps)]  # one h < 0
  results = run(transform(target), map(f32, grads), map(f32, estimates), PARAMS)
  tau = transforms.DEFAULT_TARGET_UNCLIPPED if target is None else target
  m = {k: np.zeros(v.shape) for k, v in PARAMS.items()}
  h = {"w": np.zeros((6, 4)), "b": np.zeros(32)}
  log_rho, k, rhos = math.log(INITIAL), 0, []
  for t, (u, state) in enumerate(results):
    if t % 3 == 0:
      h["w"] = b2 * h["w"] + (1 - b2) * estimates[t]["w"].reshape(6, 4, block).mean(-1)
      h["b"] = b2 * h["b"] + (1 - b2) * estimates[t]["b"]
      k += 1
    rho = math.exp(log_rho)
    ratios = {}
    for key in m:
      m[key] = b1 * m[key] + (1 - b1) * grads[t][key]
      h_read = np.repeat(h[key], block, -1) if key == "w" else h[key]
      ratios[key] = m[key] / (rho * batch * np.maximum(h_read / (1 - b2 ** k), 0) + eps)
      np.testing.assert_allclose(u[key], np.clip(ratios[key], -1, 1), rtol=2e-5, atol=1e-6,
                                 err_msg=f"step {t}, {key}")
    assert float(state.rho) == pytest.approx(rho, rel=1e-5), t
    log_rho = controller_reference(log_rho, ratios.values(), tau)
    assert float(state.log_rho) == pytest.approx(log_rho, rel=1e-5, abs=1e-6), t
    rhos.append(rho)
  assert len(set(np.round(rhos, 6))) > steps // 2  # rho moved on most steps


def stationary(rng, n=4000):
  """b1 = b2 = 0, the same g and estimate every step: a fixed ratio distribution."""
  params = {"w": jnp.zeros((n // 40, 40))}
  g = f32({"w": rng.normal(size=(n // 40, 40)) * 1e-2})
  e = f32({"w": rng.lognormal(size=(n // 40, 40)) * 1e-4})
  return params, g, e


@pytest.mark.parametrize("target", [0.02, 0.15, 0.3, 0.45, 0.98])
def test_holds_the_target_at_the_band_edges_and_beyond(target):
  params, g, e = stationary(np.random.default_rng(0))
  tx = transform(target, b1=0.0, b2=0.0, block_size=1, interval=1, bias_correction=False)
  results = run(tx, [g] * 60, [e] * 60, params)
  unclipped = [1 - float(transforms.clip_fraction(s)) for _, s in results[-20:]]
  assert max(abs(f - target) for f in unclipped) < 0.01


def test_rho_moves_by_at_most_a_factor_two_per_update():
  params, g, e = stationary(np.random.default_rng(1))
  e = jax.tree.map(lambda x: x * 1e-6, e)  # the target needs rho ~ 1e6 times the initial
  tx = transform(0.3, b1=0.0, b2=0.0, block_size=1, interval=1, bias_correction=False)
  rhos = [float(s.rho) for _, s in run(tx, [g] * 12, [e] * 12, params)]
  np.testing.assert_allclose(np.array(rhos[1:]) / rhos[:-1], 2.0, rtol=1e-5)
  assert rhos[0] == pytest.approx(INITIAL)


@pytest.mark.parametrize("case", ["zero gradient", "single scalar leaf", "leaf with h = 0",
                                  "all h = 0", "non-finite estimate"])
def test_rho_stays_bounded_and_finite_on_degenerate_trees(case):
  rng = np.random.default_rng(2)
  params = dict(PARAMS)
  grads = [f32(random_tree(rng, 1e-2)) for _ in range(40)]
  estimates = [f32(random_tree(rng, 1e-4, positive=True)) for _ in range(40)]
  if case == "zero gradient":
    grads = [jax.tree.map(jnp.zeros_like, g) for g in grads]
  elif case == "single scalar leaf":
    params = {"s": jnp.zeros(())}
    grads = [{"s": jnp.asarray(rng.normal() * 1e-2, jnp.float32)} for _ in range(40)]
    estimates = [{"s": jnp.asarray(1e-4, jnp.float32)}] * 40
  elif case == "leaf with h = 0":
    estimates = [dict(e, b=jnp.zeros(32)) for e in estimates]
  elif case == "all h = 0":
    estimates = [jax.tree.map(jnp.zeros_like, e) for e in estimates]
  else:
    estimates[3] = dict(estimates[3], w=estimates[3]["w"].at[0, 0].set(jnp.nan))
  results = run(transform(interval=3), grads, estimates, params)
  rhos = np.array([float(s.rho) for _, s in results])
  assert np.all(np.isfinite(rhos)) and np.all((LOW * (1 - 1e-5) <= rhos)
                                              & (rhos <= HIGH * (1 + 1e-5)))
  assert all(np.all(np.isfinite(np.asarray(x))) for u, s in results
             for x in jax.tree.leaves((u, s.hessian.h)))
  if case == "zero gradient":  # every coordinate unclipped: rho falls to its floor
    assert rhos[-1] == pytest.approx(LOW, rel=1e-5)
  if case == "all h = 0":      # every coordinate clipped: rho rises to its ceiling
    assert rhos[-1] == pytest.approx(HIGH, rel=1e-5)
  if case == "leaf with h = 0":  # b (32 of 224 coordinates) is always clipped; w holds
    unclipped = [1 - float(transforms.clip_fraction(s)) for _, s in results[-10:]]
    assert abs(np.mean(unclipped) - transforms.DEFAULT_TARGET_UNCLIPPED) < 0.05
  if case == "non-finite estimate":
    assert int(results[-1][1].hessian.skipped) == 1


def test_resume_from_a_saved_state_is_bitwise():
  rng = np.random.default_rng(4)
  grads = [f32(random_tree(rng, 1e-2)) for _ in range(10)]
  estimates = [f32(random_tree(rng, 1e-4, positive=True)) for _ in range(10)]
  tx = transform()
  straight = run(tx, grads, estimates, PARAMS)
  # Stop after 5 updates, keep the state as host arrays (a checkpoint), continue.
  saved = jax.tree.map(np.asarray, straight[4][1])
  state = jax.tree.map(jnp.asarray, saved)
  step = jax.jit(lambda g, s, e: tx.update(g, s, PARAMS, hessian_fn=lambda _: e))
  for t in range(5, 10):
    u, state = step(grads[t], state, estimates[t])
    for a, b in zip(jax.tree.leaves((u, state)), jax.tree.leaves(straight[t])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_inject_hyperparams_traced_target_changed_at_run_time():
  from sophia_lambda_jax import optimizers

  rng = np.random.default_rng(5)
  params = {"layers": {0: {"mlp": {"kernel": jnp.zeros((8, 64))}}}}
  grads = [f32({"layers": {0: {"mlp": {"kernel": rng.normal(size=(8, 64)) * 1e-2}}}})
           for _ in range(30)]
  estimate = f32({"layers": {0: {"mlp": {"kernel": rng.lognormal(size=(8, 64)) * 1e-4}}}})
  kwargs = dict(learning_rate=1e-3, batch_tokens=64, layer_scale=None, rho="auto")
  injected = optax.inject_hyperparams(optimizers.sophia_lambda, static_args=("block_size",))(
      target_unclipped=0.3, **kwargs)
  plain = optimizers.sophia_lambda(target_unclipped=0.3, **kwargs)
  hfn = lambda _: estimate
  state, plain_state = injected.init(params), plain.init(params)
  assert set(state.hyperparams) >= {"target_unclipped", "learning_rate"}
  assert "rho" not in state.hyperparams  # "auto" is static
  step = jax.jit(lambda g, s: injected.update(g, s, params, hessian_fn=hfn))
  plain_step = jax.jit(lambda g, s: plain.update(g, s, params, hessian_fn=hfn))
  for g in grads[:15]:
    u, state = step(g, state)
    u_plain, plain_state = plain_step(g, plain_state)
    np.testing.assert_allclose(float(optimizers.current_rho(state)),
                               float(optimizers.current_rho(plain_state)), rtol=1e-5)
  state.hyperparams["target_unclipped"] = jnp.asarray(0.1)
  for g in grads[15:]:
    _, state = step(g, state)
    _, plain_state = plain_step(g, plain_state)
  low = 1 - float(optimizers.clip_fraction(state))
  assert abs(low - 0.1) < 0.05 and abs(1 - float(optimizers.clip_fraction(plain_state))
                                       - 0.3) < 0.05
  assert float(optimizers.current_rho(state)) < float(optimizers.current_rho(plain_state))
  # A numeric rho with a target is refused under inject_hyperparams too (when it builds).
  bad = optax.inject_hyperparams(optimizers.sophia)(learning_rate=1e-3, batch_tokens=64,
                                                     rho=0.1, target_unclipped=0.3)
  with pytest.raises(ValueError, match="target_unclipped"):
    bad.init(params)


def test_multisteps_steps_the_controller_once_per_update():
  from sophia_lambda_jax import optimizers

  rng = np.random.default_rng(6)
  params = {"w": jnp.zeros((8, 64))}
  micro = [f32({"w": rng.normal(size=(8, 64)) * 1e-2}) for _ in range(12)]
  estimate = f32({"w": rng.lognormal(size=(8, 64)) * 1e-4})
  make = lambda: optimizers.sophia(learning_rate=1e-2, batch_tokens=64, rho="auto",
                                   hessian_interval=2)
  multi, single = optax.MultiSteps(make(), every_k_schedule=3), make()
  hfn = lambda _: estimate
  step = jax.jit(lambda g, s: multi.update(g, s, params, hessian_fn=hfn))
  single_step = jax.jit(lambda g, s: single.update(g, s, params, hessian_fn=hfn))
  state, single_state = multi.init(params), single.init(params)
  for i in range(0, 12, 3):
    for g in micro[i:i + 3]:
      u, state = step(g, state)
    mean = jax.tree.map(lambda *x: sum(x) / 3, *micro[i:i + 3])
    u_single, single_state = single_step(mean, single_state)
    np.testing.assert_allclose(u["w"], u_single["w"], rtol=1e-5, atol=1e-7)
    assert float(optimizers.current_rho(state)) == pytest.approx(
        float(optimizers.current_rho(single_state)), rel=1e-6)
  assert float(optimizers.current_rho(state)) != pytest.approx(INITIAL)


def test_fixed_rho_state_records_it():
  tx = transforms.scale_by_clipped_curvature(rho=0.25, batch_tokens=4)
  state = tx.init(PARAMS)
  assert float(transforms.current_rho(state)) == pytest.approx(0.25)
  _, state = tx.update(f32(random_tree(np.random.default_rng(7), 1e-2)), state, PARAMS,
                       hessian_fn=lambda p: jax.tree.map(jnp.ones_like, p))
  assert float(state.rho) == pytest.approx(0.25)
  assert float(state.log_rho) == pytest.approx(math.log(0.25))
  assert float(state.scale) == pytest.approx(1.0)
  assert transforms.current_rho({"x": jnp.zeros(2)}) is None


@pytest.mark.parametrize("kwargs,named", [
    ({"rho": "Auto"}, "rho"), ({"rho": "fixed"}, "rho"), ({"rho": b"auto"}, "rho"),
    ({"rho": 0.04, "target_unclipped": 0.3}, "target_unclipped"),
    ({"rho": "auto", "target_unclipped": 0.0}, "target_unclipped"),
    ({"rho": "auto", "target_unclipped": 1.0}, "target_unclipped"),
    ({"rho": "auto", "target_unclipped": 1.5}, "target_unclipped"),
    ({"rho": "auto", "target_unclipped": float("nan")}, "target_unclipped"),
    ({"rho": "auto", "target_unclipped": "0.3"}, "target_unclipped"),
])
def test_bad_input_is_refused_at_construction(kwargs, named):
  with pytest.raises(ValueError, match=named):
    transforms.scale_by_clipped_curvature(batch_tokens=1, **kwargs)
