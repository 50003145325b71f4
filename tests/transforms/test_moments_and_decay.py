"""Variance-clipped moments (LAVSM), StableAdamW clipping, decoupled weight decay with its
default mask, float32 state, and the hyperparameter validation helpers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sophia_lambda_jax import transforms


def test_variance_clipped_moments_equation():
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=(3, 5)) * 2.0 for _ in range(4)]
  tx = transforms.scale_by_variance_clipped_moments(b1=0.8, b2=0.9, variance_clip=0.5,
                                                     eps=1e-6)
  state = tx.init(jnp.zeros((3, 5)))
  m = v = np.zeros((3, 5))
  clipped = False
  for g in grads:
    u, state = tx.update(jnp.asarray(g, jnp.float32), state)
    m, v = 0.8 * m + 0.2 * g, 0.9 * v + 0.1 * g * g   # no bias correction
    np.testing.assert_allclose(u, m / (np.minimum(np.sqrt(v), 0.5) + 1e-6), rtol=1e-5,
                               atol=1e-6)
    clipped |= bool((np.sqrt(v) > 0.5).any() and (np.sqrt(v) < 0.5).any())
  assert clipped and int(state.count) == 4


def test_stable_adam_clips_per_tensor():
  rng = np.random.default_rng(1)
  grads = [rng.normal(size=(4, 4)) for _ in range(3)] + [50 * rng.normal(size=(4, 4))]
  tx = transforms.scale_by_stable_adam(b1=0.9, b2=0.95, eps=1e-8)
  state = tx.init(jnp.zeros((4, 4)))
  m = v = np.zeros((4, 4))
  for t, g in enumerate(grads, start=1):
    u, state = tx.update(jnp.asarray(g, jnp.float32), state)
    m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g
    m_hat, v_hat = m / (1 - 0.9 ** t), v / (1 - 0.95 ** t)
    rms = math.sqrt(np.mean(g * g / np.maximum(v_hat, 1e-16)))
    np.testing.assert_allclose(u, m_hat / (np.sqrt(v_hat) + 1e-8) / max(1.0, rms), rtol=1e-5)
  assert rms > 1  # the spike at the last step was clipped


def test_default_weight_decay_mask_unrolled_stacked_and_linen():
  unrolled = {"embed": {"embedding": jnp.ones((4, 2))},
              "layers": {0: {"attn": {"q_proj": {"kernel": jnp.ones((2, 2)),
                                                 "bias": jnp.ones((2,))}},
                             "input_norm": {"scale": jnp.ones((2,))}}},
              "final_norm": {"scale": jnp.ones((2,))}}
  assert transforms.default_weight_decay_mask(unrolled) == {
      "embed": {"embedding": True},
      "layers": {0: {"attn": {"q_proj": {"kernel": True, "bias": False}},
                     "input_norm": {"scale": False}}},
      "final_norm": {"scale": False}}
  stacked = {"layers": {"mlp": {"up_proj": {"kernel": jnp.ones((3, 2, 2))}},
                        "attn": {"q_proj": {"bias": jnp.ones((3, 2))}},  # per-layer vector
                        "post_attn_norm": {"scale": jnp.ones((3, 2))}}}  # 2-D norm: no decay
  assert transforms.default_weight_decay_mask(stacked) == {
      "layers": {"mlp": {"up_proj": {"kernel": True}}, "attn": {"q_proj": {"bias": False}},
                 "post_attn_norm": {"scale": False}}}
  linen = {"params": {"layers_0": {"ln_1": {"scale": jnp.ones((3, 2))},
                                   "mlp": {"fc": {"kernel": jnp.ones((2, 2))}}}}}
  mask = transforms.default_weight_decay_mask(linen)["params"]["layers_0"]
  assert mask == {"ln_1": {"scale": False}, "mlp": {"fc": {"kernel": True}}}


def test_decoupled_weight_decay_and_custom_mask():
  params = {"w": jnp.full((2, 2), 2.0), "norm": {"scale": jnp.full((2, 2), 3.0)},
            "b": jnp.full((2,), 4.0)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = transforms.add_decoupled_weight_decay(0.1)
  u, _ = tx.update(zeros, tx.init(params), params)
  assert float(u["w"][0, 0]) == pytest.approx(0.2)
  assert float(u["norm"]["scale"][0, 0]) == 0.0 and float(u["b"][0]) == 0.0
  custom = {"w": False, "norm": {"scale": True}, "b": True}
  tx = transforms.add_decoupled_weight_decay(0.1, mask=custom)
  u, _ = tx.update(zeros, tx.init(params), params)
  assert float(u["w"][0, 0]) == 0.0
  assert float(u["norm"]["scale"][0, 0]) == pytest.approx(0.3)
  assert float(u["b"][0]) == pytest.approx(0.4)


def test_float32_state_wrapper():
  params = {"w": jnp.ones((2, 3), jnp.bfloat16)}
  tx = transforms.with_float32_state(optax.scale_by_adam())
  state = tx.init(params)
  assert state.mu["w"].dtype == jnp.float32 and state.nu["w"].dtype == jnp.float32
  u, state = tx.update({"w": jnp.full((2, 3), 0.5, jnp.bfloat16)}, state, params)
  assert u["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.float32
  plain = optax.scale_by_adam().init(params)
  assert plain.nu["w"].dtype == jnp.bfloat16  # what the wrapper prevents


@pytest.mark.parametrize("value,kwargs,ok", [
    (0.5, {"low": 0.0, "high": 1.0, "high_open": True}, True),
    (1.0, {"low": 0.0, "high": 1.0, "high_open": True}, False),
    (0.0, {"low": 0.0, "low_open": True}, False),
    (math.nan, {"low": 0.0}, False),
    (math.inf, {}, False),
    (3, {"low": 1, "integer": True}, True),
    (2.5, {"low": 1, "integer": True}, False),
    (np.float32(-1.0), {"low": 0.0}, False),
    (jnp.asarray(-1.0), {"low": 0.0}, True),      # traced/array values are not checked
])
def test_check_number(value, kwargs, ok):
  if ok:
    transforms.check_number("x", value, **kwargs)
  else:
    with pytest.raises(ValueError, match=r"x must be"):
      transforms.check_number("x", value, **kwargs)
