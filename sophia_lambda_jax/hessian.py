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

* Flax NNX models: ``nnx_params_fn(model, fn)`` turns ``fn(model)`` into the
  ``params -> ...`` function the estimators take (see its docstring for why a closure over
  the model fails under ``nnx.Optimizer``).

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


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """(..., vocab) -> (..., vocab / block, block), zero-padded to a multiple of `block`."""
  vocab = x.shape[-1]
  padded = -(-vocab // block) * block
  if padded != vocab:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded - vocab)])
  return x.reshape(x.shape[:-1] + (padded // block, block))


def inverse_cdf(u: jax.Array, weights: jax.Array) -> jax.Array:
  """The class at fraction u of each row's cumulative weight: a draw from Categorical(weights)
  for u ~ U(0, 1).

  A two-level search: u times the row's total picks the block of ``_SAMPLER_BLOCK`` classes
  whose cumulative weight first exceeds it, then the class inside that block.

  Args:
    u: (...) numbers in [0, 1).
    weights: (..., vocab) non-negative float32 weights (normalised or not).

  Returns:
    int32 array of shape ``u.shape``, in [0, vocab).
  """
  vocab = weights.shape[-1]
  block = min(_SAMPLER_BLOCK, vocab)
  blocks = _blocks(weights, block)
  block_mass = blocks.sum(-1)
  block_cdf = jnp.cumsum(block_mass, -1)
  u = u * block_cdf[..., -1]
  n_blocks = block_mass.shape[-1]
  chosen = jnp.minimum(jnp.sum(block_cdf <= u[..., None], -1), n_blocks - 1)
  below = jnp.take_along_axis(block_cdf - block_mass, chosen[..., None], -1)[..., 0]
  inside = jnp.take_along_axis(blocks, chosen[..., None, None], -2)[..., 0, :]
  inner_cdf = below[..., None] + jnp.cumsum(inside, -1)
  within = jnp.minimum(jnp.sum(inner_cdf <= u[..., None], -1), block - 1)
  return jnp.minimum(chosen * block + within, vocab - 1).astype(jnp.int32)


def sample_categorical(key: jax.Array, probs: jax.Array) -> jax.Array:
  """One draw per row from Categorical(probs) over the last axis, by inverse CDF.

  ``inverse_cdf`` at one uniform number per row, where ``jax.random.categorical``
  (Gumbel-max) draws one per class; GNB samples a label for every token on each refresh
  step (timings: docs/decisions.md).

  Args:
    key: PRNG key.
    probs: (..., vocab) non-negative float32 weights (normalised or not).

  Returns:
    int32 array of shape ``probs.shape[:-1]``.
  """
  return inverse_cdf(jax.random.uniform(key, probs.shape[:-1], jnp.float32), probs)


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


def gnb_head_cotangents(labels: jax.Array, y_hat: jax.Array, hidden: jax.Array,
                        head: jax.Array, dhidden: jax.Array,
                        dhead: jax.Array) -> tuple[jax.Array, jax.Array]:
  """GNB cotangents at the inputs of the output layer, without a second pass through it.

  For logits z = hidden @ head (hidden (N, d), head (d, V)) and the token-mean
  cross-entropy over N tokens with cotangent dz, the step's backward through the head gives
  dhidden = dz head^T and dhead = hidden^T dz. The GNB cotangent at the logits is
  dz_hat = (softmax(z) - onehot(y_hat)) / N = dz + (onehot(y) - onehot(y_hat)) / N,
  which differs from dz in two entries per row, so

      dhidden_hat = dhidden + (head[:, y] - head[:, y_hat])^T / N      (a gather)
      dhead_hat   = dhead + hidden^T (onehot(y) - onehot(y_hat)) / N   (a scatter-add)

  and pulling (dhidden_hat, dhead_hat) back through the rest of the model gives g_hat.
  The two (N, V) x d products of a second backward through the head become O(N d) work.
  y_hat ~ Categorical(softmax(z)) comes from the loss's own pass over the logits
  (``models.output_layer.cross_entropy`` with a key).

  Args:
    labels: (...) int labels y of the loss.
    y_hat: (...) int labels drawn from the model's distribution.
    hidden: (..., d) the head's input; head: (d, V) its matrix.
    dhidden, dhead: the cotangents of hidden and head from the loss.

  Returns:
    (dhidden_hat, dhead_hat) with the shapes and dtypes of (dhidden, dhead).
  """
  labels, y_hat = jnp.asarray(labels), jnp.asarray(y_hat)
  width = head.shape[0]
  if y_hat.shape != labels.shape:
    raise ValueError(f"y_hat must have the shape of labels {labels.shape}, got {y_hat.shape}")
  if hidden.shape != labels.shape + (width,) or dhidden.shape != hidden.shape:
    raise ValueError(
        f"hidden and dhidden must have shape labels.shape + (d,) = {labels.shape + (width,)}"
        f", got {hidden.shape} and {dhidden.shape}")
  if dhead.shape != head.shape:
    raise ValueError(f"head and dhead must have the same shape (d, vocab), got {head.shape} "
                     f"and {dhead.shape}")
  tokens = max(1, labels.size)
  y, y_hat = labels.reshape(-1), y_hat.reshape(-1)
  head = jax.lax.stop_gradient(head)
  column = lambda i: jnp.take(head, i, axis=1).astype(jnp.float32)  # (d, N)
  dhidden_hat = (dhidden.astype(jnp.float32)
                 + ((column(y) - column(y_hat)).T / tokens).reshape(dhidden.shape))
  # Row t of hidden / N goes to dhead's column y_t and, negated, to column y_hat_t: added
  # into (a float32 copy of) dhead itself, not into a zero (V, d) buffer of its own.
  rows = jax.lax.stop_gradient(hidden).reshape(-1, width).astype(jnp.float32) / tokens
  dhead_hat = dhead.astype(jnp.float32).at[:, jnp.concatenate([y, y_hat])].add(
      jnp.concatenate([rows, -rows]).T)
  return dhidden_hat.astype(dhidden.dtype), dhead_hat.astype(dhead.dtype)


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
  ``g_hat = grad_params [1/|T| sum_{t in T} CE(logits_t, y_hat_t)]`` over the unmasked
  tokens T. Multiply by ``B = |T|`` (the optimizer's ``batch_tokens``) for the Gauss-Newton
  diagonal; that factor is applied in the optimizer, not here.

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


def nnx_params_fn(model, fn: Callable[[Any], Any], wrt=None) -> Callable[[PyTree], Any]:
  """``params -> fn(model with params)`` for a Flax NNX ``model``, safe in ``lax.cond``.

  The optimizers call ``hessian_fn`` inside ``jax.lax.cond`` (so steps without a refresh
  pay nothing), which is a new trace level. A ``hessian_fn`` that touches ``model`` there,
  e.g. ``nnx.grad(loss)(model)`` or ``nnx.update(model, params)``, fails with Flax's
  "Cannot extract graph node from different trace level" / "Cannot mutate ... from a
  different trace level"; one that calls ``model(x)`` while ignoring ``params`` would
  differentiate nothing. This helper splits ``model`` into its graph, the ``wrt``
  variables and the rest *now* (in the training step, outside the cond) and returns a
  function that merges a fresh module from the graph, the params it is given and the rest,
  so inside the cond only arrays cross the boundary::

      @nnx.jit
      def train_step(model, optimizer, x, y, key):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        logits_fn = slj.hessian.nnx_params_fn(model, lambda m: m(x))
        hessian_fn = slj.hessian.gauss_newton_bartlett(logits_fn, key)
        optimizer.update(model, grads, hessian_fn=hessian_fn)
        return loss

  Build it every step (after the model's last update), like the ``hessian_fn`` itself.
  Changes ``fn`` makes to the merged copy's variables (dropout RNG counts, batch
  statistics) are not written back to ``model``.

  Args:
    model: an ``nnx.Module``.
    fn: ``module -> output``, e.g. ``lambda m: m(x)`` for the logits.
    wrt: the filter of the variables ``params`` holds: that of ``nnx.Optimizer(...,
      wrt=...)``; default ``nnx.Param``.

  Returns:
    ``params -> fn(merged module)``, taking the ``nnx.State`` (or its pure dict) of the
    ``wrt`` variables, as ``nnx.Optimizer`` passes it to ``tx.update``.
  """
  from flax import nnx  # only this helper needs flax; the estimators above do not

  graphdef, _, rest = nnx.split(model, nnx.Param if wrt is None else wrt, ...)

  def params_fn(params):
    return fn(nnx.merge(graphdef, params, rest))

  return params_fn
