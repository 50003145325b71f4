"""Sampling from a `Qwen` model with its KV cache: greedy, temperature and top-p (nucleus).

    out = sampler.generate(model, prompt_ids, max_new_tokens=32, temperature=0.8,
                           top_p=0.95, key=0)

The prompt is run through `Qwen.decode` once (prefill), then one token at a time; step i
(i = 0 for the first new token) draws with key `fold_in(key, i)` from

    temperature 0:  argmax(z)
    otherwise:      softmax(z' / T) over the nucleus, z' = z on the nucleus, -inf off it

where the nucleus (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration",
arXiv:1904.09751) is the smallest set of most probable tokens of softmax(z / T) whose mass
reaches top_p (every token tied with its least probable member is kept too); top_p = 1
samples from the whole softmax. Temperature is applied before the nucleus is cut, as in
transformers' warpers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sophia_lambda_jax.models.qwen import Qwen, init_cache


def nucleus_logits(logits, top_p):
  """`logits` with every token outside the top-p nucleus of softmax(logits) set to -inf."""
  ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  probs = jax.nn.softmax(ordered, axis=-1)
  # Token k of the descending order is in the nucleus when the mass before it is < top_p.
  inside = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  threshold = jnp.min(jnp.where(inside, ordered, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _sample(logits, temperature, top_p, key, greedy: bool, nucleus: bool):
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if nucleus:
    logits = nucleus_logits(logits, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit,
                   static_argnames=("graphdef", "max_new_tokens", "greedy", "nucleus"))
def _generate(graphdef, state, prompt, key, temperature, top_p, max_new_tokens: int,
              greedy: bool, nucleus: bool):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt.shape
  cache = init_cache(model.config, batch, prompt_len + max_new_tokens)
  logits, cache = model.decode(prompt, cache)
  sample = functools.partial(_sample, temperature=temperature, top_p=top_p, greedy=greedy,
                             nucleus=nucleus)
  first = sample(logits[:, -1], key=jax.random.fold_in(key, 0))

  def step(carry, i):
    token, cache = carry
    logits, cache = model.decode(token[:, None], cache)
    token = sample(logits[:, -1], key=jax.random.fold_in(key, i))
    return (token, cache), token

  _, rest = jax.lax.scan(step, (first, cache), jnp.arange(1, max_new_tokens))
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def generate(model: Qwen, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             key=None, top_p: float = 1.0):
  """Prompt followed by `max_new_tokens` sampled tokens, using a KV cache.

  temperature 0 picks the argmax (greedy; top_p is then irrelevant); temperature > 0
  samples from softmax(logits / temperature) restricted to the top-p nucleus and needs
  `key` (a jax PRNG key or an int seed). prompt_ids: int (seq,) or (batch, seq); the result
  has the same rank.
  """
  if not isinstance(model, Qwen):
    raise ValueError(f"model must be a Qwen module, got {type(model).__name__}")
  prompt = jnp.asarray(prompt_ids, jnp.int32)
  if prompt.ndim not in (1, 2) or prompt.shape[-1] < 1:
    raise ValueError(f"prompt_ids must be a non-empty (seq,) or (batch, seq) array of token "
                     f"ids, got shape {prompt.shape}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if not (np.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be >= 0, got {temperature!r}")
  if not (np.isfinite(top_p) and 0 < top_p <= 1):
    raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
  greedy = temperature == 0
  if key is None:
    if not greedy:
      raise ValueError("key is required when temperature > 0 (sampling)")
    key = jax.random.key(0)
  elif isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  squeeze = prompt.ndim == 1
  prompt = prompt[None] if squeeze else prompt
  if prompt.shape[1] + int(max_new_tokens) > model.config.max_seq_len:
    raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} "
                     f"exceeds the model's max_seq_len {model.config.max_seq_len}")
  graphdef, state = nnx.split(model)
  out = _generate(graphdef, state, prompt, key, jnp.float32(temperature if not greedy else 1),
                  jnp.float32(top_p), max_new_tokens=int(max_new_tokens), greedy=greedy,
                  nucleus=not greedy and top_p < 1)
  return out[0] if squeeze else out


def continuation(model: Qwen, tokenizer, prompt: str, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
  """(prompt ids, new ids up to and excluding the first EOS, their text) of `prompt`.

  `tokenizer` maps text to the model's ids and back (`models.loading.VocabTokenizer`); an
  empty prompt starts a document, i.e. is the EOS token alone (as after a document
  boundary in training).
  """
  ids = tokenizer.encode(prompt) if prompt else np.asarray([tokenizer.eos_id], np.int32)
  context = model.config.max_seq_len
  if len(ids) + max_new_tokens > context:
    raise ValueError(f"--prompt is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} "
                     f"that exceeds the model's context of {context} tokens")
  out = np.asarray(generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                            key=seed))
  new = out[len(ids):]
  stops = np.flatnonzero(new == tokenizer.eos_id)
  new = new[:stops[0]] if stops.size else new
  return ids, new, tokenizer.decode(new)
