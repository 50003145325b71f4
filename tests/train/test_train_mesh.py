"""Mesh construction and the sharding rules for params and optimizer state."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from sophia_lambda_jax import get_optimizer
from sophia_lambda_jax.models import qwen
from sophia_lambda_jax.train import mesh as mesh_lib


def test_mesh_shapes_and_errors():
  mesh = mesh_lib.make_mesh("data=2,fsdp=4")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert mesh_lib.make_mesh("data=1,fsdp=1").size == 1  # a subset of the 8 devices
  assert dict(mesh_lib.make_mesh("auto").shape) == {"data": 1, "fsdp": jax.device_count()}
  with pytest.raises(ValueError, match="needs 16 devices"):
    mesh_lib.make_mesh("data=4,fsdp=4")


def test_params_shard_along_embed_and_state_follows():
  config = qwen.get_config("qwen-tiny")
  params = qwen.abstract_params(config)
  mesh = mesh_lib.make_mesh("data=2,fsdp=4")
  specs = mesh_lib.param_specs(params, qwen.logical_axes(config), mesh)
  assert specs["embed"]["embedding"] == P(None, "fsdp")      # (vocab, embed)
  assert specs["layers"][0]["attn"]["q_proj"]["kernel"] == P("fsdp", None)  # (embed, heads)
  assert specs["layers"][1]["mlp"]["down_proj"]["kernel"] == P(None, "fsdp")  # (mlp, embed)
  assert specs["final_norm"]["scale"] == P("fsdp")
  # Every leaf is split along exactly one dimension (64 / 4 divides).
  for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)):
    assert list(spec).count("fsdp") == 1

  tx = get_optimizer("sophia_lambda", batch_tokens=1024)
  state = jax.eval_shape(tx.init, params)
  state_specs = mesh_lib.state_specs(state, params, specs, mesh)
  param_shapes = {tuple(p.shape) for p in jax.tree.leaves(params)}
  sharded = replicated_big = 0
  for leaf, spec in zip(jax.tree.leaves(state),
                        jax.tree.leaves(state_specs, is_leaf=lambda s: isinstance(s, P))):
    if "fsdp" in tuple(spec):
      sharded += 1
      dim = tuple(spec).index("fsdp")
      assert leaf.shape[dim] % 4 == 0
    elif tuple(leaf.shape) in param_shapes and leaf.ndim >= 1:
      replicated_big += 1
  # Momentum of every parameter, and the Hessian EMA wherever its block-reduced shape keeps
  # the split dimension, is sharded; no parameter-shaped state leaf is left replicated.
  # (Block-reduced EMAs of leaves split along their last dimension, e.g. o_proj's
  # (64, 64 / 64), are replicated: they are 1/block of the parameter.)
  assert sharded >= len(jax.tree.leaves(params)) + 10 and replicated_big == 0
  reduced = [spec for leaf, spec in zip(
      jax.tree.leaves(state), jax.tree.leaves(state_specs, is_leaf=lambda s: isinstance(s, P)))
      if leaf.shape == (64, 3)]  # gate/up_proj's (64, 192) EMA in blocks of 64
  assert reduced and all(spec == P("fsdp", None) for spec in reduced)
