"""The train step: loss, gradients, curvature estimate, clipping and the optimizer update.

One call of `train_step(state, batch)` is one optimizer step:

    for each of A micro-batches (x_a, y_a)  (A = grad_accum, a lax.scan):
        logits_a, vjp_a = jax.vjp(lambda p: apply(p, x_a), params)      one forward
        loss_a, dz_a    = value_and_grad(token-mean CE)(logits_a, y_a)
        g_a             = vjp_a(dz_a)                                   one backward
    g = mean_a g_a ;  loss = mean_a loss_a
    g = clip_by_global_norm(g, grad_clip)
    updates, opt_state = tx.update(g, opt_state, params, hessian_fn=...)
    params = params + updates

For the Sophia family `hessian_fn` is handed to the optimizer, which calls it inside its
`lax.cond` on refresh steps only, so other steps pay nothing for it:

- GNB (sophia, sophia_lambda): the estimate reuses the step's forward pass. The second
  cotangent (softmax(z) - onehot(y_hat)) / N with y_hat ~ Categorical(z) is built from the
  loss's own cotangent dz = (softmax(z) - onehot(y)) / N
  (`hessian.gnb_cotangent_from_ce_cotangent`: no second softmax over the vocabulary) and
  pulled back through the same vjp: one extra backward. With A > 1 the GNB gradient must
  cover the whole step's batch (the optimizer multiplies by batch_tokens = all of the
  step's tokens), so hessian_fn pulls the last micro-batch's cotangent back through its
  kept vjp and recomputes the forward of the first A - 1 micro-batches
  (g_hat = mean_a g_hat_a, then g_hat * g_hat).
- Hutchinson (sophia_h): u * (H u) of the last micro-batch's loss by forward-over-reverse.

Labels and probe vectors come from `fold_in(state.rng, state.step)`: fresh every step,
identical on restart and independent of the mesh (jax's partitionable threefry).

Parameters are float32 ("master" weights); the model computes in its compute dtype and
returns float32 logits, so the loss, gradients and optimizer state are float32.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sophia_lambda_jax import hessian as hessian_lib
from sophia_lambda_jax import transforms

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]  # (params, input_ids) -> logits

# Which curvature estimator each second-order optimizer uses (SPEC 2).
ESTIMATORS = {"sophia": "gnb", "sophia_g": "gnb", "sophia_lambda": "gnb",
              "sophia_h": "hutchinson"}


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


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Token-mean cross-entropy in float32: mean_t [logsumexp(z_t) - z_t[y_t]]."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  return losses.mean()


def _split_batch(batch: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(..., seq+1) token windows -> inputs (..., seq) and next-token labels (..., seq)."""
  return batch[..., :-1], batch[..., 1:]


def _forward(apply_fn: ApplyFn, params: PyTree, tokens: jax.Array):
  """Loss of one micro-batch and (dlogits, labels, vjp_fn): its cotangent at the logits and
  the model's vjp, from which the gradient and the GNB gradient are pulled back."""
  x, y = _split_batch(tokens)
  logits, vjp_fn = jax.vjp(lambda p: apply_fn(p, x), params)
  loss, dlogits = jax.value_and_grad(cross_entropy)(logits, y)
  return loss, (dlogits.astype(logits.dtype), y, vjp_fn)


def _loss_grads_and_vjp(apply_fn: ApplyFn, params: PyTree, tokens: jax.Array):
  loss, last = _forward(apply_fn, params, tokens)
  dlogits, _, vjp_fn = last
  (grads,) = vjp_fn(dlogits)
  return loss, grads, last


def _gnb_gradient(apply_fn: ApplyFn, params: PyTree, inputs: jax.Array,
                  key: jax.Array) -> PyTree:
  """g_hat of one micro-batch with its own forward pass (used for A > 1 only)."""
  logits, vjp_fn = jax.vjp(lambda p: apply_fn(p, inputs), params)
  (g_hat,) = vjp_fn(hessian_lib.gnb_logits_cotangent(logits, key))
  return g_hat


