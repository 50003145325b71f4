"""Loader throughput: tokens/s that `data.TokenBatches` delivers on this machine's CPU.

    python -m experiments.benchmarks.bench_loader [--data builtin] [--batch-size 16]
        [--seq-len 512] [--vocab-size 8192] [--steps 2000] [--train-tokens-per-s X]

Counts batch_size * seq_len input tokens per batch (as the train step counts them). Measures
random access `batch(step)` on the shuffled train split, the prefetching `iterate()`, and the
same without the compact-vocabulary remap. The goal is loader tokens/s >= 10x the train
step's on CPU: pass the train step's tokens/s (`--train-tokens-per-s`, or the environment
variable SLJ_TRAIN_TOKENS_PER_S) to print that ratio; `ratios()` reports it to run_all.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from sophia_lambda_jax import data


def _tokens_per_s(fn, steps: int, tokens_per_batch: int) -> float:
  fn(0, 5)  # warm the page cache and the permutation code
  start = time.perf_counter()
  fn(5, steps)
  return steps * tokens_per_batch / (time.perf_counter() - start)


def measure(data_spec: str = "builtin", batch_size: int = 16, seq_len: int = 512,
            vocab_size: int | None = 8192, steps: int = 2000) -> dict:
  start = time.perf_counter()
  data_dir = data.resolve_data(data_spec)
  resolve_s = time.perf_counter() - start
  start = time.perf_counter()
  batches = data.TokenBatches(data_dir, "train", batch_size, seq_len, seed=0,
                              vocab_size=vocab_size)
  open_s = time.perf_counter() - start
  raw = data.TokenBatches(data_dir, "train", batch_size, seq_len, seed=0)
  tokens_per_batch = batch_size * seq_len

  def random_access(loader):
    def run(first, n):
      for step in range(first, first + n):
        loader.batch(step)
    return run

  def prefetched(first, n):
    for _ in batches.iterate(start_step=first, num_steps=n):
      pass

  return {
      "data_dir": str(data_dir), "split_tokens": batches.tokens, "batch_size": batch_size,
      "seq_len": seq_len, "vocab_size": batches.vocab_size, "steps": steps,
      "resolve_s": resolve_s, "open_s": open_s,
      "batch_tokens_per_s": _tokens_per_s(random_access(batches), steps, tokens_per_batch),
      "iterate_tokens_per_s": _tokens_per_s(prefetched, steps, tokens_per_batch),
      "raw_ids_tokens_per_s": _tokens_per_s(random_access(raw), steps, tokens_per_batch),
  }


def _train_tokens_per_s(value: float | None) -> float | None:
  if value is not None:
    return value
  env = os.environ.get("SLJ_TRAIN_TOKENS_PER_S")
  return float(env) if env else None


def ratios() -> dict:
  steps = 200 if os.environ.get("SLJ_BENCH_QUICK") else 2000
  result = measure(steps=steps)
  out = {"loader tokens/s (batch 16 x 512, vocab 8192)": result["batch_tokens_per_s"]}
  train = _train_tokens_per_s(None)
  if train:
    out["loader / train-step tokens/s"] = {
        "value": result["batch_tokens_per_s"] / train, "goal": ">= 10"}
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="builtin")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--vocab-size", type=int, default=8192, help="0: full Qwen2 vocabulary")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--train-tokens-per-s", type=float, default=None)
  args = parser.parse_args(argv)
  result = measure(args.data, args.batch_size, args.seq_len, args.vocab_size or None,
                   args.steps)
  print(f"data: {result['data_dir']} ({result['split_tokens']:,} train tokens; resolved in "
        f"{result['resolve_s']:.2f} s, opened in {result['open_s'] * 1e3:.1f} ms)")
  print(f"batch {args.batch_size} x seq {args.seq_len}, vocab {result['vocab_size']}, "
        f"{args.steps} steps, one process")
  vocab = "compact vocab" if result["vocab_size"] < data.QWEN_VOCAB_SIZE else "Qwen2 ids"
  for key, label in (("batch_tokens_per_s", f"batch(step), {vocab}"),
                     ("iterate_tokens_per_s", f"iterate(), {vocab}"),
                     ("raw_ids_tokens_per_s", "batch(step), Qwen2 ids")):
    print(f"  {label:<28} {result[key] / 1e6:8.1f} M tokens/s")
  train = _train_tokens_per_s(args.train_tokens_per_s)
  if train:
    print(f"loader / train-step tokens/s: {result['batch_tokens_per_s'] / train:.1f}x "
          f"(goal >= 10)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
