"""train/step.py: the GNB refresh shares the step's forward pass and equals the stand-alone
estimate, the step is the same whichever branch a (wrong) refresh guess picks, and the
model's blockwise loss and gradients equal the full-logits ones, on one device and sharded."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia_lambda_jax as slj
from sophia_lambda_jax import hessian, transforms
from sophia_lambda_jax.train import step as step_lib

VOCAB, DIM, BATCH, SEQ = 11, 6, 4, 5


def features_fn(params, ids):
  return jnp.tanh(params["embed"][ids]), params["head"]


def apply_fn(params, ids):
  hidden, head = features_fn(params, ids)
  return jnp.dot(hidden, head, preferred_element_type=jnp.float32)


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


def run(grad_accum, steps=5, tx=None):
  tx = tx or slj.sophia(learning_rate=0.05, batch_tokens=BATCH * SEQ * grad_accum,
                        hessian_interval=2)
  train_step = jax.jit(step_lib.make_train_step(features_fn, tx, estimator="gnb",
                                                grad_accum=grad_accum))
  state, losses = init(tx), []
  for batch in batches(grad_accum, steps):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def two_hessian_emas(grad_accum):
  """Sophia refreshing every 3rd step behind a second Hessian EMA refreshing every 2nd:
  the step's refresh test reads the first, so on steps 2 and 3 it guesses wrong."""
  return optax.chain(transforms.hessian_ema(hessian_interval=2),
                     slj.sophia(learning_rate=0.05, batch_tokens=BATCH * SEQ * grad_accum,
                                hessian_interval=3))


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("guess", [True, False, None])
def test_a_wrong_refresh_guess_changes_nothing(monkeypatch, grad_accum, guess):
  """With a Hessian EMA that the step's test does not read, a wrong guess (the step's own,
  or one forced either way) still gives the optimizer the estimate it asks for: the run
  equals the run of a step that knows (the guess always True computes every estimate)."""
  monkeypatch.setattr(transforms, "hessian_refresh_due", lambda state: jnp.asarray(True))
  want_state, want_losses = run(grad_accum, tx=two_hessian_emas(grad_accum))
  monkeypatch.undo()
  if guess is not None:
    monkeypatch.setattr(transforms, "hessian_refresh_due", lambda state: jnp.asarray(guess))
  got_state, got_losses = run(grad_accum, tx=two_hessian_emas(grad_accum))
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got_state.params, want_state.params)

  def is_ema(x):
    return isinstance(x, transforms.HessianEMAState)

  def hs(state):
    return [x.h for x in jax.tree.leaves(state.opt_state, is_leaf=is_ema) if is_ema(x)]

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12),
               hs(got_state), hs(want_state))


def test_one_hessian_ema_needs_no_recomputed_estimate(monkeypatch):
  """The step's test is the optimizer's own for its only Hessian EMA: the estimate is
  traced once (the refresh branch), not again as a fallback inside the optimizer."""
  traced = []
  estimate = step_lib.gnb_estimate
  monkeypatch.setattr(step_lib, "gnb_estimate", lambda *a: traced.append(1) or estimate(*a))
  tx = slj.sophia(learning_rate=0.05, batch_tokens=BATCH * SEQ, hessian_interval=2)
  step = step_lib.make_train_step(features_fn, tx, estimator="gnb")
  jax.eval_shape(step, init(tx), batches(1, 1)[0])
  assert len(traced) == 1
  tx = two_hessian_emas(1)
  jax.eval_shape(step_lib.make_train_step(features_fn, tx, estimator="gnb"), init(tx),
                 batches(1, 1)[0])
  assert len(traced) == 3


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


# ----------------------------------------------------------------------------- the model


def _reference_loss(features, params, tokens):
  """The full-logits loss: float32 logits of the whole vocabulary, optax's cross-entropy."""
  hidden, head = features(params, tokens[..., :-1])
  z = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(z, tokens[..., 1:]).mean()


@pytest.mark.parametrize("mesh", ["data=1,fsdp=1", "data=2,fsdp=4"])
def test_qwen_loss_and_gradients_equal_the_full_logits(monkeypatch, mesh):
  """qwen-tiny in float32, its 1,024-token vocabulary in 3 blocks of 384 columns (the last
  one padded), on one device and sharded over 8: max |new - old| <= 1e-5 max |old| per
  leaf, old being the full-logits loss on one device."""
  from sophia_lambda_jax import train
  from sophia_lambda_jax.models import output_layer
  from sophia_lambda_jax.train import loop
  from sophia_lambda_jax.train import mesh as mesh_lib

  config = train.TrainConfig(model="qwen-tiny", optimizer="adamw", batch_size=8, seq_len=32,
                             compute_dtype="float32", mesh=mesh)
  tokens = 8 * 32
  monkeypatch.setattr(output_layer, "BLOCK_BYTES", tokens * 4 * 384)
  assert output_layer.block_width(tokens, 1024) == 384
  device_mesh = mesh_lib.make_mesh(mesh)
  model = loop.ModelFunctions(config, device_mesh)
  one = loop.ModelFunctions(dataclasses.replace(config, mesh="data=1,fsdp=1"),
                           mesh_lib.make_mesh("data=1,fsdp=1"))
  params = jax.tree.map(np.asarray, one.init_params())
  batch = np.random.default_rng(0).integers(0, 1024, size=(8, 33)).astype(np.int32)
  want_loss, want_grads = jax.jit(jax.value_and_grad(
      lambda p, b: _reference_loss(one.features, p, b)))(params, batch)
  batch_sharding = mesh_lib.batch_sharding(device_mesh)
  new = jax.jit(lambda p, b: step_lib.accumulate(model.features, p, b, 1)[:2],
                in_shardings=(model.shardings, batch_sharding))
  loss, grads = new(jax.device_put(params, model.shardings),
                    jax.device_put(batch, batch_sharding))
  assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))

  def close(path, got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), \
        jax.tree_util.keystr(path)

  jax.tree_util.tree_map_with_path(close, grads, want_grads)
