"""TokenBatches: determinism, per-process slicing, epochs, validation order, compact vocab,
and the shard errors (each names the file)."""

import json

import numpy as np
import pytest

from sophia_lambda_jax import data
from sophia_lambda_jax.data import loader, shards
from sophia_lambda_jax.data.loader import CompactVocab, feistel_permutation


def synthetic_dataset(path, train_sizes=(500, 0, 1300, 211), val_size=400, seed=0):
  """A prepared directory written directly: random ids in several shards (one empty)."""
  rng = np.random.default_rng(seed)
  path.mkdir(parents=True, exist_ok=True)
  splits = {}
  streams = {}
  for split, sizes in (("train", train_sizes), ("val", (val_size,))):
    entries, pieces = [], []
    for i, size in enumerate(sizes):
      ids = rng.zipf(1.3, size=size).astype(np.int64) % 5000
      ids[rng.random(size) < 0.02] = data.EOS_ID
      shards.write_shard(path / f"{split}-{i:05d}.bin", ids.astype(np.uint32),
                         data.QWEN_VOCAB_SIZE)
      entries.append({"file": f"{split}-{i:05d}.bin", "tokens": size})
      pieces.append(ids)
    splits[split] = {"tokens": sum(sizes), "documents": 1, "shards": entries}
    streams[split] = np.concatenate(pieces)
  counts = np.bincount(streams["train"], minlength=data.QWEN_VOCAB_SIZE).astype(np.int64)
  np.save(path / "train_counts.npy", counts)
  manifest = {"format": "sophia-lambda-jax/token-shards", "format_version": 1,
              "fingerprint": "synthetic", "val_fraction": 0.1,
              "vocab_size": data.QWEN_VOCAB_SIZE, "eos_id": data.EOS_ID, "tokenizer": "qwen2",
              "source": "synthetic", "counts": "train_counts.npy", "splits": splits}
  (path / "manifest.json").write_text(json.dumps(manifest))
  return streams


@pytest.fixture
def dataset(tmp_path):
  streams = synthetic_dataset(tmp_path / "ds")
  return tmp_path / "ds", streams


def test_rows_are_windows_of_the_concatenated_stream(dataset):
  path, streams = dataset
  batches = data.TokenBatches(path, "train", batch_size=6, seq_len=50, seed=3)
  assert batches.tokens == streams["train"].size == 2011
  assert batches.num_windows == (2011 - 1) // 50
  for step in range(12):  # several epochs; windows cross shard boundaries
    rows = batches.batch(step)
    assert rows.shape == (6, 51) and rows.dtype == np.int32
    for row, start in zip(rows, batches.window_starts(step)):
      np.testing.assert_array_equal(row, streams["train"][start:start + 51])


