"""train/step.py: the GNB refresh shares the step's forward pass and equals the stand-alone
estimate, and the step is the same whichever branch a (wrong) refresh guess picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sophia_lambda_jax as slj
from sophia_lambda_jax import hessian, transforms
from sophia_lambda_jax.train import step as step_lib

VOCAB, DIM, BATCH, SEQ = 11, 6, 4, 5


def features_fn(params, ids):
  return jnp.tanh(params["embed"][ids]), params["head"]


def apply_fn(params, ids):
  return step_lib.logits(*features_fn(params, ids))


def init(tx, seed=0):
  rng = np.random.default_rng(seed)
  params = {"embed": jnp.asarray(rng.normal(size=(VOCAB, DIM)), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(DIM, VOCAB)), jnp.float32)}
  return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(3))


def batches(grad_accum, n):
  rng = np.random.default_rng(1)
  shape = ((grad_accum,) if grad_accum > 1 else ()) + (BATCH, SEQ + 1)
  return [jnp.asarray(rng.integers(0, VOCAB, size=shape), jnp.int32) for _ in range(n)]


def run(grad_accum, steps=5):
  tx = slj.sophia(learning_rate=0.05, batch_tokens=BATCH * SEQ * grad_accum,
                  hessian_interval=2)
  train_step = jax.jit(step_lib.make_train_step(features_fn, tx, estimator="gnb",
                                                grad_accum=grad_accum))
  state, losses = init(tx), []
  for batch in batches(grad_accum, steps):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("guess", [True, False])
def test_a_wrong_refresh_guess_changes_nothing(monkeypatch, grad_accum, guess):
  """Forcing the step's branch (always the one that forms the estimate, or always the one
  that does not, so the optimizer's hessian_fn runs its own forward) gives the same run."""
  want_state, want_losses = run(grad_accum)
  monkeypatch.setattr(transforms, "hessian_refresh_due", lambda state: jnp.asarray(guess))
  got_state, got_losses = run(grad_accum)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got_state.params, want_state.params)

  def h(state):
    return transforms._find(state.opt_state, transforms.HessianEMAState)[0].h

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12),
               h(got_state), h(want_state))


def test_refresh_step_estimate_is_gnb_of_the_step_batch():
  """After step 0 (a refresh), h = (1 - b2) g_hat^2 with g_hat the GNB gradient of the
  step's own batch and key fold_in(rng, 0), as the stand-alone estimator computes it."""
  tx = slj.sophia(learning_rate=0.05, batch_tokens=BATCH * SEQ, b2=0.9, hessian_interval=2)
  state = init(tx)
  batch = batches(1, 1)[0]
  new_state, metrics = jax.jit(step_lib.make_train_step(features_fn, tx, estimator="gnb"))(
      state, batch)
  key = jax.random.fold_in(state.rng, 0)
  want = hessian.gauss_newton_bartlett(lambda p: apply_fn(p, batch[:, :-1]), key)(
      state.params)
  got = transforms._find(new_state.opt_state, transforms.HessianEMAState)[0].h
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, 0.1 * w, rtol=1e-5, atol=1e-12),
               got, want)
  assert float(jnp.max(got["head"])) > 0
