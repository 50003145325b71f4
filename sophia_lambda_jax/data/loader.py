"""Deterministic (batch, seq_len + 1) windows over memory-mapped token shards.

The shards of a split are read as one stream of N tokens (their concatenation in manifest
order). It is cut into n = (N - 1) // seq_len non-overlapping windows of seq_len + 1 tokens
(inputs and shifted targets; consecutive windows share one token).

Train split, epoch e (global rows e*n .. (e+1)*n - 1):
    window(row) = pi_{seed,e}(row mod n),  start = window * seq_len + shift_{seed,e}
where pi is a pseudo-random permutation of [0, n) (a 4-round Feistel network on the smallest
even bit width covering n, with cycle-walking: O(1) memory for any n; up to
PERMUTATION_TABLE_MAX windows an epoch's permutation is tabulated once) and shift in
[0, (N - 1) mod seq_len] moves the window grid each epoch. Every epoch visits every window
once. Global batch `step` holds rows step*B .. step*B + B - 1 and process p of P takes the
B/P rows starting at step*B + p*B/P, so `batch(step)` is a pure function of
(seed, step, process_index): a restarted job resumes the exact stream by asking for the next
step, and every host only touches its own rows.

Validation split: no shuffle and no shift; batch i holds windows i*B .. i*B + B - 1, so
`batch(i) for i in range(num_batches)` covers the split once (larger i wrap around).

Compact vocabulary (`vocab_size` < 151936; `CompactVocab`): ids are remapped to
    0 .. V-3  the V-2 most frequent ids of the train split (EOS excluded), by descending count,
              ties broken by the smaller Qwen2 id;
    V-2       EOS (151643);
    V-1       UNK: every other id.
The table is a pure function of `train_counts.npy` (written by `prepare`) and V; a training
run stores it in its directory (`CompactVocab.save`, file COMPACT_VOCAB_FILE) so that the
run decodes and evaluates without the data folder, and `slj export` writes it beside the
weights. UNK decodes to UNK_TEXT.

(grain's random-access samplers would do the same job; a plain NumPy implementation keeps the
stream a closed-form function that is easy to state and test.)
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sophia_lambda_jax.data import shards
from sophia_lambda_jax.data.preparation import data_fingerprint, load_manifest, resolve_data
from sophia_lambda_jax.data.tokenizer import EOS_ID, QWEN_VOCAB_SIZE

# Splits up to this many tokens are scanned for out-of-range ids when opened; larger ones are
# checked batch by batch as they are read (see docs/decisions.md, 2026-11-23: token splits
# checked whole when opened).
FULL_SCAN_TOKENS = 1 << 27

# Up to this many windows, a whole epoch's permutation is tabulated once (4 bytes/window)
# instead of evaluating the Feistel network for every batch; the stream is the same.
PERMUTATION_TABLE_MAX = 1 << 22

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_MASK64 = (1 << 64) - 1

COMPACT_VOCAB_FILE = "compact_vocab.npy"
# What UNK decodes to: a visible placeholder (U+FFFD would read as broken bytes), the same
# in `slj generate` and in an exported tokenizer.
UNK_TEXT = "<|unk|>"


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective avalanche hash of uint64 (Steele et al., 2014)."""
  x = x ^ (x >> _S30)
  x *= _M1  # uint64 arrays wrap silently modulo 2**64
  x ^= x >> _S27
  x *= _M2
  x ^= x >> _S31
  return x


def _key(*parts: int) -> int:
  """A 64-bit key mixed from integers (seed, epoch, round...)."""
  h = np.array([0x9E3779B97F4A7C15], np.uint64)
  for p in parts:
    h = _mix64(h ^ np.uint64(p & _MASK64))
  return int(h[0])


@functools.lru_cache(maxsize=64)
def _round_keys(key: int, rounds: int) -> tuple[np.uint64, ...]:
  return tuple(np.uint64(_key(key, r)) for r in range(rounds))


