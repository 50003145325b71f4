"""The output layer's cross-entropy without the (tokens x vocabulary) logits.

For hidden states h (N, d) and the output matrix W (d, V) the logits are z = h W and the
token-mean cross-entropy against labels y is

    L = 1/N sum_t [lse(z_t) - z_t[y_t]],    lse(z_t) = log sum_v exp(z_tv).

`cross_entropy` runs over blocks of B vocabulary columns W_b (a `lax.scan`): it carries each
row's running maximum m, the sum s = sum exp(z - m) over the blocks seen (the online
logsumexp, Milakov & Gimelshein 2018, "Online normalizer calculation for softmax") and the
label's logit, so only one block's logits z_b = h W_b (N, B) exist at a time, accumulated in
float32 from operands in the compute dtype; lse = m + log s. The scan body is under
`jax.checkpoint`, so the backward pass keeps only the carries and recomputes each block's
logits, forming dz_b = (softmax(z)_b - onehot(y)_b) / N, dh += dz_b W_b^T and
dW_b = h^T dz_b: one more (N, d) x (d, V) matmul than keeping the logits, none of them held.
m enters the carry without a derivative (lse(z) = m + log sum exp(z - m) for any constant m),
so every order of derivative is exact: the Hessian-vector products of Hutchinson's estimator
go through the same function.

Blocks are at most `MAX_COLUMNS` wide, also when the whole vocabulary's logits would fit:
on XLA:CPU the cpu protocol's step ran faster with its 8,192 columns in blocks of 1,024
(recomputed) than as one block kept for the backward pass (docs/decisions.md).

With a key, the same pass also draws the Gauss-Newton-Bartlett labels y_hat_t ~ softmax(z_t)
(`hessian` module docstring) by weighted reservoir sampling over the blocks: block b's draw,
by inverse CDF over its own columns (`hessian.inverse_cdf`), replaces the row's label so far
with probability S_b / s_b, where S_b is the block's mass and s_b the mass of blocks 0..b,
so the label that survives block b is distributed as softmax over those columns. One uniform
number u per row and block decides both: replace when u s_b < S_b, and draw with u s_b / S_b,
uniform on [0, 1) given the replacement. Block 0 uses the key itself, so a one-block
vocabulary draws the labels of `hessian.sample_categorical(key, softmax(z))` (up to float
rounding); block b > 0 uses `fold_in(key, b)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sophia_lambda_jax import hessian

# Width of the blocks `hessian.inverse_cdf` searches first, and what a vocabulary block's
# width is a multiple of.
_COLUMNS = 128
# Columns per vocabulary block at most (module docstring), and the bytes of one block's
# float32 logits at most.
MAX_COLUMNS = 1024
BLOCK_BYTES = 2**28


def block_width(tokens: int, vocab: int) -> int:
  """Columns per vocabulary block for `tokens` rows: the whole vocabulary if it is at most
  `MAX_COLUMNS` wide and its float32 logits fit in `BLOCK_BYTES`; else the narrowest
  multiple of 128 that covers it in as few blocks within both limits as possible."""
  widest = max(_COLUMNS, min(MAX_COLUMNS, BLOCK_BYTES // (4 * tokens)) // _COLUMNS * _COLUMNS)
  if vocab <= widest:
    return vocab
  count = -(-vocab // widest)
  return -(-vocab // (count * _COLUMNS)) * _COLUMNS


def cross_entropy(hidden: jax.Array, head: jax.Array, labels: jax.Array,
                  key: jax.Array | None = None, width: int | None = None):
  """Token-mean cross-entropy of logits hidden @ head, blockwise (module docstring).

  Args:
    hidden: (..., d) the output layer's input, in the compute dtype.
    head: (d, V) the output matrix.
    labels: (...) int labels in [0, V).
    key: PRNG key; with it, also draw y_hat ~ softmax(hidden @ head) per token.
    width: columns per vocabulary block; default `block_width(tokens, V)`.

  Returns:
    (loss, y_hat): loss a float32 scalar; y_hat int32 of shape labels.shape (without
    gradient), or None without a key.
  """
  labels = jnp.asarray(labels)
  d, vocab = head.shape
  if hidden.shape != labels.shape + (d,):
    raise ValueError(f"hidden must have shape labels.shape + (d,) = {labels.shape + (d,)}, "
                     f"got {hidden.shape} (head {head.shape})")
  tokens = max(1, labels.size)
  width = block_width(tokens, vocab) if width is None else width
  count = -(-vocab // width)
  rows = hidden.reshape(tokens, d)
  y = labels.reshape(tokens)
  floor = jnp.finfo(jnp.float32).min  # exp(floor - m) == 0 for any finite m

  def block(carry, block_in):
    m, s, z_label, y_hat = carry
    w, start, bias, block_key = block_in
    z = jnp.dot(rows, w, preferred_element_type=jnp.float32)  # (N, width)
    if bias is not None:  # floor at the zero-padded columns of the last block
      z = z + bias
    columns = start + jnp.arange(width)
    m_new = jax.lax.stop_gradient(jnp.maximum(m, z.max(-1)))
    e = jnp.exp(z - m_new[:, None])
    mass = e.sum(-1)
    s_new = s * jnp.exp(m - m_new) + mass
    # A product with the label's indicator, not a select against a constant: XLA:CPU
    # materialises such constants at full size outside the loop.
    z_label = z_label + jnp.sum(z * (columns == y[:, None]), -1)
    if block_key is not None:
      u = jax.random.uniform(block_key, labels.shape, jnp.float32).reshape(tokens)
      mass, total = jax.lax.stop_gradient((mass, s_new))
      draw = start + hessian.inverse_cdf(u * total / mass, jax.lax.stop_gradient(e))
      y_hat = jnp.where(u * total < mass, jnp.minimum(draw, vocab - 1), y_hat)
    return (m_new, s_new, z_label, y_hat), None

  zeros = jnp.zeros((tokens,), jnp.float32)
  carry = (jnp.full((tokens,), floor), zeros, zeros,
           None if key is None else jnp.zeros((tokens,), jnp.int32))
  padding = count * width - vocab
  blocks = jnp.pad(head, ((0, 0), (0, padding))).reshape(d, count, width).transpose(1, 0, 2)
  bias = None
  if padding:
    bias = jnp.where(jnp.arange(count * width) < vocab, 0.0, floor).reshape(count, width)
  keys = None
  if key is not None:
    keys = jnp.concatenate([key[None], jax.vmap(lambda b: jax.random.fold_in(key, b))(
        jnp.arange(1, count))])
  (m, s, z_label, y_hat), _ = jax.lax.scan(
      jax.checkpoint(block, prevent_cse=False), carry,
      (blocks, jnp.arange(count) * width, bias, keys))
  loss = jnp.mean(m + jnp.log(s) - z_label)
  return loss, None if y_hat is None else y_hat.reshape(labels.shape)
