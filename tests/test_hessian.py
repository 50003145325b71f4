"""Tests for sophia_lambda_jax.hessian: Gauss-Newton-Bartlett and Hutchinson estimators."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sophia_lambda_jax import hessian

NUM_KEYS = 20_000


def softmax_regression(x):
  """logits = x @ w + b over tokens x (..., D); params {"w": (D, K), "b": (K,)}."""
  return lambda params: x @ params["w"] + params["b"]


def random_problem(seed, token_shape=(6,), dim=3, classes=5):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=token_shape + (dim,)), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=(dim, classes)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(classes,)), jnp.float32)}
  return x, params


@jax.jit
def gnb_once(x, params, key, mask=None):
  """One GNB estimate for softmax regression on tokens x (jitted: eager dispatch is slow)."""
  return hessian.gauss_newton_bartlett(softmax_regression(x), key, mask)(params)


def gnb_samples(logits_fn, params, mask=None, num_keys=NUM_KEYS, seed=0):
  keys = jax.random.split(jax.random.key(seed), num_keys)
  sample = lambda k: hessian.gauss_newton_bartlett(logits_fn, k, mask)(params)
  return jax.jit(jax.vmap(sample))(keys)


def expected_gnb(x, params, weights):
  """E over y ~ Categorical(p) of g_hat**2 for the weighted-mean CE of softmax regression.

  g_w[d, k] = sum_n w_n x_nd (p_nk - [y_n = k]) with w_n = mask_n / sum(mask); the residuals
  have mean 0 and variance p(1 - p) and are independent over tokens, so
  E[g_w**2] = sum_n w_n**2 x_nd**2 p_nk (1 - p_nk), and likewise for b with x = 1.
  """
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  logits = x @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  w2 = (np.asarray(weights, np.float64).reshape(-1) ** 2)[:, None]
  var = p * (1 - p) * w2
  return {"w": (x ** 2).T @ var, "b": var.sum(0)}


def assert_mean_within(samples, expected, num_se=5.0):
  samples = np.asarray(samples, np.float64)
  mean = samples.mean(0)
  se = samples.std(0) / np.sqrt(samples.shape[0])
  assert np.all(np.abs(mean - expected) <= num_se * se + 1e-9), (mean, expected, se)
  return mean, se


# --- Gauss-Newton-Bartlett ----------------------------------------------------------------


def test_gnb_expectation_matches_closed_form():
  x, params = random_problem(0)
  samples = gnb_samples(softmax_regression(x), params)
  num_tokens = x.shape[0]
  expected = expected_gnb(x, params, np.full(num_tokens, 1.0 / num_tokens))
  for name in ("w", "b"):
    mean, se = assert_mean_within(samples[name], expected[name])
    np.testing.assert_allclose(mean, expected[name], rtol=0.06)
  # The test has the power to see the label distribution: labels drawn uniformly instead of
  # from the model would give E[g**2] = Var + E[g]**2 with E[g] != 0, far outside 5 s.e.
  p = jax.nn.softmax(softmax_regression(x)(params), axis=-1)
  classes = p.shape[-1]
  uniform_mean = np.asarray(x.T @ (p - 1 / classes)) / num_tokens
  uniform_var = np.asarray(x.T ** 2).sum(1, keepdims=True) * (1 / classes) * (1 - 1 / classes)
  uniform = uniform_mean ** 2 + uniform_var / num_tokens ** 2
  mean_w = np.asarray(samples["w"], np.float64).mean(0)
  se_w = np.asarray(samples["w"], np.float64).std(0) / np.sqrt(NUM_KEYS)
  assert np.max(np.abs(mean_w - uniform) / se_w) > 20


def test_gnb_labels_follow_the_model_distribution():
  # One-hot tokens make g_w[n] = (p_n - onehot(y_n)) / N, so each sample reveals its labels:
  # N**2 g**2 - p**2 = (1 - 2p) [y_n = k].
  probs = np.array([[0.7, 0.2, 0.06, 0.04], [0.15, 0.05, 0.35, 0.45]])
  num_tokens = probs.shape[0]
  x = jnp.eye(num_tokens)
  params = {"w": jnp.log(jnp.asarray(probs, jnp.float32)), "b": jnp.zeros(4)}
  samples = gnb_samples(softmax_regression(x), params)
  squared = num_tokens ** 2 * np.asarray(samples["w"], np.float64)
  indicator = (squared - probs ** 2) / (1 - 2 * probs)
  np.testing.assert_allclose(indicator, np.round(indicator), atol=2e-3)  # exactly one-hot
  np.testing.assert_array_equal(np.round(indicator).sum(-1), 1)
  frequencies = np.round(indicator).mean(0)
  se = np.sqrt(probs * (1 - probs) / NUM_KEYS)
  assert np.all(np.abs(frequencies - probs) <= 5 * se), (frequencies, probs)
  # The bias gradient sums the same residuals over tokens: g_b = mean_n (p_n - onehot(y_n)).
  g_b = (probs[None] - np.round(indicator)).mean(1)
  np.testing.assert_allclose(np.asarray(samples["b"]), g_b ** 2, atol=1e-5)


def test_gnb_is_the_squared_autodiff_gradient_of_the_sampled_loss():
  probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.05, 0.9, 0.05]])
  x = jnp.eye(3)
  params = {"w": jnp.log(jnp.asarray(probs, jnp.float32)), "b": jnp.asarray([0.1, -0.2, 0.3])}
  logits_fn = softmax_regression(x)
  p = np.asarray(jax.nn.softmax(logits_fn(params)))
  grad_at = jax.jit(jax.grad(
      lambda q, y: optax.softmax_cross_entropy_with_integer_labels(logits_fn(q), y).mean()))
  for seed in range(5):
    estimate = gnb_once(x, params, jax.random.key(seed))
    # Recover the sampled labels from the w estimate (one-hot tokens, see above)...
    indicator = (9 * np.asarray(estimate["w"]) - p ** 2) / (1 - 2 * p)
    labels = np.argmax(indicator, axis=-1)
    # ...and compare with autodiff of the token-mean cross-entropy at those labels.
    grads = grad_at(params, labels)
    for name in ("w", "b"):
      np.testing.assert_allclose(estimate[name], grads[name] ** 2, rtol=1e-4, atol=1e-7)


def test_from_vjp_equals_logits_fn_form_without_an_extra_forward():
  x, params = random_problem(1, token_shape=(2, 4))
  forward_calls = []

  def logits_fn(q):
    forward_calls.append(1)  # Counted at trace/eager time: one per forward pass.
    return softmax_regression(x)(q)

  key = jax.random.key(7)
  direct = hessian.gauss_newton_bartlett(logits_fn, key)(params)
  forward_calls.clear()
  logits, vjp_fn = jax.vjp(logits_fn, params)
  reused = hessian.gauss_newton_bartlett_from_vjp(vjp_fn, logits, key)
  assert len(forward_calls) == 1
  estimate = reused(None)  # the params argument is ignored
  assert len(forward_calls) == 1  # one backward, no extra forward
  for name in ("w", "b"):
    np.testing.assert_allclose(estimate[name], direct[name], rtol=1e-6, atol=1e-9)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), reused(params), estimate)


def test_mask_excludes_padding_tokens():
  x, params = random_problem(2, token_shape=(2, 4))
  mask = np.array([[True, True, True, False], [True, False, False, False]])
  key = jax.random.key(3)
  # Padding content is irrelevant: change the masked tokens, same key, same estimate.
  garbage = jnp.where(jnp.asarray(mask)[..., None], x, 100.0 * jnp.ones_like(x))

  @jax.jit  # one compile for all variants
  def variants(x, garbage, params, key, mask):
    gnb = lambda tokens, m: hessian.gauss_newton_bartlett(softmax_regression(tokens), key, m)
    return (gnb(x, mask)(params), gnb(garbage, mask)(params),
            gnb(x, mask.astype(jnp.float32))(params), gnb(x, None)(params),
            gnb(x, jnp.ones_like(mask))(params), gnb(x, jnp.zeros_like(mask))(params))

  estimate, same, as_floats, unmasked, all_true, none_counted = variants(
      x, garbage, params, key, mask)
  for name in ("w", "b"):
    np.testing.assert_allclose(same[name], estimate[name], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(as_floats[name], estimate[name], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(all_true[name], unmasked[name], rtol=1e-6, atol=1e-9)
  assert not np.allclose(unmasked["w"], estimate["w"])
  # The mean runs over the 4 unmasked tokens only.
  samples = gnb_samples(softmax_regression(x), params, mask=mask)
  expected = expected_gnb(x, params, mask / mask.sum())
  for name in ("w", "b"):
    assert_mean_within(samples[name], expected[name])
  assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(none_counted))


def test_gnb_bf16_logits():
  x, params = random_problem(4)
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  key = jax.random.key(0)
  low = gnb_once(x.astype(jnp.bfloat16), bf16, key)
  full = gnb_once(x, params, key)
  assert low["w"].dtype == jnp.bfloat16
  # bf16 rounding may flip a label draw; compare the typical magnitude, not elementwise.
  np.testing.assert_allclose(float(jnp.mean(low["w"].astype(jnp.float32))),
                             float(jnp.mean(full["w"])), rtol=0.5)


@pytest.mark.parametrize("mask", [np.ones((6,)), np.ones((2, 3))])
def test_gnb_rejects_a_mask_of_the_wrong_shape(mask):
  x, params = random_problem(0, token_shape=(2, 6))
  hessian_fn = hessian.gauss_newton_bartlett(softmax_regression(x), jax.random.key(0), mask)
  with pytest.raises(ValueError, match="mask must have the shape"):
    jax.eval_shape(hessian_fn, params)  # raised while tracing, nothing compiled


def test_gnb_rejects_integer_logits():
  with pytest.raises(ValueError, match="logits must be a float array"):
    jax.eval_shape(hessian.gauss_newton_bartlett(lambda p: jnp.ones((3, 4), jnp.int32),
                                                 jax.random.key(0)), jnp.ones(2))


# --- Hutchinson -----------------------------------------------------------------------------


def quadratic_problem(seed=0):
  """loss = 0.5 z^T A z + c^T z over z = concat(a, b), with a strong a_i <-> b_i coupling."""
  rng = np.random.default_rng(seed)
  n = 6
  off = 0.1 * rng.normal(size=(2 * n, 2 * n))
  a_matrix = (off + off.T) / 2
  a_matrix[np.arange(n), np.arange(n) + n] = a_matrix[np.arange(n) + n, np.arange(n)] = 0.8
  np.fill_diagonal(a_matrix, rng.uniform(2.0, 4.0, size=2 * n))
  c = rng.normal(size=2 * n)
  a_jax, c_jax = jnp.asarray(a_matrix, jnp.float32), jnp.asarray(c, jnp.float32)

  def loss_fn(params):
    z = jnp.concatenate([params["a"], params["b"].reshape(-1)])
    return 0.5 * z @ a_jax @ z + c_jax @ z

  params = {"a": jnp.asarray(rng.normal(size=n), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}
  return loss_fn, params, a_matrix


def test_hutchinson_converges_to_the_diagonal():
  loss_fn, params, a_matrix = quadratic_problem()
  keys = jax.random.split(jax.random.key(1), 50_000)
  samples = jax.jit(jax.vmap(lambda k: hessian.hutchinson(loss_fn, k)(params)))(keys)
  flat = np.concatenate([np.asarray(samples["a"]), np.asarray(samples["b"]).reshape(-1, 6)], 1)
  diagonal = np.diag(a_matrix)
  # Within 2% (the a_i <-> b_i coupling of 0.8 would bias every entry by 20-40% if both
  # leaves shared one u).
  np.testing.assert_allclose(flat.mean(0), diagonal, rtol=0.02)
  # Rademacher u gives Var[u_i (H u)_i] = sum_{j != i} A_ij**2 exactly (a Gaussian u would
  # add 2 A_ii**2).
  expected_var = (a_matrix ** 2).sum(1) - diagonal ** 2
  np.testing.assert_allclose(flat.var(0), expected_var, rtol=0.1)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
  weights = {"a": jnp.asarray([1.0, 2.0, 3.0]), "b": jnp.asarray([[0.5, 4.0]])}
  loss_fn = lambda p: sum(jnp.sum(w * jnp.sin(p[k]) ** 2) for k, w in weights.items())
  params = {"a": jnp.asarray([0.1, -0.3, 0.7]), "b": jnp.asarray([[1.1, -0.2]])}
  estimate_at = jax.jit(lambda p, k: hessian.hutchinson(loss_fn, k)(p))
  for seed in range(3):
    estimate = estimate_at(params, jax.random.key(seed))
    for k, w in weights.items():  # d2/dx2 w sin(x)^2 = 2 w cos(2x)
      np.testing.assert_allclose(estimate[k], 2 * w * jnp.cos(2 * params[k]), rtol=1e-5)


# --- jit ------------------------------------------------------------------------------------


def test_estimators_work_under_jit_with_traced_keys():
  x, params = random_problem(5, token_shape=(3, 2))
  mask = jnp.asarray([[1, 1], [1, 0], [0, 1]])
  loss_fn, quad_params, _ = quadratic_problem(1)
  key = jax.random.key(11)

  def both(p, q, k):
    gnb = hessian.gauss_newton_bartlett(softmax_regression(x), k, mask)(p)
    logits, vjp_fn = jax.vjp(softmax_regression(x), p)
    reused = hessian.gauss_newton_bartlett_from_vjp(vjp_fn, logits, k, mask)(p)
    return gnb, reused, hessian.hutchinson(loss_fn, k)(q)

  jitted = jax.jit(both)(params, quad_params, key)
  # The same computation with the key as a compile-time constant.
  constant_key = jax.jit(lambda p, q: both(p, q, key))(params, quad_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               jitted, constant_key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
               jitted[0], jitted[1])
  eager = hessian.hutchinson(loss_fn, key)(quad_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               jitted[2], eager)
  other = jax.jit(both)(params, quad_params, jax.random.key(12))
  assert not np.allclose(other[2]["a"], jitted[2]["a"])  # the traced key is really used


def _ce_cotangent(logits, labels):
  """d/dz of the token-mean cross-entropy: what a training step holds after its loss."""
  return jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(
      z, labels).mean())(logits)


@pytest.mark.parametrize("vocab", [5, 128, 300])
def test_sample_categorical_matches_the_distribution(vocab):
  logits = jax.random.normal(jax.random.PRNGKey(vocab), (vocab,)) * 2.0
  logits = logits.at[vocab // 2].set(-jnp.inf)  # a class of probability zero
  probs = jax.nn.softmax(logits)
  draws = 200_000
  labels = hessian.sample_categorical(
      jax.random.PRNGKey(7), jnp.broadcast_to(probs, (draws, vocab)))
  assert labels.shape == (draws,) and labels.dtype == jnp.int32
  freq = np.bincount(np.asarray(labels), minlength=vocab) / draws
  assert freq[vocab // 2] == 0.0
  p = np.asarray(probs, np.float64)
  tolerance = 5 * np.sqrt(p * (1 - p) / draws) + 1e-6
  assert np.all(np.abs(freq - p) <= tolerance), np.max(np.abs(freq - p) - tolerance)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_head_cotangents_equal_the_pullback_of_the_gnb_logits_cotangent(dtype, tol):
  """The gather / scatter-add form equals pulling the dense GNB cotangent back through
  logits = hidden @ head, for the labels that cotangent draws."""
  rng = np.random.default_rng(5)
  hidden = jnp.asarray(rng.normal(size=(3, 16, 8)), dtype)
  head = jnp.asarray(rng.normal(size=(8, 300)), dtype)
  labels = jnp.asarray(rng.integers(0, 300, size=(3, 16)), jnp.int32)

  def logits_fn(h, w):
    return jnp.dot(h, w, preferred_element_type=jnp.float32)

  z, vjp_head = jax.vjp(logits_fn, hidden, head)
  dhidden, dhead = vjp_head(_ce_cotangent(z, labels))
  for seed in range(3):
    key = jax.random.key(seed)
    want = vjp_head(hessian.gnb_logits_cotangent(z, key))
    y_hat = hessian.sample_categorical(key, jax.nn.softmax(z))
    got = hessian.gnb_head_cotangents(labels, y_hat, hidden, head, dhidden, dhead)
    for g, w in zip(got, want):
      assert g.shape == w.shape and g.dtype == w.dtype == dtype
      scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                 atol=tol * scale)
    # Not the loss's own cotangents: the sampled labels differ from y.
    assert not np.allclose(np.asarray(got[1], np.float32), np.asarray(dhead, np.float32))


def test_head_cotangents_reject_mismatched_shapes():
  labels = jnp.zeros((2, 3), jnp.int32)
  hidden, head = jnp.zeros((2, 3, 4)), jnp.zeros((4, 5))
  with pytest.raises(ValueError, match="hidden and dhidden must have shape"):
    hessian.gnb_head_cotangents(labels, labels, hidden[:, :2], head, hidden[:, :2], head)
  with pytest.raises(ValueError, match="head and dhead must have the same shape"):
    hessian.gnb_head_cotangents(labels, labels, hidden, head, hidden, head[:, :4])
  with pytest.raises(ValueError, match="y_hat must have the shape of labels"):
    hessian.gnb_head_cotangents(labels, labels[:, :2], hidden, head, hidden, head)


def test_nnx_params_fn_works_under_nnx_optimizer_where_a_model_closure_fails():
  """nnx.Optimizer passes hessian_fn to the optimizer, which calls it inside lax.cond: a
  closure running nnx.grad on the model fails there (Flax: different trace level) and the
  optimizer says what to use instead; nnx_params_fn gives the estimate of the pure
  function of the params."""
  nnx = pytest.importorskip("flax.nnx")
  import sophia_lambda_jax as slj

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(7, 4, rngs=rngs)
      self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
      self.lm_head = nnx.Linear(4, 7, rngs=rngs)

    def __call__(self, x):
      h = self.embed(x)
      for layer in self.layers:
        h = jax.nn.gelu(layer(h))
      return self.lm_head(h)

  x = jnp.arange(6).reshape(2, 3) % 7
  key = jax.random.key(0)

  def closure(model):
    def hessian_fn(params):
      del params
      grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(
          m(x), jax.random.categorical(key, jax.lax.stop_gradient(m(x)))).mean())(model)
      return jax.tree.map(jnp.square, nnx.state(grads, nnx.Param))
    return hessian_fn

  def run(make_hessian_fn):
    model = Model(nnx.Rngs(0))
    tx = slj.sophia(learning_rate=0.0, batch_tokens=x.size, b2=0.0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(lambda m: m(x).mean())(model)
    nnx.jit(lambda m, o, g: o.update(m, g, hessian_fn=make_hessian_fn(m)))(
        model, optimizer, grads)
    state = nnx.as_pure(optimizer.opt_state)
    return model, next(s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(
        s, slj.transforms.HessianEMAState)) if isinstance(s, slj.transforms.HessianEMAState)).h

  with pytest.raises(ValueError, match=r"nnx_params_fn\(model") as excinfo:
    run(closure)
  assert "different trace level" in str(excinfo.value.__cause__)

  model, h = run(lambda m: hessian.gauss_newton_bartlett(
      hessian.nnx_params_fn(m, lambda module: module(x)), key))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure = lambda p: nnx.merge(graphdef, p, rest)(x)
  want = jax.jit(lambda p: hessian.gauss_newton_bartlett(pure, key)(p))(params)
  for got_leaf, want_leaf in zip(jax.tree.leaves(h), jax.tree.leaves(want)):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-10)
  assert any(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(h))
