"""One writer per directory: an exclusive `flock` on `<dir>/.lock` that records its holder.

`slj train`, `slj compare` and `slj tokenize` write into a directory that a second process
must not write into at the same time (two trainers interleave metrics and checkpoints). The
lock is POSIX `flock`: the kernel releases it when its process exits in any way, kill -9
included, so a crashed run never blocks its restart; the PID written into the file only
names the holder in the refusal. Not taken where `fcntl` does not exist (not POSIX).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"


class DirectoryInUse(RuntimeError):
  """Another process holds the directory's lock."""


def _holder(lock_path: Path) -> str:
  try:
    pid = lock_path.read_text().strip()
  except OSError:
    pid = ""
  return f"process {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, *, wait: bool = False,
                   what: str = "run") -> Iterator[None]:
  """Hold the exclusive lock of `directory` (created if missing) for the `with` block.

  wait=False (the commands): raise DirectoryInUse at once, naming the holder's PID, when
  another process holds it. wait=True blocks until it is free (callers that share a cache
  directory and find the finished result after waiting).
  """
  try:
    import fcntl
  except ImportError:  # not POSIX: atomic renames still protect each file
    yield
    return
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  lock_path = directory / LOCK_FILE
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      raise DirectoryInUse(
          f"{directory} is in use by {_holder(lock_path)} (another {what} writes there); "
          "wait for it to finish or choose another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
