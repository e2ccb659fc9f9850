"""Random 96-bit AES-GCM nonces, drawn from the OS CSPRNG in bulk.

Every envelope needs a fresh random nonce. ``os.urandom(12)`` per message would be a
system call per message, a large part of sealing a small one, so this module draws
:data:`NONCES_PER_DRAW` nonces with one ``os.urandom`` call and hands out consecutive
12-byte slices. The nonces are exactly as random as one ``os.urandom(12)`` each: every
one is 96 bits straight from the OS CSPRNG, and they are public values (stored in each envelope), so
keeping upcoming ones in memory exposes nothing.

What matters is that no slice is ever handed out twice:

* **threads**: the buffer and the offset of its next nonce are one :class:`_Pool`,
  whose offset is taken and advanced in one step under the pool's lock
  (kmsguard.fastpath.Mutexed: a spin lock compiled, a threading.Lock as plain Python),
  so each slice goes to exactly one caller; a caller that runs past the end draws a new
  buffer (outside any lock) and installs it unless another thread already did;
* **fork**: a child process starts with a copy of the parent's buffer, so it would
  repeat the nonces the parent hands out next. ``os.register_at_fork`` discards the
  child's copy (and its locks, which another thread may have held at fork time), so the
  child's first nonce comes from a fresh draw. This covers ``os.fork`` and
  ``multiprocessing``'s fork start method; C code that calls ``fork()`` and then runs
  Python in the child without ``PyOS_AfterFork_Child`` is outside what it can see.
"""

from __future__ import annotations

import os
import threading

from kmsguard.fastpath import Mutexed, _plain_free, _plain_hold, _plain_new_mutex

#: True when this module runs compiled (nonces.pxd).
COMPILED = not __file__.endswith(".py")
#: Size of an AES-GCM nonce in kmsguard's envelope (96 bits).
NONCE_SIZE = 12
#: Nonces per ``os.urandom`` call (12 KiB); enough to make the system call negligible.
NONCES_PER_DRAW = 1024

# Compiled, C functions from kmsguard/fastpath.pxd; interpreted, these stand-ins.
globals().update(_hold=_plain_hold, _free=_plain_free, _new_mutex=_plain_new_mutex)


class _Pool(Mutexed):
    """One draw of nonces and the offset of the next one to hand out."""

    def __init__(self, data: bytes) -> None:
        _new_mutex(self)  # type: ignore[name-defined]  # noqa: F821
        self.data = data
        self.offset = 0

    def take(self) -> int:
        """The offset of a nonce no other caller gets; past the end when the pool is spent."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        start = self.offset
        self.offset = start + NONCE_SIZE
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        return start


_pool = _Pool(b"")  # empty: the first call draws
_lock = threading.Lock()


def nonce() -> bytes:
    """A fresh, uniformly random 12-byte nonce that no other caller of this process gets."""
    while True:
        pool = _pool
        start = pool.take()
        if start + NONCE_SIZE <= len(pool.data):
            return pool.data[start : start + NONCE_SIZE]
        _refill(pool)


def _refill(spent: _Pool) -> None:
    """Replace ``spent`` with a new draw, unless another thread already did."""
    global _pool
    fresh = _Pool(os.urandom(NONCE_SIZE * NONCES_PER_DRAW))
    with _lock:
        if _pool is spent:
            _pool = fresh


def _discard_after_fork() -> None:
    """In a forked child: forget the parent's buffer so no nonce is used by both."""
    global _pool, _lock
    _pool = _Pool(b"")
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_discard_after_fork)
