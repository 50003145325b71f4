"""models/output_layer.py: the blockwise cross-entropy equals the full-logits one in value and
in first and second derivatives, its label draw follows softmax(z), and the block rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sophia_lambda_jax import hessian
from sophia_lambda_jax.models import output_layer

D, VOCAB = 16, 300


def full_logits_loss(hidden, head, labels):
  """The reference: float32 logits of the whole vocabulary and optax's cross-entropy."""
  z = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()


def problem(dtype=jnp.float32, rows=(3, 20), vocab=VOCAB, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=rows + (D,)), dtype)
  head = jnp.asarray(rng.normal(size=(D, vocab)) * 0.5, dtype)
  labels = jnp.asarray(rng.integers(0, vocab, size=rows), jnp.int32)
  return hidden, head, labels


def blockwise_loss(width):
  return lambda h, w, y: output_layer.cross_entropy(h, w, y, width=width)[0]


def assert_close(got, want, rel=1e-5):
  """max |got - want| <= rel * max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) <= rel * np.max(np.abs(want)), np.max(np.abs(got - want))


# One block, blocks that divide the vocabulary, and blocks whose last one is zero-padded.
@pytest.mark.parametrize("width", [VOCAB, 100, 128])
def test_loss_and_gradients_equal_the_full_logits(width):
  hidden, head, labels = problem()
  want, want_grads = jax.value_and_grad(full_logits_loss, (0, 1))(hidden, head, labels)
  got, got_grads = jax.jit(jax.value_and_grad(blockwise_loss(width), (0, 1)))(
      hidden, head, labels)
  assert_close(got, want)
  for g, w in zip(got_grads, want_grads):
    assert_close(g, w)


@pytest.mark.parametrize("width", [VOCAB, 128])
def test_hessian_vector_products_equal_the_full_logits(width):
  """Forward-over-reverse (Hutchinson's H u) goes through the blocks exactly."""
  hidden, head, labels = problem(seed=1)
  rng = np.random.default_rng(2)
  tangents = (jnp.asarray(rng.normal(size=hidden.shape), jnp.float32),
              jnp.asarray(rng.normal(size=head.shape), jnp.float32))

  def hvp(loss):
    grad = jax.grad(lambda h, w: loss(h, w, labels), (0, 1))
    return jax.jvp(grad, (hidden, head), tangents)[1]

  for g, w in zip(jax.jit(lambda: hvp(blockwise_loss(width)))(), hvp(full_logits_loss)):
    assert_close(g, w)


def test_bfloat16_operands_accumulate_in_float32():
  hidden, head, labels = problem(jnp.bfloat16)
  want = full_logits_loss(hidden, head, labels)
  for width in (VOCAB, 128):
    loss, _ = output_layer.cross_entropy(hidden, head, labels, width=width)
    assert loss.dtype == jnp.float32
    assert_close(loss, want, rel=1e-5)
    grads = jax.grad(blockwise_loss(width), (0, 1))(hidden, head, labels)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_one_block_draws_the_labels_of_sample_categorical():
  hidden, head, labels = problem(rows=(4, 64), seed=3)
  z = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
  for seed in range(3):
    key = jax.random.key(seed)
    _, y_hat = output_layer.cross_entropy(hidden, head, labels, key)
    assert y_hat.shape == labels.shape and y_hat.dtype == jnp.int32
    np.testing.assert_array_equal(y_hat, hessian.sample_categorical(key, jax.nn.softmax(z)))


@pytest.mark.parametrize("width", [VOCAB, 128])
def test_drawn_labels_follow_softmax(width):
  """One row repeated: the draws' frequencies are softmax(z) over the whole vocabulary,
  whichever block a class sits in (128-wide blocks: 3, the last one padded)."""
  hidden, head, _ = problem(rows=(1,), seed=4)
  head = head.at[:, 7].set(-50.0 * hidden[0] / jnp.sum(hidden[0] ** 2))  # z_7 = -50
  rows = 40_000
  hidden = jnp.broadcast_to(hidden, (rows, D))
  labels = jnp.zeros((rows,), jnp.int32)
  # Arguments, not constants: XLA would fold the whole draw at compile time.
  draw = jax.jit(lambda *a: output_layer.cross_entropy(*a, width=width)[1])
  y_hat = np.concatenate([np.asarray(draw(hidden, head, labels, jax.random.key(s)))
                          for s in range(5)])
  p = np.asarray(jax.nn.softmax(jnp.dot(hidden[0], head)), np.float64)
  freq = np.bincount(y_hat, minlength=VOCAB) / y_hat.size
  assert y_hat.max() < VOCAB and freq[7] == 0.0
  tolerance = 5 * np.sqrt(p * (1 - p) / y_hat.size) + 1e-6
  assert np.all(np.abs(freq - p) <= tolerance), np.max(np.abs(freq - p) - tolerance)


def test_block_width_rule():
  columns, budget = output_layer.MAX_COLUMNS, output_layer.BLOCK_BYTES
  # A vocabulary within both limits is one block.
  assert output_layer.block_width(4096, 1000) == 1000
  # Otherwise as few blocks as the limits allow, each a multiple of 128 columns.
  for tokens, vocab in ((1024, 8192), (16384, 151936), (2048, 151936), (2**17, 50000)):
    width = output_layer.block_width(tokens, vocab)
    count = -(-vocab // width)
    assert width % 128 == 0 and width <= columns and tokens * width * 4 <= budget
    assert count == -(-vocab // min(columns, budget // (4 * tokens) // 128 * 128))
    assert (count - 1) * width < vocab
  assert output_layer.block_width(1024, 8192) == 1024   # the cpu protocol's: 8 blocks
  assert output_layer.block_width(2**17, 50000) == 512   # 128 Ki rows: 256 MB blocks


def test_rejects_mismatched_shapes():
  hidden, head, labels = problem()
  with pytest.raises(ValueError, match=r"hidden must have shape labels.shape \+ \(d,\)"):
    output_layer.cross_entropy(hidden[:, :5], head, labels)