def test_batches_are_a_pure_function_of_seed_and_step(dataset):
  path, _ = dataset
  a = data.TokenBatches(path, "train", batch_size=4, seq_len=16, seed=7)
  b = data.TokenBatches(path, "train", batch_size=4, seq_len=16, seed=7)
  forward = [a.batch(s) for s in range(10)]
  backward = [b.batch(s) for s in reversed(range(10))][::-1]  # a "restart" at any step
  for x, y in zip(forward, backward):
    np.testing.assert_array_equal(x, y)
  other = data.TokenBatches(path, "train", batch_size=4, seq_len=16, seed=8)
  assert not all(np.array_equal(x, other.batch(s)) for s, x in enumerate(forward))
  prefetched = list(a.iterate(start_step=3, num_steps=5))
  for x, y in zip(prefetched, forward[3:8], strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("split", ["train", "val"])
def test_processes_read_disjoint_slices_of_the_global_batch(dataset, split):
  path, _ = dataset
  whole = data.TokenBatches(path, split, batch_size=8, seq_len=20, seed=1)
  for step in (0, 5, 31):
    parts = [data.TokenBatches(path, split, batch_size=8, seq_len=20, seed=1,
                               process_index=p, process_count=4) for p in range(4)]
    local = [p.batch(step) for p in parts]
    assert all(x.shape == (2, 21) for x in local)
    np.testing.assert_array_equal(np.concatenate(local), whole.batch(step))


def test_each_train_epoch_visits_every_window_once(dataset):
  path, _ = dataset
  batches = data.TokenBatches(path, "train", batch_size=5, seq_len=30, seed=0)
  n = batches.num_windows
  starts = np.concatenate([batches.window_starts(s) for s in range(-(-3 * n // 5))])
  for epoch in range(3):
    epoch_starts = starts[epoch * n:(epoch + 1) * n]
    shift = epoch_starts.min()
    assert 0 <= shift <= (batches.tokens - 1) % 30
    np.testing.assert_array_equal(np.sort(epoch_starts), shift + 30 * np.arange(n))
  # The order differs between epochs.
  assert not np.array_equal(starts[:n] - starts[:n].min(), starts[n:2 * n] - starts[n:2 * n].min())


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
  perm = feistel_permutation(np.arange(n), n, key=12345)
  np.testing.assert_array_equal(np.sort(perm), np.arange(n))
  if n >= 64:
    assert not np.array_equal(perm, feistel_permutation(np.arange(n), n, key=54321))
    assert not np.array_equal(perm, np.arange(n))


def test_validation_batches_cover_the_split_in_order(dataset):
  path, streams = dataset
  val = data.TokenBatches(path, "val", batch_size=3, seq_len=40, seed=0)
  same = data.TokenBatches(path, "val", batch_size=3, seq_len=40, seed=99)
  assert val.num_batches == ((400 - 1) // 40) // 3
  covered = np.concatenate([val.batch(i)[:, :-1].reshape(-1) for i in range(val.num_batches)])
  np.testing.assert_array_equal(covered, streams["val"][:covered.size])
  for i in range(val.num_batches + 2):
    np.testing.assert_array_equal(val.batch(i), same.batch(i))


def test_compact_vocab_ranks_by_train_frequency():
  counts = np.zeros(data.QWEN_VOCAB_SIZE, np.int64)
  counts[[50, 7, 9, 151000, data.EOS_ID, 3]] = [10, 30, 30, 20, 1000, 5]
  vocab = CompactVocab.from_counts(counts, 6)
  # ranks: 7 and 9 tie at 30 (smaller id first), then 151000, then 50; EOS is not ranked.
  np.testing.assert_array_equal(vocab.inverse, [7, 9, 151000, 50, data.EOS_ID, -1])
  assert vocab.eos_id == 4 and vocab.unk_id == 5
  ids = np.array([7, 9, 151000, 50, data.EOS_ID, 3, 0, 151935])
  np.testing.assert_array_equal(vocab.forward[ids], [0, 1, 2, 3, 4, 5, 5, 5])
  np.testing.assert_array_equal(vocab.to_qwen(vocab.forward[ids[:5]]), ids[:5])
  for bad in (2, data.QWEN_VOCAB_SIZE, 8.0):
    with pytest.raises(ValueError, match="vocab_size"):
      CompactVocab.from_counts(counts, bad)


def test_loader_applies_the_compact_vocab(dataset):
  path, streams = dataset
  raw = data.TokenBatches(path, "train", batch_size=4, seq_len=25, seed=2)
  small = data.TokenBatches(path, "train", batch_size=4, seq_len=25, seed=2, vocab_size=64)
  counts = np.bincount(streams["train"], minlength=data.QWEN_VOCAB_SIZE)
  expected = CompactVocab.from_counts(counts, 64)
  assert small.vocab_size == 64 and small.eos_id == 62
  for step in range(4):
    rows = small.batch(step)
    assert rows.min() >= 0 and rows.max() < 64
    np.testing.assert_array_equal(rows, expected.forward[raw.batch(step)])
  assert (rows == 63).any() and (rows < 62).any()  # both ranked ids and UNK occur
  full = data.TokenBatches(path, "train", batch_size=4, seq_len=25, seed=2,
                           vocab_size=data.QWEN_VOCAB_SIZE)
  np.testing.assert_array_equal(full.batch(1), raw.batch(1))


def test_bad_loader_arguments(dataset):
  path, _ = dataset
  for kwargs, name in (({"batch_size": 6, "process_count": 4}, "divisible"),
                       ({"process_index": 4, "process_count": 4}, "process_index"),
                       ({"seq_len": 0}, "seq_len"), ({"batch_size": 2.5}, "batch_size")):
    with pytest.raises(ValueError, match=name):
      data.TokenBatches(path, "train", **{"batch_size": 8, "seq_len": 8, **kwargs})
  with pytest.raises(ValueError, match="split"):
    data.TokenBatches(path, "test", 2, 8)


# --- bad shards: each error names the file ----------------------------------------------------


def test_fewer_tokens_than_one_batch(dataset):
  path, _ = dataset
  with pytest.raises(ValueError, match=r"split 'val' has 400 tokens, fewer than one batch.*"
                     r"val-00000.bin"):
    data.TokenBatches(path, "val", batch_size=8, seq_len=64)


def test_truncated_shard(dataset):
  path, _ = dataset
  shard = path / "train-00002.bin"
  shard.write_bytes(shard.read_bytes()[:-6])
  with pytest.raises(ValueError, match=f"{shard}: truncated or corrupt"):
    data.TokenBatches(path, "train", 2, 8)
  shard.write_bytes(b"SLJ")
  with pytest.raises(ValueError, match=f"{shard}: truncated token shard"):
    data.TokenBatches(path, "train", 2, 8)


def test_foreign_file_as_shard(dataset):
  path, _ = dataset
  shard = path / "train-00000.bin"
  raw = bytearray(shard.read_bytes())
  raw[:8] = b"GPT2TOKS"
  shard.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=f"{shard}: not a token shard \\(bad magic"):
    data.TokenBatches(path, "train", 2, 8)


def test_token_id_out_of_vocabulary(dataset, monkeypatch):
  path, _ = dataset
  shard = path / "train-00003.bin"
  raw = bytearray(shard.read_bytes())
  raw[shards.HEADER_SIZE + 8:shards.HEADER_SIZE + 12] = np.uint32(151936).tobytes()
  shard.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=f"{shard}: token id 151936 >= vocab size 151936"):
    data.TokenBatches(path, "train", 2, 8)
  # Splits too large to scan when opened are checked batch by batch instead.
  monkeypatch.setattr(loader, "FULL_SCAN_TOKENS", 0)
  batches = data.TokenBatches(path, "train", 2, 8)
  with pytest.raises(ValueError, match=f"{shard}: token id 151936 >= vocab size 151936"):
    for step in range(batches.num_batches + 1):
      batches.batch(step)
  with pytest.raises(ValueError, match="token id .* >= vocab"):
    shards.write_shard(path / "x.bin", np.array([1, 151936]), data.QWEN_VOCAB_SIZE)
  assert not (path / "x.bin").exists() and not list(path.glob(".*.tmp"))


def test_missing_or_replaced_shard(dataset):
  path, _ = dataset
  (path / "train-00001.bin").unlink()
  with pytest.raises(FileNotFoundError, match="train-00001.bin"):
    data.TokenBatches(path, "train", 2, 8)
  shards.write_shard(path / "train-00001.bin", np.arange(10), data.QWEN_VOCAB_SIZE)
  with pytest.raises(ValueError, match="train-00001.bin: shard holds 10 tokens, the manifest"):
    data.TokenBatches(path, "train", 2, 8)


def test_tabulated_and_direct_permutations_give_the_same_stream(dataset, monkeypatch):
  path, _ = dataset
  tabulated = data.TokenBatches(path, "train", batch_size=7, seq_len=9, seed=4)
  expected = [tabulated.window_starts(s) for s in range(0, 200, 13)]
  monkeypatch.setattr(loader, "PERMUTATION_TABLE_MAX", 0)
  direct = data.TokenBatches(path, "train", batch_size=7, seq_len=9, seed=4)
  for s, want in zip(range(0, 200, 13), expected):
    np.testing.assert_array_equal(direct.window_starts(s), want)
