"""Hessian-diagonal estimators for the Sophia family.

Each constructor returns ``hessian_fn(params) -> pytree like params``, the argument that
second-order optimizers take in ``tx.update(grads, state, params, hessian_fn=hessian_fn)``.
The optimizer calls it only on refresh steps (inside ``jax.lax.cond``). The PRNG key is
fixed when the function is built: build a fresh ``hessian_fn`` every step with a fresh key
(e.g. ``jax.random.fold_in(key, step)``) so successive refreshes draw fresh noise.

* Gauss-Newton-Bartlett (GNB; Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order
  Optimizer for Language Model Pre-training", Algorithm 2). For a model with logits
  f(theta, x_b) over B tokens, sample y_hat_b ~ Categorical(softmax(f(theta, x_b))) (labels
  from the model's own distribution, without gradient) and take

      L_hat(theta) = 1/B * sum_b CE(f(theta, x_b), y_hat_b),    g_hat = grad L_hat(theta),
      h_new = g_hat * g_hat.

  Because E_y_hat[grad CE grad CE^T] = J^T H_CE J (the Gauss-Newton matrix) per token,
  B * g_hat * g_hat is an unbiased estimate of the Gauss-Newton diagonal of the token-mean
  loss. The factor B (``batch_tokens``) is applied by the optimizer, not here.

* Hutchinson (Hutchinson 1989, "A stochastic estimator of the trace of the influence matrix
  for Laplacian smoothing splines"; used per coordinate as in Sophia-H): with u Rademacher
  (entries +-1, independent per leaf), E[u * (H u)] = diag(H). H u is a Hessian-vector
  product by forward-over-reverse differentiation, ``jax.jvp`` of ``jax.grad``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
HessianFn = Callable[[PyTree], PyTree]


_SAMPLER_BLOCK = 128


def sample_categorical(key: jax.Array, probs: jax.Array) -> jax.Array:
  """One draw per row from Categorical(probs) over the last axis, by inverse CDF.

  A two-level search: u ~ U(0, total) picks the block of ``_SAMPLER_BLOCK`` classes whose
  cumulative mass first exceeds u, then the class inside it. It needs one uniform number
  per row, where ``jax.random.categorical`` (Gumbel-max) draws one per class: over a
  (2048, 8192) batch of logits on CPU that is ~0.1 s against ~0.7 s, and it matters because
  GNB samples a label for every token on each refresh step.

  Args:
    key: PRNG key.
    probs: (..., vocab) non-negative float32 weights (normalised or not).

  Returns:
    int32 array of shape ``probs.shape[:-1]``.
  """
  vocab = probs.shape[-1]
  block = min(_SAMPLER_BLOCK, vocab)
  padded = -(-vocab // block) * block
  if padded != vocab:
    probs = jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(0, padded - vocab)])
  blocks = probs.reshape(probs.shape[:-1] + (padded // block, block))
  block_mass = blocks.sum(-1)
  block_cdf = jnp.cumsum(block_mass, -1)
  u = jax.random.uniform(key, probs.shape[:-1], jnp.float32) * block_cdf[..., -1]
  chosen = jnp.minimum(jnp.sum(block_cdf <= u[..., None], -1), padded // block - 1)
  below = jnp.take_along_axis(block_cdf - block_mass, chosen[..., None], -1)[..., 0]
  inner = jnp.take_along_axis(blocks, chosen[..., None, None], -2)[..., 0, :]
  inner_cdf = below[..., None] + jnp.cumsum(inner, -1)
  within = jnp.minimum(jnp.sum(inner_cdf <= u[..., None], -1), block - 1)
  return jnp.minimum(chosen * block + within, vocab - 1).astype(jnp.int32)


def gnb_logits_cotangent(logits: jax.Array, key: jax.Array, mask=None) -> jax.Array:
  """d L_hat / d logits for GNB: (softmax(z) - onehot(y_hat)) * w / sum(w).

  y_hat ~ Categorical(softmax(stop_gradient(z))) per token; w is the token mask (1 where a
  token counts), so L_hat is the mean cross-entropy over unmasked tokens. Pulling this
  cotangent back through the model's vjp gives g_hat. With no unmasked token the cotangent
  is zero (the mean over zero tokens is taken as 0).

  Args:
    logits: (..., vocab) float array.
    key: PRNG key for the label draw.
    mask: None, or (...) bool / 0-1 array, True where the token counts.

  Returns:
    An array with the shape and dtype of ``logits``.
  """
  logits = jnp.asarray(logits)
  if logits.ndim < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(
        f"logits must be a float array of shape (..., vocab), got shape {logits.shape} "
        f"dtype {logits.dtype}")
  z = jax.lax.stop_gradient(logits).astype(jnp.float32)
  probs = jax.nn.softmax(z, axis=-1)
  labels = sample_categorical(key, probs)
  residual = probs - jax.nn.one_hot(labels, z.shape[-1], dtype=jnp.float32)
  if mask is None:
    weights = jnp.full(z.shape[:-1], 1.0 / max(1, labels.size), jnp.float32)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != z.shape[:-1]:
      raise ValueError(
          f"mask must have the shape of logits without the vocab axis, {z.shape[:-1]}, got "
          f"{mask.shape}")
    counts = mask.astype(jnp.float32)
    weights = counts / jnp.maximum(counts.sum(), 1.0)
  return (residual * weights[..., None]).astype(logits.dtype)


def gnb_cotangent_from_ce_cotangent(dlogits: jax.Array, labels: jax.Array,
                                    key: jax.Array) -> jax.Array:
  """The GNB cotangent of ``gnb_logits_cotangent``, from the training loss's own cotangent.

  A training step that differentiates the token-mean cross-entropy over N tokens already
  holds dlogits = (softmax(z) - onehot(y)) / N. Then softmax(z) = N * dlogits + onehot(y)
  (no second softmax over the vocabulary), y_hat is drawn from it with
  ``sample_categorical`` as ``gnb_logits_cotangent`` does, and

      (softmax(z) - onehot(y_hat)) / N = dlogits + (onehot(y) - onehot(y_hat)) / N.

  For the same key the draw is that of ``gnb_logits_cotangent(z, key)`` up to float
  rounding of the recovered probabilities. No token mask: every token counts, as in the
  token-mean loss.

  Args:
    dlogits: (..., vocab) gradient of the token-mean cross-entropy w.r.t. the logits.
    labels: (...) int labels y of that loss.
    key: PRNG key for the label draw.

  Returns:
    An array with the shape and dtype of ``dlogits``.
  """
  dlogits = jnp.asarray(dlogits)
  labels = jnp.asarray(labels)
  if dlogits.ndim < 1 or dlogits.shape[:-1] != labels.shape:
    raise ValueError(
        f"dlogits must have shape labels.shape + (vocab,), got dlogits {dlogits.shape} and "
        f"labels {labels.shape}")
  vocab, tokens = dlogits.shape[-1], max(1, labels.size)
  d = jax.lax.stop_gradient(dlogits).astype(jnp.float32)
  onehot_y = jax.nn.one_hot(labels, vocab, dtype=jnp.float32)
  # Rounding can leave the recovered probability of the label at -1e-8.
  probs = jnp.maximum(tokens * d + onehot_y, 0.0)
  y_hat = sample_categorical(key, probs)
  onehot_hat = jax.nn.one_hot(y_hat, vocab, dtype=jnp.float32)
  return (d + (onehot_y - onehot_hat) / tokens).astype(dlogits.dtype)


def _squared(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda g: g * g, tree)


def gauss_newton_bartlett_from_vjp(vjp_fn: Callable, logits: jax.Array, key: jax.Array,
                                   mask=None) -> HessianFn:
  """GNB estimate reusing a forward pass: one extra backward, no extra forward.

  Use the training step's own ``logits, vjp_fn = jax.vjp(logits_fn, params)``; the loss
  gradient and the GNB gradient are then two cotangents of the same vjp (Liu et al. 2023,
  Algorithm 2; see the module docstring for the equation). Returns g_hat * g_hat where
  g_hat is the gradient of the mean cross-entropy over unmasked tokens against labels
  sampled from Categorical(stop_gradient(logits)). The batch-size factor B is applied by
  the optimizer.

  Args:
    vjp_fn: the vjp closure of ``logits_fn`` at ``params`` (from ``jax.vjp``), with a
      single primal argument ``params``.
    logits: the primal output of that ``jax.vjp``, shape (..., vocab).
    key: PRNG key for the label draw.
    mask: None, or (...) bool / 0-1 array, True where the token counts.

  Returns:
    ``hessian_fn(params)``; it ignores its argument (the linearisation point is fixed by
    ``vjp_fn``) and is accepted for the optimizer's ``hessian_fn`` interface.
  """
  def hessian_fn(params=None):
    del params  # The linearisation point is the one vjp_fn was built at.
    (g_hat,) = vjp_fn(gnb_logits_cotangent(logits, key, mask))
    return _squared(g_hat)

  return hessian_fn


def gauss_newton_bartlett(logits_fn: Callable[[PyTree], jax.Array], key: jax.Array,
                          mask=None) -> HessianFn:
  """Gauss-Newton-Bartlett Hessian-diagonal estimate (Liu et al. 2023, Sophia-G).

  ``hessian_fn(params)`` runs ``logits, vjp = jax.vjp(logits_fn, params)``, samples
  y_hat ~ Categorical(stop_gradient(logits)) per token and returns g_hat * g_hat with
  g_hat = grad_params [1/|T| sum_{t in T} CE(logits_t, y_hat_t)] over the unmasked tokens
  T. Multiply by B = |T| (the optimizer's ``batch_tokens``) for the Gauss-Newton diagonal;
  that factor is applied in the optimizer, not here.

  Args:
    logits_fn: ``params -> logits`` of shape (..., vocab), the batch closed over.
    key: PRNG key for the label draw.
    mask: None, or (...) bool / 0-1 array, True where the token counts (padding False).

  Returns:
    ``hessian_fn(params) -> pytree like params``.
  """
  def hessian_fn(params):
    logits, vjp_fn = jax.vjp(logits_fn, params)
    return gauss_newton_bartlett_from_vjp(vjp_fn, logits, key, mask)(params)

  return hessian_fn


def hutchinson(loss_fn: Callable[[PyTree], jax.Array], key: jax.Array) -> HessianFn:
  """Hutchinson Hessian-diagonal estimate u * (H u) (Hutchinson 1989; Sophia-H).

  u has independent Rademacher entries (+-1 with probability 1/2), drawn per leaf with its
  own key split from ``key``; H u = d/de grad loss(params + e u) at e = 0 by
  ``jax.jvp(jax.grad(loss_fn), (params,), (u,))``. E[u * (H u)] = diag(H) since
  E[u_i u_j] = [i = j].

  Args:
    loss_fn: scalar ``params -> loss``.
    key: PRNG key for u.

  Returns:
    ``hessian_fn(params) -> pytree like params``.
  """
  def hessian_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(1, len(leaves)))
    u = [jax.random.rademacher(k, jnp.shape(x), dtype=jnp.result_type(x))
         for k, x in zip(keys, leaves)]
    u = jax.tree.unflatten(treedef, u)
    _, hessian_u = jax.jvp(jax.grad(loss_fn), (params,), (u,))
    return jax.tree.map(lambda a, b: a * b, u, hessian_u)

  return hessian_fn
