"""scale_by_layer_scale and scale_by_role: scales chosen by parameter path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sophia_lambda_jax import transforms

# A scanned (stacked) tree: 3 blocks along axis 0.
STACKED = {
    "embed": {"embedding": jnp.ones((10, 8))},
    "layers": {"attn": {"q_proj": {"kernel": jnp.ones((3, 8, 16))}},
               "mlp": {"up_proj": {"kernel": jnp.ones((3, 8, 4))}},
               "input_norm": {"scale": jnp.ones((3, 8))}},
    "final_norm": {"scale": jnp.ones((8,))},
}


def reference_stacked_scales():
  """lambda = c sqrt(d / n): embedding d = 8, n = 1; block i: n = i + 2, d = fan-in (8);
  final norm n = L + 2 = 5, d = 8; c makes the size-weighted mean 1; clamp [0.1, 10]."""
  depths = np.array([2.0, 3.0, 4.0])
  raw = {"embed": (np.sqrt(8 / 1.0), 80), "q": (np.sqrt(8 / depths), 8 * 16),
         "up": (np.sqrt(8 / depths), 8 * 4), "norm": (np.sqrt(8 / depths), 8),
         "final": (np.sqrt(8 / 5.0), 8)}
  total = 80 + 3 * (128 + 32 + 8) + 8
  weighted = sum(np.sum(r * size) for r, size in raw.values())
  c = total / weighted
  return {k: np.clip(c * r, 0.1, 10.0) for k, (r, _) in raw.items()}


def test_default_layer_scale_on_a_stacked_tree():
  tx = transforms.scale_by_layer_scale(True)
  ones = jax.tree.map(jnp.ones_like, STACKED)
  u, _ = jax.jit(tx.update)(ones, tx.init(STACKED), STACKED)
  want = reference_stacked_scales()
  np.testing.assert_allclose(u["embed"]["embedding"], want["embed"], rtol=1e-6)
  q = np.asarray(u["layers"]["attn"]["q_proj"]["kernel"])
  np.testing.assert_allclose(q, np.broadcast_to(want["q"][:, None, None], q.shape), rtol=1e-6)
  norm = np.asarray(u["layers"]["input_norm"]["scale"])
  np.testing.assert_allclose(norm, np.broadcast_to(want["norm"][:, None], norm.shape), rtol=1e-6)
  np.testing.assert_allclose(u["final_norm"]["scale"], want["final"], rtol=1e-6)
  # deeper blocks get smaller scales
  assert q[0, 0, 0] > q[1, 0, 0] > q[2, 0, 0]


def test_layer_scale_off_callable_and_pytree():
  ones = jax.tree.map(jnp.ones_like, STACKED)
  for off in (None, False):
    u, _ = transforms.scale_by_layer_scale(off).update(ones, None, STACKED)
    assert all(np.all(np.asarray(x) == 1) for x in jax.tree.leaves(u))
  halves = jax.tree.map(lambda _: 0.5, STACKED)
  for spec in (lambda params: halves, halves):
    u, _ = transforms.scale_by_layer_scale(spec).update(ones, None, STACKED)
    assert all(np.all(np.asarray(x) == 0.5) for x in jax.tree.leaves(u))
  with pytest.raises(ValueError, match="layer_scale"):
    transforms.scale_by_layer_scale({"a": -1.0})


def test_role_scales_defaults_override_and_rules():
  params = {"embed": {"embedding": jnp.ones((4, 2))},
            "layers": {0: {"attn": {"o_proj": {"kernel": jnp.ones((2, 2))}},
                           "mlp": {"down_proj": {"kernel": jnp.ones((2, 2))}},
                           "input_norm": {"scale": jnp.ones((2,))},
                           "router": {"w": jnp.ones((2,))}}},
            "lm_head": {"kernel": jnp.ones((2, 4))}}
  ones = jax.tree.map(jnp.ones_like, params)
  u, _ = transforms.scale_by_role(rules=[(r"router", "other")]).update(ones, None)
  got = {k: float(v[(0,) * v.ndim]) for k, v in (
      ("embedding", u["embed"]["embedding"]), ("attention", u["layers"][0]["attn"]["o_proj"]["kernel"]),
      ("mlp", u["layers"][0]["mlp"]["down_proj"]["kernel"]),
      ("norm", u["layers"][0]["input_norm"]["scale"]), ("other", u["layers"][0]["router"]["w"]),
      ("head", u["lm_head"]["kernel"]))}
  assert got == pytest.approx({"embedding": 1.0, "attention": 1.8, "mlp": 1.2, "norm": 0.7,
                               "other": 1.0, "head": 1.0})
  u, _ = transforms.scale_by_role({"other": 2.5}, rules=[(r"router", "mlp")]).update(ones, None)
  assert float(u["layers"][0]["router"]["w"][0]) == pytest.approx(1.2)  # now an mlp leaf
  u, _ = transforms.scale_by_role({"other": 2.5}, rules=[(r"router", "other")]).update(ones, None)
  assert float(u["layers"][0]["router"]["w"][0]) == pytest.approx(2.5)
  # A path no rule names raises at init (and update), listing it: it is not silently "other".
  with pytest.raises(ValueError, match="layers/0/router/w"):
    transforms.scale_by_role().init(params)
  with pytest.raises(ValueError, match="layers/0/router/w"):
    transforms.scale_by_role().update(ones, None)


@pytest.mark.parametrize("role_scales", [{"attn": 1.0}, {"mlp": 0.0}, {"norm": math.inf},
                                         [("mlp", 1.0)]])
def test_invalid_role_scales(role_scales):
  with pytest.raises(ValueError, match="role_scales"):
    transforms.scale_by_role(role_scales)
