"""A synthetic word corpus, prepared with `data.prepare`, for tests that need a data
directory without the built-in corpus cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the quick brown fox jumps over a lazy dog while seven birds sing in tall trees "
         "and rivers flow down to the sea under grey clouds at night").split()


def prepared_word_corpus(root: Path, documents: int, words: tuple[int, int]) -> Path:
  """`documents` documents of a random number of WORDS in the range `words` (seed 0),
  tokenised into root/prepared with a tenth of the documents in validation."""
  from sophia_lambda_jax import data

  rng = random.Random(0)
  with open(root / "corpus.jsonl", "w") as f:
    for _ in range(documents):
      text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
      f.write(json.dumps({"text": text + "."}) + "\n")
  return data.prepare(str(root / "corpus.jsonl"), root / "prepared", val_fraction=0.1,
                      num_workers=1, progress=False)
