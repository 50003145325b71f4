"""Tiny trained runs shared by the model tests: qwen-tiny's default compact vocabulary (1024
ids), the full Qwen2 vocabulary (151,936 ids, untied head) and qwen-cpu's default compact
vocabulary (8192 ids), all float32."""

from __future__ import annotations

from pathlib import Path

import pytest
from word_corpus import prepared_word_corpus

STEPS = 6


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
  return prepared_word_corpus(tmp_path_factory.mktemp("model-corpus"), 200, (40, 120))


def _train(out: Path, data_dir: Path, model="qwen-tiny", steps=STEPS,
           **model_overrides) -> Path:
  from sophia_lambda_jax import train

  train.run_training(train.TrainConfig(
      model=model, model_overrides=model_overrides, optimizer="adamw",
      learning_rate=1e-2, steps=steps, batch_size=4, seq_len=32, data=str(data_dir),
      out=str(out), eval_every=steps, eval_batches=2, checkpoint_every=0,
      # The last evaluation reads 2 batches: `slj eval`'s default for this run.
      final_eval_batches=2, compute_dtype="float32", tensorboard=False, mesh="data=1,fsdp=1"))
  return out


@pytest.fixture(scope="session")
def compact_run(corpus, tmp_path_factory) -> Path:
  return _train(tmp_path_factory.mktemp("runs") / "compact", corpus)


@pytest.fixture(scope="session")
def full_run(corpus, tmp_path_factory) -> Path:
  return _train(tmp_path_factory.mktemp("runs") / "full", corpus, vocab_size=151936,
                tie_embeddings=False)


@pytest.fixture(scope="session")
def cpu_run(corpus, tmp_path_factory) -> Path:
  return _train(tmp_path_factory.mktemp("runs") / "qwen-cpu", corpus, model="qwen-cpu",
                steps=2)
