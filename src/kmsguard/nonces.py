"""Random 96-bit AES-GCM nonces, drawn from the OS CSPRNG in bulk.

Every envelope needs a fresh random nonce. ``os.urandom(12)`` per message would be a
system call per message, a large part of sealing a small one, so this module draws
:data:`NONCES_PER_DRAW` nonces with one ``os.urandom`` call and hands out consecutive
12-byte slices. The nonces are exactly as random as one ``os.urandom(12)`` each: every
one is 96 bits straight from the OS CSPRNG, and they are public values (stored in each envelope), so
keeping upcoming ones in memory exposes nothing.

What matters is that no slice is ever handed out twice:

* **threads**: the buffer and the offset of its next nonce are one :class:`_Pool`'s,
  read and advanced in one step under its lock (kmsguard.fastpath.Mutexed: a spin lock
  compiled, a threading.Lock as plain Python), so each slice goes to exactly one
  caller; a caller that runs past the end is given the spent buffer (read in that same
  step), draws a new one (outside the lock) and installs it, under the lock, unless
  another thread already replaced the spent one;
* **fork**: a child process starts with a copy of the parent's buffer, so it would
  repeat the nonces the parent hands out next. ``os.register_at_fork`` discards the
  child's copy (and its locks, which another thread may have held at fork time), so the
  child's first nonce comes from a fresh draw. This covers ``os.fork`` and
  ``multiprocessing``'s fork start method; C code that calls ``fork()`` and then runs
  Python in the child without ``PyOS_AfterFork_Child`` is outside what it can see.
"""

from __future__ import annotations

import os

from kmsguard.fastpath import Mutexed, _plain_free, _plain_hold, _plain_new_mutex

#: True when this module runs compiled (nonces.pxd).
COMPILED = not __file__.endswith(".py")
#: Size of an AES-GCM nonce in kmsguard's envelope (96 bits).
NONCE_SIZE = 12
#: Nonces per ``os.urandom`` call (12 KiB); enough to make the system call negligible.
NONCES_PER_DRAW = 1024
_SIZE = NONCE_SIZE  # a C constant when compiled (NONCE_SIZE is the module's public, Python, one)

# Compiled, C functions from kmsguard/fastpath.pxd; interpreted, these stand-ins.
globals().update(_hold=_plain_hold, _free=_plain_free, _new_mutex=_plain_new_mutex)


class _Pool(Mutexed):
    """The current draw of nonces and the offset of the next one to hand out, replaced together."""

    def __init__(self) -> None:
        _new_mutex(self)  # type: ignore[name-defined]  # noqa: F821
        self.data = b""  # empty: the first call draws
        self.offset = 0

    def next(self) -> bytes:
        """A nonce no other caller gets; when this draw is spent, that spent draw (never 12 bytes long)."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        data = self.data
        start = self.offset
        self.offset = start + _SIZE
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        if start + _SIZE <= len(data):
            return data[start : start + _SIZE]
        return data

    def refill(self, spent: bytes, fresh: bytes) -> None:
        """Install ``fresh`` (drawn outside the lock) unless another thread already replaced ``spent``."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        if self.data is spent:
            self.data = fresh
            self.offset = 0
        _free(self)  # type: ignore[name-defined]  # noqa: F821


_pool = _Pool()


def nonce() -> bytes:
    """A fresh, uniformly random 12-byte nonce that no other caller of this process gets."""
    while True:
        pool = _pool
        value = pool.next()
        if len(value) == _SIZE:
            return value
        pool.refill(value, os.urandom(NONCE_SIZE * NONCES_PER_DRAW))


def _discard_after_fork() -> None:
    """In a forked child: forget the parent's buffer (and its lock) so no nonce is used by both."""
    global _pool
    _pool = _Pool()


os.register_at_fork(after_in_child=_discard_after_fork)
