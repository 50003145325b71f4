"""scale_by_clipped_curvature: Sophia's clipped ratio with a block-expanded h, and the clip
fraction recomputed from the state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sophia_lambda_jax import transforms


def ratio_reference(m, h_blk, block, scale, eps):
  h = np.repeat(h_blk, block, axis=-1) if block > 1 else h_blk
  return m / (scale * np.maximum(h, 0.0) + eps)


def test_clipped_update_with_blocks_negative_h_and_clip_fraction():
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((4, 24)), "b": jnp.zeros((6,))}
  grads = [{k: rng.normal(size=v.shape) * 1e-2 for k, v in params.items()} for _ in range(3)]
  estimate = {"w": rng.normal(size=(4, 24)) * 1e-3, "b": rng.normal(size=(6,)) * 1e-3}
  b1, b2, rho, eps, batch = 0.8, 0.5, 0.05, 1e-12, 40
  tx = transforms.scale_by_clipped_curvature(
      b1=b1, rho=rho, eps=eps, batch_tokens=batch,
      hessian=transforms.hessian_ema(b2=b2, block_size=8, hessian_interval=100))
  state = tx.init(params)
  est_jax = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), estimate)
  step = jax.jit(lambda g, s: tx.update(g, s, params, hessian_fn=lambda _: est_jax))
  m = {k: np.zeros(v.shape) for k, v in params.items()}
  h = {"w": (1 - b2) * estimate["w"].reshape(4, 3, 8).mean(-1), "b": (1 - b2) * estimate["b"]}
  assert (h["w"] < 0).any() and (h["w"] > 0).any()  # both signs of curvature are exercised
  for g in grads:
    u, state = step(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state)
    hits = total = 0
    for k, block in (("w", 8), ("b", 1)):
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      ratio = ratio_reference(m[k], h[k], block, rho * batch, eps)
      np.testing.assert_allclose(u[k], np.clip(ratio, -1, 1), rtol=1e-5, atol=1e-7)
      hits += int(np.sum(np.abs(ratio) >= 1))
      total += ratio.size
    fraction = float(transforms.clip_fraction(state))
    assert fraction == pytest.approx(hits / total, abs=1.5 / total)
    assert 0 < fraction < 1
  # where h <= 0 the denominator is eps: the update is sign(m)
  negative = np.repeat(h["w"], 8, axis=-1) <= 0
  np.testing.assert_array_equal(np.asarray(u["w"])[negative], np.sign(m["w"])[negative])


def test_clip_fraction_inside_jit_and_absent_state():
  params = {"w": jnp.zeros((2, 8))}
  tx = transforms.scale_by_clipped_curvature(batch_tokens=1)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones((2, 8))}, state, params,
                       hessian_fn=lambda p: {"w": jnp.zeros((2, 8))})
  assert float(jax.jit(transforms.clip_fraction)(state)) == 1.0  # h = 0: all clipped
  assert transforms.clip_fraction((jnp.zeros(3),)) is None
  assert transforms.hessian_interval_and_count({"x": jnp.zeros(3)}) is None


@pytest.mark.parametrize("kwargs,named", [
    ({"rho": 0.0}, "rho"), ({"rho": float("nan")}, "rho"), ({"eps": -1e-15}, "eps"),
    ({"batch_tokens": None}, "batch_tokens"), ({"batch_tokens": 0}, "batch_tokens"),
    ({"b1": -0.5}, "b1"),
])
def test_invalid_arguments(kwargs, named):
  with pytest.raises(ValueError, match=named):
    transforms.scale_by_clipped_curvature(**kwargs)
