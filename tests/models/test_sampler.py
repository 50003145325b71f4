"""Generation with the KV cache equals recomputing the whole sequence every step; the top-p
nucleus."""

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
  _check_sampling_against_recompute(*model, top_p=1.0)


def test_top_p_sampling_equals_recompute_with_the_same_keys():
  _check_sampling_against_recompute(*_model(scan=False), top_p=0.6)


def _check_sampling_against_recompute(module, graphdef, params, top_p):
  key, temperature, new = jax.random.key(11), 1.5, 8
  out = np.asarray(sampler.generate(module, PROMPT, new, temperature=temperature, key=key,
                                    top_p=top_p))
  # Step i draws from softmax(logits / T) over the nucleus with key fold_in(key, i).
  ids = np.zeros_like(out)
  ids[:, :PROMPT.shape[1]] = PROMPT
  for i, t in enumerate(range(PROMPT.shape[1], out.shape[1])):
    logits = _last_logits(graphdef, params, ids, t) / temperature
    if top_p < 1:
      logits = np.stack([_nucleus_by_hand(row, top_p) for row in logits])
    ids[:, t] = jax.random.categorical(jax.random.fold_in(key, i), logits, axis=-1)
  np.testing.assert_array_equal(out, ids)


def _nucleus_by_hand(logits, top_p):
  """Keep the most probable tokens, one at a time, until their mass reaches top_p."""
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  kept, mass = [], 0.0
  for token in np.argsort(-logits, kind="stable"):
    if mass >= top_p:
      break
    kept.append(token)
    mass += probs[token]
  out = np.full_like(logits, -np.inf)
  out[kept] = logits[kept]
  return out


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.51, 2), (0.7, 2), (0.81, 3),
                                          (0.96, 4), (1.0, 4)])
def test_nucleus_is_the_smallest_prefix_reaching_top_p(top_p, kept):
  logits = np.log(np.array([[0.15, 0.5, 0.05, 0.3]], np.float32))
  out = np.asarray(sampler.nucleus_logits(logits, top_p))[0]
  order = [1, 3, 0, 2]  # most probable first
  assert np.isfinite(out[order[:kept]]).all() and np.isneginf(out[order[kept:]]).all()
  np.testing.assert_array_equal(out[order[:kept]], logits[0, order[:kept]])


def test_tiny_top_p_samples_the_argmax():
  module, _, _ = _model(scan=False)
  greedy = sampler.generate(module, PROMPT, 6)
  sampled = sampler.generate(module, PROMPT, 6, temperature=3.0, top_p=1e-6, key=5)
  np.testing.assert_array_equal(sampled, greedy)


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
    ({"max_new_tokens": 4, "temperature": 1.0, "key": 0, "top_p": 0.0}, "top_p"),
    ({"max_new_tokens": 4, "temperature": 1.0, "key": 0, "top_p": 1.5}, "top_p"),
])
def test_generate_errors(kwargs, match):
  module = qwen.Qwen(TINY)
  with pytest.raises(ValueError, match=match):
    sampler.generate(module, PROMPT, **kwargs)
  with pytest.raises(ValueError, match="prompt_ids"):
    sampler.generate(module, np.zeros((1, 1, 3), np.int32), 2)
