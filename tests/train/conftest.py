"""Fixtures for the training tests: a small prepared corpus and subprocess helpers.

The corpus is a few hundred short synthetic documents written as jsonl and tokenised with
`data.prepare` (well under a second), so the tests do not depend on the built-in corpus
cache. Subprocess runs share a persistent XLA compilation cache so a restarted run does not
pay for compiling the same step twice.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ("the quick brown fox jumps over a lazy dog while seven birds sing in tall trees "
         "and rivers flow down to the sea under grey clouds at night").split()


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
  """A prepared data directory (train ~37k tokens, val ~4k tokens)."""
  from sophia_lambda_jax import data

  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  with open(root / "corpus.jsonl", "w") as f:
    for _ in range(400):
      words = [rng.choice(WORDS) for _ in range(rng.randint(50, 150))]
      f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")
  return data.prepare(str(root / "corpus.jsonl"), root / "prepared", val_fraction=0.1,
                      num_workers=1, progress=False)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("xla-cache")