def make_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformationExtraArgs, *,
                    estimator: str | None, grad_accum: int = 1,
                    grad_clip: float | None = 1.0,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
                    optimizer_metrics: Callable[[PyTree], dict[str, jax.Array]] | None = None):
  """Build `train_step(state, batch) -> (state, metrics)` (not yet jitted).

  Args:
    apply_fn: (params, input_ids) -> float32 logits (batch, seq, vocab).
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
  clip = optax.clip_by_global_norm(grad_clip) if grad_clip is not None else None

  def accumulate(params, batch):
    """Mean loss and gradient over the micro-batches; the last one's vjp is kept."""
    if grad_accum == 1:
      return _loss_grads_and_vjp(apply_fn, params, batch)

    def body(carry, tokens):
      loss_sum, grad_sum = carry
      loss, grads, _ = _loss_grads_and_vjp(apply_fn, params, tokens)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                           batch[:-1])
    loss, grads, last = _loss_grads_and_vjp(apply_fn, params, batch[-1])
    loss = (loss_sum + loss) / grad_accum
    grads = jax.tree.map(lambda s, g: (s + g) / grad_accum, grad_sum, grads)
    return loss, grads, last

  def make_hessian_fn(params, batch, last, key):
    dlogits, labels, vjp_fn = last
    if estimator == "hutchinson":
      x, y = _split_batch(batch if grad_accum == 1 else batch[-1])
      return hessian_lib.hutchinson(lambda p: cross_entropy(apply_fn(p, x), y), key)
    if grad_accum == 1:
      def hessian_fn(_):
        (g_hat,) = vjp_fn(hessian_lib.gnb_cotangent_from_ce_cotangent(dlogits, labels, key))
        return jax.tree.map(jnp.square, g_hat)

      return hessian_fn

    def hessian_fn(_):
      keys = jax.random.split(key, grad_accum)
      (g_last,) = vjp_fn(
          hessian_lib.gnb_cotangent_from_ce_cotangent(dlogits, labels, keys[-1]))

      def body(g_sum, inputs_and_key):
        inputs, k = inputs_and_key
        return jax.tree.map(jnp.add, g_sum, _gnb_gradient(apply_fn, params, inputs, k)), None

      inputs = _split_batch(batch[:-1])[0]
      g_sum, _ = jax.lax.scan(body, g_last, (inputs, keys[:-1]))
      return jax.tree.map(lambda g: jnp.square(g / grad_accum), g_sum)

    return hessian_fn

  def recomputed_gnb(params, batch, key):
    """The GNB hessian_fn of make_hessian_fn, but running the last micro-batch's forward
    pass itself instead of sharing the step's (used where the step keeps no vjp)."""
    def hessian_fn(p):
      _, last = _forward(apply_fn, params, batch if grad_accum == 1 else batch[-1])
      return make_hessian_fn(params, batch, last, key)(p)

    return hessian_fn

  def step_with(state, batch, keep_vjp: bool):
    params = state.params
    key = jax.random.fold_in(state.rng, state.step)
    loss, grads, last = accumulate(params, batch)
    if estimator is None:
      hessian_fn = None
    elif keep_vjp or estimator == "hutchinson":
      hessian_fn = make_hessian_fn(params, batch, last, key)
    else:
      # `last` unused: the step's residuals end with its own backward.
      hessian_fn = recomputed_gnb(params, batch, key)
    grad_norm = optax.tree.norm(grads)
    if clip is not None:
      grads, _ = clip.update(grads, clip.init(params))
    if hessian_fn is None:
      updates, opt_state = tx.update(grads, state.opt_state, params)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, params, hessian_fn=hessian_fn)
    return optax.apply_updates(params, updates), opt_state, loss, grad_norm

  def train_step(state: TrainState, batch: jax.Array):
    due = (transforms.hessian_refresh_due(state.opt_state) if estimator == "gnb" else None)
    if due is None:
      params, opt_state, loss, grad_norm = step_with(state, batch, keep_vjp=False)
    else:
      # GNB needs the forward pass's vjp on refresh steps only. Using it inside the
      # optimizer's cond keeps the backward's residuals alive as cond operands, which made
      # every step about 7% slower on qwen-cpu; so plain steps run a step that keeps no vjp
      # (its hessian_fn, which the optimizer would call only if `due` were wrong, runs its
      # own forward), and refresh steps one that reuses it.
      params, opt_state, loss, grad_norm = jax.lax.cond(
          due, lambda: step_with(state, batch, keep_vjp=True),
          lambda: step_with(state, batch, keep_vjp=False))
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

  return train_step


def make_eval_step(apply_fn: ApplyFn):
  """`eval_step(params, batch) -> token-mean validation loss` (not yet jitted)."""
  def eval_step(params, batch):
    x, y = _split_batch(batch)
    return cross_entropy(apply_fn(params, x), y)
  return eval_step
