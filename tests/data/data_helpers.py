"""Helpers for the data tests: small corpora written on the fly."""

import json

import numpy as np
from sophia_lambda_jax.data import EOS_ID, get_tokenizer, is_validation


def make_documents(n: int, seed: int = 0) -> list[str]:
  """n varied English-and-code documents of 20..400 words."""
  rng = np.random.default_rng(seed)
  words = ("the optimizer clips each coordinate of the update when curvature is small; "
           "def step(params, grads): return params - lr * grads  # Sophia-Lambda 0.95 "
           "layer scale lambda = c * sqrt(d / n), Hessian EMA, Gauss-Newton-Bartlett, "
           "naïve café über straße 東京 数据 α β γ 12345 ;; {} [] ()").split()
  return [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(20, 400))))
          for i in range(n)]


def write_jsonl(path, docs, ids=False):
  with open(path, "w", encoding="utf-8") as f:
    for i, doc in enumerate(docs):
      record = {"text": doc, "id": f"doc-{i}"} if ids else {"text": doc}
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  return path


def expected_stream(keys_and_docs, val_fraction, split):
  """Token stream `prepare` must write for one split: each document's ids, then EOS."""
  tok = get_tokenizer()
  ids = []
  for key, doc in keys_and_docs:
    if is_validation(key, val_fraction) == (split == "val"):
      ids.extend(tok.encode(doc) + [EOS_ID])
  return np.asarray(ids, np.uint32)
