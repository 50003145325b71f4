"""Optimizer-state bytes of every optimizer on the 134M Qwen parameter tree (no allocation).

    python -m experiments.benchmarks.bench_optimizer_state [--block-sizes 1,8,64,256] [--scanned]

The tree is the pure-dict parameter tree of the ``qwen-134m`` preset built from shapes alone
(vocab 151936, hidden 512, 18 blocks, 8 query / 4 KV heads of 64 with q/k/v biases, SwiGLU
1536, tied embedding: 134,451,712 parameters) so this benchmark needs no model code. State
sizes come from ``jax.eval_shape(tx.init, params)``. Goal: ``sophia_lambda`` <= 0.55 x
``sophia`` at the default block size (it keeps m and a block-reduced h, Sophia m and a full h).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import sophia_lambda_jax as slj
from sophia_lambda_jax import optimizers

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP = 151936, 512, 18, 8, 4, 64, 1536
EXPECTED_PARAMS = 134_451_712


def qwen_134m_shapes(scanned: bool = False) -> dict:
  """Pure-dict parameter tree of ShapeDtypeStructs with the model's path names."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM

  def block(*lead):
    return {
        "attn": {"q_proj": {"kernel": f32(*lead, HIDDEN, q), "bias": f32(*lead, q)},
                 "k_proj": {"kernel": f32(*lead, HIDDEN, kv), "bias": f32(*lead, kv)},
                 "v_proj": {"kernel": f32(*lead, HIDDEN, kv), "bias": f32(*lead, kv)},
                 "o_proj": {"kernel": f32(*lead, q, HIDDEN)}},
        "mlp": {"gate_proj": {"kernel": f32(*lead, HIDDEN, MLP)},
                "up_proj": {"kernel": f32(*lead, HIDDEN, MLP)},
                "down_proj": {"kernel": f32(*lead, MLP, HIDDEN)}},
        "input_norm": {"scale": f32(*lead, HIDDEN)},
        "post_attn_norm": {"scale": f32(*lead, HIDDEN)},
    }

  layers = block(LAYERS) if scanned else {i: block() for i in range(LAYERS)}
  return {"embed": {"embedding": f32(VOCAB, HIDDEN)}, "layers": layers,
          "final_norm": {"scale": f32(HIDDEN)}}


def tree_bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(name: str, params, **hyperparams) -> int:
  if name in ("sophia", "sophia_lambda"):
    hyperparams.setdefault("batch_tokens", 1)
  tx = slj.get_optimizer(name, **hyperparams)
  return tree_bytes(jax.eval_shape(tx.init, params))


def measure(scanned: bool = False, block_sizes=(1, 8, 64, 256)) -> dict:
  params = qwen_134m_shapes(scanned)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  if num_params != EXPECTED_PARAMS:
    raise RuntimeError(f"qwen-134m tree has {num_params} parameters, expected {EXPECTED_PARAMS}")
  rows = {name: state_bytes(name, params) for name in optimizers.OPTIMIZERS}
  by_block = {b: state_bytes("sophia_lambda", params, block_size=b) for b in block_sizes}
  return {"num_params": num_params, "param_bytes": tree_bytes(params), "state": rows,
          "sophia_lambda_by_block": by_block,
          "ratio": rows["sophia_lambda"] / rows["sophia"]}


def ratios():
  """For experiments/benchmarks/run_all.py."""
  m = measure()
  return {"sophia_lambda state bytes / sophia": {"value": m["ratio"], "goal": "<= 0.55"},
          "sophia_lambda state bytes / optax-style adamw": {
              "value": m["state"]["sophia_lambda"] / m["state"]["adamw"]}}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scanned", action="store_true", help="stacked (scanned) layer tree")
  parser.add_argument("--block-sizes", default="1,8,64,256")
  args = parser.parse_args(argv)
  block_sizes = tuple(int(b) for b in args.block_sizes.split(","))
  m = measure(args.scanned, block_sizes)
  gb = lambda b: b / 2**30
  print(f"qwen-134m ({'scanned' if args.scanned else 'unrolled'}): {m['num_params']:,} "
        f"parameters, {gb(m['param_bytes']):.3f} GiB float32")
  print(f"{'optimizer':<16}{'state GiB':>10}{'bytes/param':>12}{'x sophia':>10}")
  sophia = m["state"]["sophia"]
  for name, b in m["state"].items():
    print(f"{name:<16}{gb(b):>10.3f}{b / m['num_params']:>12.3f}{b / sophia:>10.3f}")
  print("sophia_lambda by block_size:")
  for block, b in m["sophia_lambda_by_block"].items():
    print(f"  block_size={block:<5}{gb(b):>10.3f}{b / m['num_params']:>12.3f}{b / sophia:>10.3f}")
  print(f"sophia_lambda / sophia state bytes: {m['ratio']:.3f}x (goal <= 0.55)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
