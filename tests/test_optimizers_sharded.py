"""Optimizers on parameters sharded over 8 simulated CPU devices (tests/conftest.py sets
``--xla_force_host_platform_device_count=8``).

Checks: every state leaf that mirrors a parameter (moments, the block-reduced Hessian EMA)
is sharded like that parameter on each dimension the mesh still divides, both after ``init``
and after jitted updates; and the sharded result equals the single-device one to 1e-6.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sophia_lambda_jax as slj
from sophia_lambda_jax import optimizers

# path -> (shape, partition spec over the "fsdp" axis of 8 devices)
LAYOUT = {
    "embed/embedding": ((64, 32), P("fsdp", None)),
    "layers/0/attn/q_proj/kernel": ((32, 512), P(None, "fsdp")),   # h (32, 8): still split
    "layers/0/attn/q_proj/bias": ((512,), P("fsdp")),
    "layers/0/mlp/up_proj/kernel": ((32, 96), P("fsdp", None)),     # h (32, 2)
    "layers/0/attn/o_proj/kernel": ((16, 96), P(None, "fsdp")),     # h (16, 2): gathered
    "layers/0/mlp/down_proj/kernel": ((96, 40), P(None, "fsdp")),   # h (96, 1): cannot split
    "layers/0/input_norm/scale": ((32,), P()),
    "final_norm/scale": ((32,), P("fsdp")),
}


def nest(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    keys = [int(k) if k.isdigit() else k for k in path.split("/")]
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree


@pytest.fixture(scope="module")
def mesh():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.fail(f"expected 8 simulated CPU devices (tests/conftest.py), found {len(devices)}")
  return Mesh(np.array(devices[:8]), ("fsdp",))


def arrays(seed, scale):
  rng = np.random.default_rng(seed)
  return {path: (scale * rng.normal(size=shape)).astype(np.float32)
          for path, (shape, _) in LAYOUT.items()}


def expected_spec(param_path, leaf_shape, mesh):
  """The parameter's spec, dropping axes the mesh no longer divides (block-reduced h)."""
  shape, spec = LAYOUT[param_path]
  out = []
  for dim, axis in enumerate(tuple(spec) + (None,) * (len(leaf_shape) - len(spec))):
    out.append(axis if axis is not None and leaf_shape[dim] % mesh.shape[axis] == 0 else None)
  return P(*out)


def check_state_sharding(state, mesh):
  """Every non-scalar state leaf whose path ends with a parameter path is laid out like it."""
  checked = 0
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not hasattr(leaf, "sharding") or leaf.ndim == 0:
      continue
    path = slj.labels.path_to_str(keypath)
    owner = next((p for p in LAYOUT if path.endswith(p)), None)
    assert owner is not None, f"state leaf {path} mirrors no parameter"
    want = NamedSharding(mesh, expected_spec(owner, leaf.shape, mesh))
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
        f"{path}: {leaf.sharding} instead of {want.spec}")
    checked += 1
  return checked


@pytest.mark.parametrize("name", list(optimizers.OPTIMIZERS) + [
    "sophia_lambda+bias_correction=false", "sophia_lambda+rho=0.04", "sophia+rho=\"auto\"",
    "sophia_h+rho=\"auto\""])
def test_sharded_matches_single_device_and_state_follows_params(name, mesh):
  """Also with the rho controller (sophia_lambda's default, and rho="auto" for the others):
  its fractions are exact integer counts, so rho follows the single-device trajectory."""
  name, _, option = name.partition("+")
  kwargs = {"batch_tokens": 256} if name in ("sophia", "sophia_lambda") else {}
  if optimizers.OPTIMIZERS[name].second_order:
    kwargs["hessian_interval"] = 2
  if option:
    key, _, value = option.partition("=")
    kwargs[key] = json.loads(value)
  tx = slj.get_optimizer(name, learning_rate=1e-2, **kwargs)
  params_np = arrays(0, 1.0)
  grads_np = [arrays(10 + t, 1e-2) for t in range(3)]
  estimate_np = {k: np.abs(v) for k, v in arrays(20, 1e-4).items()}

  def run(place):
    params = nest({k: place(k, v) for k, v in params_np.items()})
    estimate = nest({k: place(k, v) for k, v in estimate_np.items()})
    state = tx.init(params)
    initial_state = state

    @jax.jit
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params, hessian_fn=lambda _: estimate)
      return optax.apply_updates(params, updates), state

    for grads in grads_np:  # steps 0 and 2 refresh the Hessian EMA
      params, state = step(params, state, nest({k: place(k, v) for k, v in grads.items()}))
    return params, initial_state, state

  device = jax.devices()[0]
  single, _, single_state = run(lambda k, v: jax.device_put(v, device))
  sharded, initial_state, final_state = run(
      lambda k, v: jax.device_put(v, NamedSharding(mesh, LAYOUT[k][1])))

  for keypath, leaf in jax.tree_util.tree_flatten_with_path(sharded)[0]:
    path = slj.labels.path_to_str(keypath)
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, LAYOUT[path][1]), leaf.ndim)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert check_state_sharding(initial_state, mesh) >= len(LAYOUT)
  assert check_state_sharding(final_state, mesh) >= len(LAYOUT)
  if optimizers.OPTIMIZERS[name].second_order:
    assert float(optimizers.current_rho(final_state)) == pytest.approx(
        float(optimizers.current_rho(single_state)), rel=1e-6)


def test_explicit_sharding_mode(mesh):
  """jax.set_mesh with AxisType.Explicit: the block reshapes carry their out_sharding."""
  explicit = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,),
                           devices=mesh.devices.flatten().tolist())
  tx = slj.sophia_lambda(learning_rate=1e-2, batch_tokens=256, hessian_interval=2)
  params_np, grads_np = arrays(0, 1.0), arrays(10, 1e-2)
  estimate_np = {k: np.abs(v) for k, v in arrays(20, 1e-4).items()}

  def run(place):
    params = nest({k: place(k, v) for k, v in params_np.items()})
    estimate = nest({k: place(k, v) for k, v in estimate_np.items()})
    grads = nest({k: place(k, v) for k, v in grads_np.items()})
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(grads, s, p, hessian_fn=lambda _: estimate))
    for _ in range(2):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
    return params, state

  single, _ = run(lambda k, v: jax.device_put(v, jax.devices()[0]))
  with jax.set_mesh(explicit):
    sharded, state = run(lambda k, v: jax.device_put(v, NamedSharding(explicit, LAYOUT[k][1])))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert check_state_sharding(state, explicit) >= len(LAYOUT)


def test_block_reduced_hessian_state_is_split_where_it_divides(mesh):
  tx = slj.sophia_lambda(batch_tokens=8)
  params = nest({k: jax.device_put(v, NamedSharding(mesh, LAYOUT[k][1]))
                 for k, v in arrays(0, 1.0).items()})
  state = tx.init(params)
  ema = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, slj.transforms.HessianEMAState)) if isinstance(x, slj.transforms.HessianEMAState)][0]
  h = ema.h
  assert h["layers"][0]["attn"]["q_proj"]["kernel"].shape == (32, 8)
  assert h["layers"][0]["attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp")
  assert h["layers"][0]["mlp"]["up_proj"]["kernel"].shape == (32, 2)
  assert h["layers"][0]["mlp"]["up_proj"]["kernel"].sharding.spec == P("fsdp", None)
  down = h["layers"][0]["mlp"]["down_proj"]["kernel"]
  assert down.shape == (96, 1) and down.sharding.is_equivalent_to(
      NamedSharding(mesh, P()), 2)
