"""The train step: loss, gradients, curvature estimate, clipping and the optimizer update.

The model comes split at its output layer, `features_fn(params, x) -> (hidden, head)` with
logits z = hidden @ head, so the step differentiates the output layer itself and never holds
the logits (`output_layer.cross_entropy`: blocks of vocabulary columns, recomputed in the
backward pass). One call of `train_step(state, batch)` is one optimizer step:

    for each of A micro-batches (x_a, y_a)  (A = grad_accum, a lax.scan):
        (h_a, W), vjp_a   = jax.vjp(lambda p: features_fn(p, x_a), params)  one forward
        loss_a, (dh, dW)  = value_and_grad(cross_entropy)(h_a, W, y_a)      blockwise
        g_a               = vjp_a(dh, dW)                                   one backward
    g = mean_a g_a ;  loss = mean_a loss_a
    g = clip_by_global_norm(g, grad_clip)
    updates, opt_state = tx.update(g, opt_state, params, hessian_fn=...)
    params = params + updates

For the Sophia family the optimizer receives the curvature through `hessian_fn`:

- GNB (sophia, sophia_lambda): the step branches on `transforms.hessian_refresh_due`
  (the optimizer's own refresh test), so plain steps pay nothing for the estimate and
  refresh steps form it from the step's own passes. The loss's pass over the vocabulary
  blocks also draws y_hat ~ Categorical(z) per token; the GNB logits cotangent
  (softmax(z) - onehot(y_hat)) / N differs from the loss's (softmax(z) - onehot(y)) / N in
  two entries per token, so its cotangents at the head's inputs are the loss's plus a
  gather and a scatter-add (`hessian.gnb_head_cotangents`), pulled back through the same
  vjp while its residuals are alive: one extra backward through the layers below the head,
  none through the head, per micro-batch. g_hat = mean_a g_hat_a covers the step's whole
  batch (the optimizer multiplies by batch_tokens = all of the step's tokens), and the
  estimate is g_hat * g_hat.
- Hutchinson (sophia_h): u * (H u) of the last micro-batch's loss by forward-over-reverse,
  called inside the optimizer's cond on refresh steps only.

Labels and probe vectors come from `fold_in(state.rng, state.step)`: fresh every step,
identical on restart and independent of the mesh (jax's partitionable threefry).

Parameters are float32 ("master" weights); the model computes in its compute dtype and the
logits accumulate in float32, so the loss, gradients and optimizer state are float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sophia_lambda_jax import hessian as hessian_lib
from sophia_lambda_jax import transforms
from sophia_lambda_jax.models import output_layer

PyTree = Any
# (params, input_ids (..., seq)) -> (hidden (..., seq, d), head (d, vocab)), in the
# model's compute dtype; the logits are hidden @ head. E.g. `models.qwen.features`.
FeaturesFn = Callable[[PyTree, jax.Array], tuple[jax.Array, jax.Array]]


class TrainState(NamedTuple):
  """Everything that changes from step to step (and is checkpointed).

  step: int32 scalar, optimizer steps applied so far (also the data position).
  params: float32 parameter pytree.
  opt_state: the optimizer's state.
  rng: uint32[2] base key of the run; step keys are fold_in(rng, step).
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array


