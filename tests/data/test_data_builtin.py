"""The built-in corpus: deterministic document list and split, >= 5M tokens, cached once."""

import time

import numpy as np

from sophia_lambda_jax import data
from sophia_lambda_jax.data import sources


def test_document_list_is_deterministic_and_sorted():
  docs = data.builtin_documents()
  assert docs == data.builtin_documents()
  keys = [k for k, _ in docs]
  assert len(set(keys)) == len(keys) > 1000
  stdlib = [k for k in keys if k.startswith("stdlib/")]
  assert stdlib == sorted(stdlib) and "stdlib/collections/__init__.py" in stdlib
  assert not any("site-packages" in k for k in keys)
  assert any(k.startswith("pydoc/") for k in keys)
  assert sources.builtin_fingerprint() == sources.builtin_fingerprint()


def test_builtin_corpus_is_prepared_once_with_a_document_level_split(tmp_path, monkeypatch):
  monkeypatch.setenv("SLJ_DATA_CACHE", str(tmp_path / "cache"))
  start = time.perf_counter()
  path = data.builtin_dataset_dir()
  prepare_s = time.perf_counter() - start
  assert path.parent == tmp_path / "cache"
  manifest = data.load_manifest(path)
  train, val = manifest["splits"]["train"], manifest["splits"]["val"]
  assert train["tokens"] + val["tokens"] >= 5_000_000, manifest["splits"]
  assert val["tokens"] > 50_000
  # The split is the hash of each document's key, so it can be recomputed from the list.
  non_empty = [k for k, _ in data.builtin_documents()
               if k.startswith("pydoc/") or (sources._stdlib_dir() / k[7:]).stat().st_size]
  expected_val = sum(data.is_validation(k, data.BUILTIN_VAL_FRACTION) for k in non_empty)
  assert val["documents"] == expected_val
  assert train["documents"] == len(non_empty) - expected_val
  # Reused: the second call neither re-tokenises nor rewrites anything.
  stamp = (path / "manifest.json").stat().st_mtime_ns
  start = time.perf_counter()
  assert data.resolve_data("builtin") == path
  assert time.perf_counter() - start < prepare_s
  assert (path / "manifest.json").stat().st_mtime_ns == stamp
  rows = data.TokenBatches("builtin", "val", batch_size=8, seq_len=256, vocab_size=8192)
  assert rows.num_batches >= 20 and rows.batch(0).shape == (8, 257)
  counts = np.load(path / "train_counts.npy")
  assert counts.sum() == train["tokens"] and counts[data.EOS_ID] == train["documents"]
  print(f"built-in corpus: {train['tokens'] + val['tokens']:,} tokens, prepared in "
        f"{prepare_s:.1f} s")
