"""Ctrl-C (SIGINT) and SIGTERM, handled alike by the commands that write files.

`Interrupted` is the KeyboardInterrupt they raise: its message says what happened and what
is left on disk; `slj` prints it in one line and exits with `exit_status`, 128 + the
signal's number (130 for SIGINT, 143 for SIGTERM). `terminate_raises()` makes SIGTERM
raise it as Ctrl-C raises KeyboardInterrupt, so the same `except` and `finally` blocks clean
up after both (`slj` holds it around every command).

`deferred()` is for work in flight that an exception must not cut, such as an asynchronous
checkpoint save: a signal only records itself (`.signum`) and the loop stops at its next
safe point. Should the process still be running `grace_s` seconds later (a step, a compile
or a save that does not end), or on a second signal, `on_timeout(signum)` runs on a
watchdog thread: it says what is abandoned and ends the process (`exit_now`), so that the
kernel releases the process's locks only as its writing threads die with it.

Signal handlers exist only in the main thread: elsewhere both are no-ops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator


class Interrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM, with a message saying what happened and what is left."""

  def __init__(self, message: str = "interrupted", signum: int = signal.SIGINT):
    super().__init__(message)
    self.signum = int(signum)

  @property
  def exit_status(self) -> int:
    return 128 + self.signum


def signal_of(error: BaseException) -> int:
  """The signal behind a KeyboardInterrupt (SIGINT unless it is an `Interrupted`)."""
  return getattr(error, "signum", signal.SIGINT)


def interrupted_by(signum: int) -> str:
  """'interrupted' (Ctrl-C) or 'interrupted by SIGTERM'."""
  return "interrupted" if signum == signal.SIGINT else \
      f"interrupted by {signal.Signals(signum).name}"


def _in_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
  """Within: SIGTERM raises `Interrupted` (signum SIGTERM) in the main thread."""
  if not _in_main_thread():
    yield
    return

  def raise_interrupted(signum, frame):
    raise Interrupted(interrupted_by(signum), signum)

  previous = signal.signal(signal.SIGTERM, raise_interrupted)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def exit_now(message: str, signum: int) -> None:
  """Print `message` on stderr and end the process at once with status 128 + signum (no
  cleanup: threads still writing die with it)."""
  print(message, file=sys.stderr, flush=True)
  os._exit(128 + signum)


class Deferred:
  """What `deferred()` yields: `signum` is None until SIGINT or SIGTERM arrives."""

  def __init__(self, grace_s: float, on_timeout: Callable[[int], None]):
    self.signum: int | None = None
    self._grace_s, self._on_timeout = grace_s, on_timeout
    self._timer: threading.Timer | None = None

  def _handle(self, signum, frame) -> None:
    if self.signum is not None:  # a second signal: no more waiting
      self._on_timeout(self.signum)
      return
    self.signum = signum
    self._timer = threading.Timer(self._grace_s, self._on_timeout, (signum,))
    self._timer.daemon = True
    self._timer.start()

  def _cancel(self) -> None:
    if self._timer is not None:
      self._timer.cancel()


@contextlib.contextmanager
def deferred(grace_s: float, on_timeout: Callable[[int], None]) -> Iterator[Deferred]:
  """Within: SIGINT and SIGTERM set `.signum` of the yielded `Deferred` instead of raising;
  `on_timeout(signum)` runs `grace_s` seconds after the first, or at a second, unless the
  block has ended."""
  state = Deferred(grace_s, on_timeout)
  if not _in_main_thread():
    yield state
    return
  previous = {s: signal.signal(s, state._handle) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield state
  finally:
    state._cancel()
    for s, handler in previous.items():
      signal.signal(s, handler)