def _split_batch(batch: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(..., seq+1) token windows -> inputs (..., seq) and next-token labels (..., seq)."""
  return batch[..., :-1], batch[..., 1:]


def _micro_batch(features_fn: FeaturesFn, params: PyTree, tokens: jax.Array,
                 key: jax.Array | None):
  """Loss and gradient of one micro-batch and, with a key, its GNB gradient g_hat."""
  x, y = _split_batch(tokens)
  (hidden, head), vjp_features = jax.vjp(lambda p: features_fn(p, x), params)
  loss, vjp_head, y_hat = jax.vjp(
      lambda h, w: output_layer.cross_entropy(h, w, y, key), hidden, head, has_aux=True)
  dhidden, dhead = vjp_head(jnp.ones_like(loss))
  (grads,) = vjp_features((dhidden, dhead))
  if key is None:
    return loss, grads, None
  (g_hat,) = vjp_features(hessian_lib.gnb_head_cotangents(y, y_hat, hidden, head, dhidden,
                                                          dhead))
  return loss, grads, g_hat


def accumulate(features_fn: FeaturesFn, params: PyTree, batch: jax.Array, grad_accum: int,
               key: jax.Array | None = None):
  """Mean loss and gradient over the micro-batches and, with a key, the mean GNB gradient
  g_hat (micro-batch a draws with the a-th of `split(key, A)`; with A = 1, with `key`)."""
  if grad_accum == 1:
    return _micro_batch(features_fn, params, batch, key)
  keys = None if key is None else jax.random.split(key, grad_accum)

  def body(sums, tokens_and_key):
    out = _micro_batch(features_fn, params, *tokens_and_key)
    return jax.tree.map(jnp.add, sums, out), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  start = (jnp.zeros((), jnp.float32), zeros, None if key is None else zeros)
  sums, _ = jax.lax.scan(body, start, (batch, keys))
  return jax.tree.map(lambda s: s / grad_accum, sums)


def gnb_estimate(features_fn: FeaturesFn, params: PyTree, batch: jax.Array, key: jax.Array,
                 grad_accum: int):
  """(loss, gradient, g_hat * g_hat) of the step's whole batch (module docstring)."""
  loss, grads, g_hat = accumulate(features_fn, params, batch, grad_accum, key)
  return loss, grads, jax.tree.map(jnp.square, g_hat)


def _gradients_and_gnb(features_fn, grad_accum, refresh: bool, params, batch, key):
  """Loss, gradient and, on refresh steps, the GNB estimate from the same passes (zeros on
  other steps, where the optimizer does not read it)."""
  if refresh:
    return gnb_estimate(features_fn, params, batch, key, grad_accum)
  loss, grads, _ = accumulate(features_fn, params, batch, grad_accum)
  # Zeros made from the gradient: XLA then fills them at the end of the branch instead of
  # holding a parameter-sized buffer through all of it.
  return loss, grads, jax.tree.map(lambda g: 0.0 * g, grads)


def _last_micro_batch(batch: jax.Array, grad_accum: int) -> jax.Array:
  return batch if grad_accum == 1 else batch[-1]


def loss_grads_and_hessian_fn(features_fn: FeaturesFn, estimator: str | None,
                              grad_accum: int, state: TrainState, batch: jax.Array):
  """(loss, gradient, hessian_fn or None) of one step, the estimate per `estimator`."""
  params = state.params
  key = jax.random.fold_in(state.rng, state.step)
  if estimator is None:
    loss, grads, _ = accumulate(features_fn, params, batch, grad_accum)
    return loss, grads, None
  if estimator == "hutchinson":
    loss, grads, _ = accumulate(features_fn, params, batch, grad_accum)
    x, y = _split_batch(_last_micro_batch(batch, grad_accum))
    return loss, grads, hessian_lib.hutchinson(
        lambda p: output_layer.cross_entropy(*features_fn(p, x), y)[0], key)
  # The estimate is formed in the step's own branch on the optimizer's refresh test, not
  # inside the optimizer's cond: as operands of that cond the backward's residuals slowed
  # every step down (docs/decisions.md).
  due = transforms.hessian_refresh_due(state.opt_state)
  loss, grads, estimate = jax.lax.cond(
      due, functools.partial(_gradients_and_gnb, features_fn, grad_accum, True),
      functools.partial(_gradients_and_gnb, features_fn, grad_accum, False),
      params, batch, key)
  def is_ema(x):
    return isinstance(x, transforms.HessianEMAState)

  if sum(map(is_ema, jax.tree.leaves(state.opt_state, is_leaf=is_ema))) == 1:
    # `due` is the optimizer's own test on the state it updates: it refreshes exactly then.
    return loss, grads, lambda _: estimate
  # Another Hessian EMA may refresh when the first does not: it gets a recomputed estimate,
  # never the zeros. (Compiled only here: the recomputation held about 0.8 GB beside the
  # step's gradient at the paper's micro-batch, docs/decisions.md.)

  def recomputed(_):
    return gnb_estimate(features_fn, params, batch, key, grad_accum)[2]

  def hessian_fn(p):
    return jax.lax.cond(due, lambda _: estimate, recomputed, p)

  return loss, grads, hessian_fn


def train_step(state: TrainState, batch: jax.Array, *, features_fn: FeaturesFn,
               tx: optax.GradientTransformationExtraArgs, estimator: str | None,
               grad_accum: int, clip: optax.GradientTransformation | None,
               learning_rate_fn, optimizer_metrics) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step (see the module docstring); `make_train_step` binds the options."""
  loss, grads, hessian_fn = loss_grads_and_hessian_fn(features_fn, estimator, grad_accum,
                                                      state, batch)
  params = state.params
  grad_norm = optax.tree.norm(grads)
  if clip is not None:
    grads, _ = clip.update(grads, clip.init(params))
  if hessian_fn is None:
    updates, opt_state = tx.update(grads, state.opt_state, params)
  else:
    updates, opt_state = tx.update(grads, state.opt_state, params, hessian_fn=hessian_fn)
  params = optax.apply_updates(params, updates)
  metrics = {"loss": loss, "grad_norm": grad_norm}
  if learning_rate_fn is not None:
    metrics["lr"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
  if optimizer_metrics is not None:
    after = optimizer_metrics(opt_state)
    metrics.update(after)
    if "hessian_refreshes" in after:  # did this step refresh the curvature estimate?
      before = optimizer_metrics(state.opt_state)["hessian_refreshes"]
      metrics["refresh"] = after["hessian_refreshes"] > before
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=state.rng)
  return new_state, metrics


def make_train_step(features_fn: FeaturesFn, tx: optax.GradientTransformationExtraArgs, *,
                    estimator: str | None, grad_accum: int = 1,
                    grad_clip: float | None = 1.0,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
                    optimizer_metrics: Callable[[PyTree], dict[str, jax.Array]] | None = None):
  """Build `train_step(state, batch) -> (state, metrics)` (not yet jitted).

  Args:
    features_fn: (params, input_ids) -> (hidden, head), the model split at its output
      layer (logits = hidden @ head); see `FeaturesFn`.
    tx: the optimizer; when `estimator` is set it must accept `hessian_fn`.
    estimator: None (first-order), "gnb" or "hutchinson".
    grad_accum: A; `batch` then has shape (A, micro_batch, seq + 1).
    grad_clip: global-norm threshold or None.
    learning_rate_fn: step -> learning rate, only for the metrics.
    optimizer_metrics: opt_state -> dict of scalars (refresh interval, clip fraction...);
      when it reports "hessian_refreshes", metrics also get "refresh" (this step refreshed).

  Returns:
    A pure function; metrics hold loss, grad_norm (before clipping) and lr.
  """
  if estimator not in (None, "gnb", "hutchinson"):
    raise ValueError(f"estimator must be None, 'gnb' or 'hutchinson', got {estimator!r}")
  return functools.partial(
      train_step, features_fn=features_fn, tx=tx, estimator=estimator, grad_accum=grad_accum,
      clip=optax.clip_by_global_norm(grad_clip) if grad_clip is not None else None,
      learning_rate_fn=learning_rate_fn, optimizer_metrics=optimizer_metrics)


def make_eval_step(features_fn: FeaturesFn):
  """`eval_step(params, batch) -> token-mean validation loss` (not yet jitted)."""
  def eval_step(params, batch):
    x, y = _split_batch(batch)
    return output_layer.cross_entropy(*features_fn(params, x), y)[0]
  return eval_step
