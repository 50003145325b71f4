"""Generation with the KV cache equals recomputing the whole sequence every step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sophia_lambda_jax.models import qwen, sampler

TINY = qwen.get_config("qwen-tiny", vocab_size=128, max_seq_len=32)
_apply = jax.jit(qwen.apply, static_argnums=0)


@jax.jit
def _perturb(params, key):
  # Larger weights than the 0.02 init give peaked, varied next-token distributions; biases
  # and norm scales move away from 0 and 1.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape)
                            for x, k in zip(leaves, keys)])


@jax.jit
def _decode(state, ids, cache):
  graphdef, params = state
  return nnx.merge(graphdef, params).decode(ids, cache)


def _last_logits(graphdef, params, ids, length):
  """Logits after the first `length` tokens of `ids`, computed over the whole buffer.

  The buffer has a fixed width (one compile); by causality, the tokens after `length` do
  not change the logits at position length - 1.
  """
  return np.asarray(_apply(graphdef, params, ids))[:, length - 1]


def _model(scan: bool):
  """A tiny model with random (non-zero) biases and norm scales."""
  config = dataclasses.replace(TINY, scan_layers=scan)
  graphdef, params = qwen.split_params(qwen.Qwen(config, rngs=nnx.Rngs(1)))
  params = _perturb(params, jax.random.key(2))
  return nnx.merge(graphdef[0], params), graphdef, params


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def model(request):
  return _model(request.param)


PROMPT = np.array([[5, 17, 99, 3, 42], [7, 7, 64, 120, 1]], np.int32)


def test_decode_logits_equal_full_forward(model):
  module, graphdef, params = model
  total = PROMPT.shape[1] + 4
  ids = np.concatenate([PROMPT, np.array([[9, 8, 7, 6], [1, 2, 3, 4]], np.int32)], axis=1)
  full = np.asarray(_apply(graphdef, params, ids))
  cache = qwen.init_cache(module.config, batch_size=2, max_len=total + 3)
  state = (graphdef[0], params)
  logits, cache = _decode(state, ids[:, :5], cache)  # prefill
  np.testing.assert_allclose(logits, full[:, :5], atol=1e-5)
  for t in range(5, total):  # one token at a time
    logits, cache = _decode(state, ids[:, t:t + 1], cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
  assert int(cache.index) == total


def test_greedy_generation_equals_recompute(model):
  module, graphdef, params = model
  new = 8
  out = np.asarray(sampler.generate(module, PROMPT, new))
  assert out.shape == (2, PROMPT.shape[1] + new)
  np.testing.assert_array_equal(out[:, :PROMPT.shape[1]], PROMPT)
  ids = np.zeros_like(out)
  ids[:, :PROMPT.shape[1]] = PROMPT
  for t in range(PROMPT.shape[1], out.shape[1]):
    ids[:, t] = np.argmax(_last_logits(graphdef, params, ids, t), axis=-1)
  np.testing.assert_array_equal(out, ids)
  assert len(set(out[0, PROMPT.shape[1]:].tolist())) > 1  # not a degenerate repeat


def test_sampling_equals_recompute_with_the_same_keys(model):
  module, graphdef, params = model
  key, temperature, new = jax.random.key(11), 1.5, 8
  out = np.asarray(sampler.generate(module, PROMPT, new, temperature=temperature, key=key))
  # Step i draws from softmax(logits / T) with key fold_in(key, i).
  ids = np.zeros_like(out)
  ids[:, :PROMPT.shape[1]] = PROMPT
  for i, t in enumerate(range(PROMPT.shape[1], out.shape[1])):
    logits = _last_logits(graphdef, params, ids, t) / temperature
    ids[:, t] = jax.random.categorical(jax.random.fold_in(key, i), logits, axis=-1)
  np.testing.assert_array_equal(out, ids)


def test_sampling_is_seeded_and_one_dimensional_prompt_works():
  module, _, _ = _model(scan=False)
  prompt = PROMPT[0]
  a = sampler.generate(module, prompt, 10, temperature=2.0, key=0)
  b = sampler.generate(module, prompt, 10, temperature=2.0, key=0)
  c = sampler.generate(module, prompt, 10, temperature=2.0, key=1)
  assert a.shape == (15,)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert int(jnp.max(a)) < TINY.vocab_size and int(jnp.min(a)) >= 0


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 4, "temperature": 1.0}, "key is required"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 4, "temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 30}, "max_seq_len"),
])
def test_generate_errors(kwargs, match):
  module = qwen.Qwen(TINY)
  with pytest.raises(ValueError, match=match):
    sampler.generate(module, PROMPT, **kwargs)
  with pytest.raises(ValueError, match="prompt_ids"):
    sampler.generate(module, np.zeros((1, 1, 3), np.int32), 2)
