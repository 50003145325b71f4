"""The on-disk token shard: a 32-byte header followed by little-endian uint32 token ids.

Header layout (little-endian):

    offset  size  field
    0       8     magic   b"SLJTOKS\\x00"
    8       4     version (uint32, currently 1)
    12      4     vocab   (uint32) every id in the shard is < vocab
    16      8     count   (uint64) number of tokens that follow
    24      8     reserved, zero

so a shard's size is exactly 32 + 4 * count bytes. Writers write to a temporary name and
rename it into place only once the header holds the final count, so a shard under its final
name is always complete; readers still check magic, version, vocab and size, and name the file
when something is off (truncated copy, foreign file).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAGIC = b"SLJTOKS\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")
HEADER_SIZE = HEADER.size  # 32
TOKEN_DTYPE = np.dtype("<u4")


class ShardHeader(NamedTuple):
  version: int
  vocab: int
  count: int


def temp_path(path: Path) -> Path:
  """Where a file is written before its atomic rename (hidden, in the same directory)."""
  path = Path(path)
  return path.with_name(f".{path.name}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
  tmp = temp_path(path)
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class ShardWriter:
  """Streams uint32 ids into `path` atomically: nothing appears under `path` until `close`."""

  def __init__(self, path: Path, vocab: int):
    self.path = Path(path)
    self.vocab = int(vocab)
    self.count = 0
    self.crc32 = 0  # of the token bytes after the header (the manifest records it)
    self._tmp = temp_path(self.path)
    self._file = open(self._tmp, "wb")
    self._file.write(HEADER.pack(MAGIC, VERSION, self.vocab, 0))

  def write(self, ids: np.ndarray) -> None:
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) >= self.vocab:
      raise ValueError(f"{self.path}: token id {int(ids.max())} >= vocab {self.vocab}")
    payload = ids.astype(TOKEN_DTYPE, copy=False).tobytes()
    self._file.write(payload)
    self.crc32 = zlib.crc32(payload, self.crc32)
    self.count += int(ids.size)

  def close(self) -> Path:
    self._file.seek(0)
    self._file.write(HEADER.pack(MAGIC, VERSION, self.vocab, self.count))
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    os.replace(self._tmp, self.path)
    return self.path

  def abort(self) -> None:
    self._file.close()
    self._tmp.unlink(missing_ok=True)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_shard(path: Path, ids: np.ndarray, vocab: int) -> Path:
  with ShardWriter(path, vocab) as writer:
    writer.write(ids)
  return Path(path)


def read_header(path: Path) -> ShardHeader:
  """Checked header of a shard; ValueError naming the file if it is foreign or truncated."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"token shard {path} does not exist")
  size = path.stat().st_size
  with open(path, "rb") as f:
    raw = f.read(HEADER_SIZE)
  if len(raw) < HEADER_SIZE:
    raise ValueError(f"{path}: truncated token shard ({size} bytes, shorter than the "
                     f"{HEADER_SIZE}-byte header)")
  magic, version, vocab, count = HEADER.unpack(raw)
  if magic != MAGIC:
    raise ValueError(f"{path}: not a token shard (bad magic {magic!r}, expected {MAGIC!r})")
  if version != VERSION:
    raise ValueError(f"{path}: token shard version {version}, this library reads {VERSION}")
  expected = HEADER_SIZE + TOKEN_DTYPE.itemsize * count
  if size != expected:
    raise ValueError(f"{path}: truncated or corrupt token shard: header says {count} tokens "
                     f"({expected} bytes) but the file has {size} bytes")
  return ShardHeader(version, vocab, count)


def payload_crc32(path: Path) -> int:
  """CRC-32 of a shard's token bytes (everything after the header)."""
  crc = 0
  with open(path, "rb") as f:
    f.seek(HEADER_SIZE)
    while block := f.read(1 << 23):
      crc = zlib.crc32(block, crc)
  return crc


def open_shard(path: Path) -> tuple[ShardHeader, np.ndarray]:
  """(header, read-only memory map of the ids). An empty shard maps to an empty array."""
  header = read_header(path)
  if header.count == 0:
    return header, np.zeros((0,), TOKEN_DTYPE)
  tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_SIZE,
                     shape=(header.count,))
  return header, tokens