def feistel_permutation(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
  """pi(index) for a pseudo-random permutation pi of [0, n) selected by `key`.

  A balanced Feistel network on 2h bits (4**h >= n) is a bijection of [0, 4**h); applying it
  again to results >= n (cycle-walking) restricts it to a bijection of [0, n). 4**h < 4n, so
  each element needs under 4 applications on average.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  half = np.uint64(max(1, (int(n - 1).bit_length() + 1) // 2))
  mask = np.uint64((1 << int(half)) - 1)
  round_keys = _round_keys(int(key) & _MASK64, rounds)

  def network(x):
    left, right = x >> half, x & mask
    for k in round_keys:
      left, right = right, left ^ (_mix64(right ^ k) & mask)
    return (left << half) | right

  x = network(np.array(index, np.uint64, ndmin=1))
  outside = x >= np.uint64(n)
  while outside.any():
    x[outside] = network(x[outside])
    outside = x >= np.uint64(n)
  return x.astype(np.int64).reshape(np.shape(index))


class CompactVocab(NamedTuple):
  """Remapping of Qwen2 ids onto `size` ids (scheme in the module docstring).

  forward: int32 (151936,), Qwen2 id -> compact id. inverse: int64 (size,), compact id ->
  Qwen2 id, -1 for UNK.
  """
  size: int
  forward: np.ndarray
  inverse: np.ndarray

  @property
  def eos_id(self) -> int:
    return self.size - 2

  @property
  def unk_id(self) -> int:
    return self.size - 1

  @classmethod
  def from_counts(cls, counts: np.ndarray, size: int) -> CompactVocab:
    if not isinstance(size, (int, np.integer)) or not 3 <= size < QWEN_VOCAB_SIZE:
      raise ValueError(f"vocab_size for a compact vocabulary must be an int in "
                       f"[3, {QWEN_VOCAB_SIZE}), got {size!r}")
    counts = np.asarray(counts, np.int64)
    if counts.shape != (QWEN_VOCAB_SIZE,):
      raise ValueError(f"counts must have shape ({QWEN_VOCAB_SIZE},), got {counts.shape}")
    ids = np.arange(QWEN_VOCAB_SIZE)
    ids = ids[ids != EOS_ID]
    # lexsort: last key is primary -> descending count, then ascending id.
    ranked = ids[np.lexsort((ids, -counts[ids]))][:size - 2]
    forward = np.full(QWEN_VOCAB_SIZE, size - 1, np.int32)
    forward[ranked] = np.arange(size - 2, dtype=np.int32)
    forward[EOS_ID] = size - 2
    inverse = np.concatenate([ranked, [EOS_ID, -1]]).astype(np.int64)
    return cls(int(size), forward, inverse)

  def to_qwen(self, ids) -> np.ndarray:
    """Compact ids -> Qwen2 ids (UNK -> -1), e.g. to decode generated samples."""
    return self.inverse[np.asarray(ids)]

  def save(self, path) -> None:
    """Writes `inverse` (compact id -> Qwen2 id, -1 for UNK), all the table needs."""
    with open(path, "wb") as f:  # np.save would append ".npy" to another suffix
      np.save(f, self.inverse)

  @classmethod
  def load(cls, path) -> CompactVocab:
    """The table written by `save`; raises ValueError naming the file if it is not one."""
    inverse = np.load(path)
    size = len(inverse)
    kept = inverse[:-2]
    if (inverse.ndim != 1 or size < 3 or inverse[-1] != -1 or inverse[-2] != EOS_ID
        or kept.min(initial=0) < 0 or kept.max(initial=0) >= QWEN_VOCAB_SIZE
        or len(np.unique(kept)) != len(kept) or EOS_ID in kept):
      raise ValueError(f"{path} is not a compact-vocabulary table (expected distinct Qwen2 "
                       f"ids, then EOS {EOS_ID}, then -1 for UNK)")
    forward = np.full(QWEN_VOCAB_SIZE, size - 1, np.int32)
    forward[kept] = np.arange(size - 2, dtype=np.int32)
    forward[EOS_ID] = size - 2
    return cls(int(size), forward, inverse.astype(np.int64))


def _allow_open_files(count: int) -> None:
  """Raise the soft open-file limit towards the hard one: each memory map holds a descriptor."""
  try:
    import resource
  except ImportError:  # not POSIX
    return
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft != resource.RLIM_INFINITY and soft < count:
    wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class _Shard(NamedTuple):
  path: Path
  tokens: np.ndarray  # ndarray view of a read-only np.memmap
  crc32: int | None  # of the token bytes, from the manifest (None: written before checksums)


def _as_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return int(value)


class TokenBatches:
  """(batch_size // process_count, seq_len + 1) int32 windows of a prepared split.

  Args:
    data_dir: a directory written by `prepare` (or "builtin", via `resolve_data`).
    split: "train" (shuffled per epoch) or "val" (in order).
    batch_size: global sequences per step, over all processes.
    seq_len: tokens per input row; rows hold seq_len + 1 (inputs + shifted targets).
    seed: selects the train permutation (ignored by the val split).
    vocab_size: None or >= 151936 keeps the Qwen2 ids; smaller remaps onto a `CompactVocab`
      ranked from this data's train counts, or onto `compact_vocab` when it is given (a
      run's stored table, to evaluate it on other data).
    process_index, process_count: this host's slice of the global batch.

  Raises FileNotFoundError/ValueError naming the file for a missing directory, manifest or
  shard, a truncated or foreign shard, ids >= vocab, or a split shorter than one batch.
  """

  def __init__(self, data_dir, split: str = "train", batch_size: int = 8, seq_len: int = 256,
               seed: int = 0, *, vocab_size: int | None = None, process_index: int = 0,
               process_count: int = 1, compact_vocab: CompactVocab | None = None):
    if split not in ("train", "val"):
      raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    self.batch_size = _as_int("batch_size", batch_size, 1)
    self.seq_len = _as_int("seq_len", seq_len, 1)
    self.seed = _as_int("seed", seed, 0)
    self.process_count = _as_int("process_count", process_count, 1)
    self.process_index = _as_int("process_index", process_index, 0)
    if self.process_index >= self.process_count:
      raise ValueError(f"process_index {process_index} must be < process_count {process_count}")
    if self.batch_size % self.process_count:
      raise ValueError(f"batch_size {batch_size} must be divisible by process_count "
                       f"{process_count}")
    self.local_batch_size = self.batch_size // self.process_count
    self.data_dir = resolve_data(data_dir)
    self.split = split
    self.manifest = load_manifest(self.data_dir)
    self.source_vocab_size = int(self.manifest["vocab_size"])
    self._shards = self._open_shards()
    self._verified: set[int] = set()
    lengths = np.array([len(s.tokens) for s in self._shards], np.int64)
    self._ends = np.cumsum(lengths)
    self._starts = self._ends - lengths
    self.tokens = int(lengths.sum())
    self.num_windows = max(self.tokens - 1, 0) // self.seq_len
    if self.num_windows < self.batch_size:
      files = ", ".join(str(s.path) for s in self._shards) or f"no non-empty {split} shard"
      raise ValueError(
          f"{self.data_dir} split {split!r} has {self.tokens} tokens, fewer than one batch of "
          f"{self.batch_size} x {self.seq_len} + 1 (files: {files})")
    self.num_batches = self.num_windows // self.batch_size
    self._tables: dict[int, np.ndarray | None] = {}
    self._max_shift = (self.tokens - 1) % self.seq_len
    if vocab_size is None or vocab_size >= QWEN_VOCAB_SIZE:
      self.vocab = None
      self.vocab_size = QWEN_VOCAB_SIZE if vocab_size is None else int(vocab_size)
      self.eos_id = EOS_ID
    elif compact_vocab is not None:
      if compact_vocab.size != vocab_size:
        raise ValueError(f"compact_vocab has {compact_vocab.size} ids, vocab_size is "
                         f"{vocab_size}")
      self.vocab = compact_vocab
      self.vocab_size = self.vocab.size
      self.eos_id = self.vocab.eos_id
    else:
      counts = np.load(self.data_dir / self.manifest["counts"])
      self.vocab = CompactVocab.from_counts(counts, vocab_size)
      self.vocab_size = self.vocab.size
      self.eos_id = self.vocab.eos_id

  def _open_shards(self) -> list[_Shard]:
    entries = self.manifest["splits"][self.split]["shards"]
    _allow_open_files(len(entries) + 64)
    opened = []
    for entry in entries:
      path = self.data_dir / entry["file"]
      header, tokens = shards.open_shard(path)
      if header.vocab != self.source_vocab_size:
        raise ValueError(f"{path}: shard vocab {header.vocab} differs from the manifest's "
                         f"{self.source_vocab_size}")
      if header.count != entry["tokens"]:
        raise ValueError(f"{path}: shard holds {header.count} tokens, the manifest says "
                         f"{entry['tokens']} (replaced or truncated file)")
      if header.count:
        # A plain ndarray view of the map: slicing it skips np.memmap's per-slice overhead.
        opened.append(_Shard(path, np.asarray(tokens), entry.get("crc32")))
    if sum(len(s.tokens) for s in opened) <= FULL_SCAN_TOKENS:
      for shard in opened:
        self._check_ids(shard.tokens, shard.path)
    return opened

  def _check_ids(self, ids: np.ndarray, path) -> None:
    if ids.size and int(ids.max()) >= self.source_vocab_size:
      raise ValueError(f"{path}: token id {int(ids.max())} >= vocab size "
                       f"{self.source_vocab_size}")

  @property
  def fingerprint(self) -> str:
    """Identifies the prepared data (to refuse resuming a run on other data; see
    `preparation.data_fingerprint`)."""
    return data_fingerprint(self.data_dir)

  def _verify_shard(self, i: int) -> None:
    """Check shard i against the manifest's checksum the first time it is read (one pass
    over the file, paid once per shard rather than for a whole FineWeb-sized folder, tens
    of GB, at start; see docs/decisions.md, 2026-12-02: CRC-32 checksums for checkpoints
    and token shards)."""
    if i in self._verified:
      return
    crc = self._shards[i].crc32
    if crc is not None and shards.payload_crc32(self._shards[i].path) != crc:
      raise ValueError(f"{self._shards[i].path}: token shard differs from what `slj tokenize` "
                       "wrote (checksum mismatch: overwritten or damaged); tokenise the "
                       "source again into a new directory")
    self._verified.add(i)

  def window_starts(self, step: int) -> np.ndarray:
    """Stream offsets of this process's rows of global batch `step` (int64, local batch)."""
    step = _as_int("step", step, 0)
    first = step * self.batch_size + self.process_index * self.local_batch_size
    rows = first + np.arange(self.local_batch_size, dtype=np.int64)
    n = self.num_windows
    if self.split == "val":
      return (rows % n) * self.seq_len
    epochs, index = np.divmod(rows, n)
    starts = np.empty_like(rows)
    for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):  # usually one epoch per batch
      sel = epochs == epoch
      key = _key(self.seed, epoch)
      shift = _key(key, 1 << 32) % (self._max_shift + 1)
      starts[sel] = self._permute(index[sel], epoch, key) * self.seq_len + shift
    return starts

  def _permute(self, index: np.ndarray, epoch: int, key: int) -> np.ndarray:
    """feistel_permutation(index, n, key); whole-epoch tables are cached for small n."""
    n = self.num_windows
    if n > PERMUTATION_TABLE_MAX:
      return feistel_permutation(index, n, key)
    table = self._tables.get(epoch)
    if table is None:
      table = feistel_permutation(np.arange(n), n, key).astype(np.int32)
      self._tables = {epoch - 1: self._tables.get(epoch - 1), epoch: table}
    return table[index].astype(np.int64)

  def _read(self, start: int, length: int) -> np.ndarray:
    out = np.empty(length, np.uint32)
    i = int(np.searchsorted(self._ends, start, side="right"))
    filled = 0
    while filled < length:
      self._verify_shard(i)
      shard = self._shards[i]
      lo = start + filled - int(self._starts[i])
      piece = shard.tokens[lo:lo + length - filled]
      if self.tokens > FULL_SCAN_TOKENS:
        self._check_ids(piece, shard.path)
      out[filled:filled + len(piece)] = piece
      filled += len(piece)
      i += 1
    return out

  def batch(self, step: int) -> np.ndarray:
    """int32 (local_batch_size, seq_len + 1) rows of global batch `step`."""
    length = self.seq_len + 1
    starts = self.window_starts(step)
    which = np.searchsorted(self._ends, starts, side="right")
    for i in set(which.tolist()) - self._verified:
      self._verify_shard(i)
    rows = np.empty((len(starts), length), np.uint32)
    for r, (start, i) in enumerate(zip(starts.tolist(), which.tolist())):
      lo = start - int(self._starts[i])
      if lo + length <= len(self._shards[i].tokens):  # the common case: inside one shard
        rows[r] = self._shards[i].tokens[lo:lo + length]
      else:
        rows[r] = self._read(start, length)
    if self.tokens > FULL_SCAN_TOKENS and rows.max() >= self.source_vocab_size:
      for start, i in zip(starts.tolist(), which.tolist()):
        self._read(start, length)  # raises, naming the shard
    if self.vocab is not None:
      return self.vocab.forward[rows]
    return rows.astype(np.int32)

  def iterate(self, start_step: int = 0, num_steps: int | None = None,
              prefetch: int = 2) -> Iterator[np.ndarray]:
    """batch(start_step), batch(start_step + 1), ... read ahead by a background thread."""
    end = None if num_steps is None else start_step + num_steps
    buffer: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
    stop = threading.Event()

    def produce():
      step = start_step
      try:
        while not stop.is_set() and (end is None or step < end):
          buffer.put((None, self.batch(step)))
          step += 1
        buffer.put((None, None))
      except BaseException as e:  # surfaced in the consumer
        buffer.put((e, None))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        error, rows = buffer.get()
        if error is not None:
          raise error
        if rows is None:
          return
        yield rows
    finally:
      stop.set()
      while thread.is_alive():  # unblock a producer waiting on a full queue
        try:
          buffer.get_nowait()
        except queue.Empty:
          thread.join(timeout=0.01)

  def __repr__(self) -> str:
    return (f"TokenBatches({os.fspath(self.data_dir)!r}, split={self.split!r}, "
            f"batch_size={self.batch_size}, seq_len={self.seq_len}, seed={self.seed}, "
            f"vocab_size={self.vocab_size}, process={self.process_index}/"
            f"{self.process_count}, tokens={self.tokens})")
