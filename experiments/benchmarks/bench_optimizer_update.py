"""Time of one jitted Sophia-Lambda update (non-refresh step, state donated) vs optax.adamw.

    python -m experiments.benchmarks.bench_optimizer_update [--params 25e6] [--rounds 8]

Both run in the same process on the same ~25M-parameter Qwen-shaped tree (vocab 8192,
hidden 512, MLP 1536, GQA 8/4 heads of 64, as many blocks as fit the size). The timed step
is ``params, state = step(params, state, grads)`` = ``tx.update`` + ``optax.apply_updates``,
jitted with params and state donated. Sophia-Lambda moves fewer bytes than AdamW (it reads
and writes m only, and reads h at 1/64 size, where AdamW has m and v), so on a memory-bound
CPU it should take at most 0.9x AdamW's time. The achieved bandwidth of each step (the
bytes it must read and write / time) is compared with a plain jitted array copy of the same
number of bytes; Sophia-Lambda at a fixed rho is timed beside its default (rho "auto"),
whose controller counts three fractions of the ratio in the same update. Refreshes are
pushed out of the timed window with a large
``hessian_interval``: the compiled step is the same one, ``hessian_fn`` sits in the
untaken branch of a ``lax.cond``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sophia_lambda_jax as slj

VOCAB, HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM = 8192, 512, 1536, 8, 4, 64


def block_shapes() -> dict:
  q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
  return {
      "attn": {"q_proj": {"kernel": (HIDDEN, q), "bias": (q,)},
               "k_proj": {"kernel": (HIDDEN, kv), "bias": (kv,)},
               "v_proj": {"kernel": (HIDDEN, kv), "bias": (kv,)},
               "o_proj": {"kernel": (q, HIDDEN)}},
      "mlp": {"gate_proj": {"kernel": (HIDDEN, MLP)}, "up_proj": {"kernel": (HIDDEN, MLP)},
              "down_proj": {"kernel": (MLP, HIDDEN)}},
      "input_norm": {"scale": (HIDDEN,)},
      "post_attn_norm": {"scale": (HIDDEN,)},
  }


def count(shapes) -> int:
  leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
  return sum(int(np.prod(s)) for s in leaves)


def tree_shapes(target_params: float) -> dict:
  per_block = count(block_shapes())
  outside = VOCAB * HIDDEN + HIDDEN
  layers = max(1, round((target_params - outside) / per_block))
  return {"embed": {"embedding": (VOCAB, HIDDEN)},
          "layers": {i: block_shapes() for i in range(layers)},
          "final_norm": {"scale": (HIDDEN,)}}


def make_tree(shapes, key, scale):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)])


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(target_params: float = 25e6, rounds: int = 8, steps_per_round: int = 4) -> dict:
  """Compiles all steps, then alternates rounds of each so they share the machine's load.

  Returns per-step medians (over all timed steps) and minima, bytes moved and GB/s.
  """
  shapes = tree_shapes(target_params)
  params = make_tree(shapes, jax.random.PRNGKey(0), 0.02)
  grads = make_tree(shapes, jax.random.PRNGKey(1), 1e-3)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  tokens = 64 * 512

  def make_step(tx, **extra):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params, **extra)
      return optax.apply_updates(params, updates), state
    return jax.jit(step, donate_argnums=(0, 1))

  hessian_fn = lambda p: jax.tree.map(jnp.square, grads)
  candidates = {
      "optax.adamw": (optax.adamw(learning_rate=3e-4, b1=0.9, b2=0.95, weight_decay=0.1), {}),
      "sophia_lambda": (slj.sophia_lambda(learning_rate=3e-4, batch_tokens=tokens,
                                          hessian_interval=10**6),
                        {"hessian_fn": hessian_fn}),
      # The same at a fixed rho: the difference is what the rho controller's counts cost.
      "sophia_lambda rho 0.04": (slj.sophia_lambda(learning_rate=3e-4, batch_tokens=tokens,
                                                   hessian_interval=10**6, rho=0.04),
                                 {"hessian_fn": hessian_fn}),
  }
  carries, steps, results = {}, {}, {}
  for name, (tx, extra) in candidates.items():
    p = jax.tree.map(jnp.copy, params)
    state = tx.init(p)
    steps[name] = make_step(tx, **extra)
    # Step 0 compiles (and, for sophia_lambda, refreshes h); the timed steps come after it.
    carries[name] = jax.block_until_ready(steps[name](p, state, grads))
    state_bytes = nbytes(carries[name][1])
    # Bytes a step must move: read params, grads and state; write params and state.
    results[name] = {"times": [], "state_bytes": state_bytes,
                     "moved_bytes": 2 * nbytes(params) + nbytes(grads) + 2 * state_bytes}

  # The copy baseline: one donated float32 array, read and written once per call.
  copy_elements = results["sophia_lambda"]["moved_bytes"] // 8
  copy = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  carries["copy"] = jax.block_until_ready(copy(jnp.zeros((copy_elements,), jnp.float32)))
  results["copy"] = {"times": [], "moved_bytes": 8 * copy_elements, "state_bytes": 0}

  for _ in range(rounds):
    for name in results:
      for _ in range(steps_per_round):
        start = time.perf_counter()
        if name == "copy":
          carries[name] = jax.block_until_ready(copy(carries[name]))
        else:
          carries[name] = jax.block_until_ready(steps[name](*carries[name], grads))
        results[name]["times"].append(time.perf_counter() - start)

  for r in results.values():
    r["seconds"] = statistics.median(r["times"])
    r["min_seconds"] = min(r["times"])
    r["gbps"] = r["moved_bytes"] / r["seconds"] / 1e9
  copy_gbps = results.pop("copy")["gbps"]
  ratio = results["sophia_lambda"]["seconds"] / results["optax.adamw"]["seconds"]
  min_ratio = results["sophia_lambda"]["min_seconds"] / results["optax.adamw"]["min_seconds"]
  return {"num_params": num_params, "results": results, "copy_gbps": copy_gbps,
          "ratio": ratio, "min_ratio": min_ratio, "timed_steps": rounds * steps_per_round}


def ratios():
  """For experiments/benchmarks/run_all.py."""
  m = measure()
  return {
      "sophia_lambda update time / optax.adamw": {"value": m["ratio"], "goal": "<= 0.9"},
      "sophia_lambda GB/s / jitted copy": {
          "value": m["results"]["sophia_lambda"]["gbps"] / m["copy_gbps"]},
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=float, default=25e6, help="approximate parameter count")
  parser.add_argument("--rounds", type=int, default=8,
                      help="alternating rounds of --steps-per-round timed steps each")
  parser.add_argument("--steps-per-round", type=int, default=4)
  args = parser.parse_args(argv)
  m = measure(args.params, args.rounds, args.steps_per_round)
  print(f"{m['num_params'] / 1e6:.1f}M parameters, {jax.device_count()} x "
        f"{jax.devices()[0].platform}, {m['timed_steps']} timed steps each, interleaved")
  print(f"{'step':<24}{'median ms':>10}{'min ms':>9}{'state MB':>10}{'moved MB':>10}"
        f"{'GB/s':>8}{'x copy':>8}")
  for name, r in m["results"].items():
    print(f"{name:<24}{1e3 * r['seconds']:>10.2f}{1e3 * r['min_seconds']:>9.2f}"
          f"{r['state_bytes'] / 1e6:>10.1f}{r['moved_bytes'] / 1e6:>10.1f}{r['gbps']:>8.2f}"
          f"{r['gbps'] / m['copy_gbps']:>8.2f}")
  print(f"{'jitted copy':<24}{'':>49}{m['copy_gbps']:>8.2f}{1.0:>8.2f}")
  print(f"sophia_lambda / optax.adamw time: {m['ratio']:.3f}x (goal <= 0.9; "
        f"ratio of minima {m['min_ratio']:.3f})")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
