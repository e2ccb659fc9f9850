"""Random 96-bit AES-GCM nonces, drawn from the OS CSPRNG in bulk.

Every envelope needs a fresh random nonce. ``os.urandom(12)`` per message would be a
system call per message, a large part of sealing a small one, so this module draws
:data:`NONCES_PER_DRAW` nonces with one ``os.urandom`` call and hands out consecutive
12-byte slices. The nonces are exactly as random as one ``os.urandom(12)`` each: every
one is 96 bits straight from the OS CSPRNG, and they are public values (stored in each envelope), so
keeping upcoming ones in memory exposes nothing.

What matters is that no slice is ever handed out twice:

* **threads**: the buffer and its slice counter are one tuple, read in one step and
  replaced whole under a lock when the buffer runs out; ``next()`` on an
  ``itertools.count`` is atomic under the GIL, so each index of a buffer goes to exactly
  one caller, and a caller that runs past the end draws (or waits for) a new buffer;
* **fork**: a child process starts with a copy of the parent's buffer, so it would
  repeat the nonces the parent hands out next. ``os.register_at_fork`` discards the
  child's copy (and its lock, which another thread may have held at fork time), so the
  child's first nonce comes from a fresh draw. This covers ``os.fork`` and
  ``multiprocessing``'s fork start method; C code that calls ``fork()`` and then runs
  Python in the child without ``PyOS_AfterFork_Child`` is outside what it can see.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator

#: Size of an AES-GCM nonce in kmsguard's envelope (96 bits).
NONCE_SIZE = 12
#: Nonces per ``os.urandom`` call (12 KiB); enough to make the system call negligible.
NONCES_PER_DRAW = 1024

_Pool = tuple[bytes, Iterator[int]]

_pool: _Pool = (b"", itertools.count())  # empty: the first call draws
_lock = threading.Lock()


def nonce() -> bytes:
    """A fresh, uniformly random 12-byte nonce that no other caller of this process gets."""
    while True:
        pool = _pool
        start = next(pool[1]) * NONCE_SIZE
        value = pool[0][start : start + NONCE_SIZE]
        if len(value) == NONCE_SIZE:
            return value
        _refill(pool)


def _refill(spent: _Pool) -> None:
    """Replace ``spent`` with a new draw, unless another thread already did."""
    global _pool
    with _lock:
        if _pool is spent:
            _pool = (os.urandom(NONCE_SIZE * NONCES_PER_DRAW), itertools.count())


def _discard_after_fork() -> None:
    """In a forked child: forget the parent's buffer so no nonce is used by both."""
    global _pool, _lock
    _pool = (b"", itertools.count())
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_discard_after_fork)
