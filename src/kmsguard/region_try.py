"""One try of a keyring operation in one region: what the multi-region keyring and the client factory share.

The multi-region keyring runs each region's try on a worker thread under a budget of
its own (published as :data:`kmsguard.operation.deadline` inside the try), and may
hedge it with a try in another region or give up on it when another region answered
first. The AWS client factory, retrying inside the try, hears two things from the
keyring and tells it two, through :class:`RegionTry`:

* ``abandoned`` (keyring -> factory): another region answered first; start no further
  HTTP attempt (the one in flight, if any, runs to its end and its answer is ignored);
* ``last`` (keyring -> factory): no other region is left to try, so a timed-out HTTP
  attempt is retried until the deadline instead of handed back at once;
* ``throttled`` (factory -> keyring): KMS asked this try to slow down at least once:
  the region is alive, only busy, which is no reason to hedge into a region that is
  busy too;
* ``answered`` (factory -> keyring): some HTTP attempt of this try got an answer (an
  error response, a refused or reset connection: anything but a timeout), so the
  region is not silent, even if the try ends abandoned or out of budget.

Outside a multi-region keyring there is no current RegionTry and the factory decides alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextvars import ContextVar


class Abandoned(Exception):
    """Raised inside an abandoned try instead of starting another HTTP attempt; never leaves the keyring."""


class RegionTry:
    """The flags of one try, set from one thread and read from another (events: no reliance on the GIL)."""

    __slots__ = ("_abandoned", "_answered", "_on_throttle", "_throttled", "last")

    def __init__(self, *, last: bool, on_throttle: Callable[[], None] | None = None) -> None:
        self.last = last
        self._on_throttle = on_throttle
        self._abandoned = threading.Event()
        self._throttled = threading.Event()
        self._answered = threading.Event()

    @property
    def abandoned(self) -> bool:
        return self._abandoned.is_set()

    def abandon(self) -> None:
        self._abandoned.set()

    @property
    def throttled(self) -> bool:
        return self._throttled.is_set()

    @property
    def answered(self) -> bool:
        return self._answered.is_set()

    def note_answer(self) -> None:
        """An HTTP attempt of this try failed with an answer, not a timeout."""
        self._answered.set()

    def note_throttle(self) -> None:
        """KMS answered this try with a throttling error (the factory will back off and may retry)."""
        self._answered.set()
        self._throttled.set()
        if self._on_throttle is not None:
            self._on_throttle()

    def check(self) -> None:
        """Raise :class:`Abandoned` when the keyring no longer wants this try's answer."""
        if self._abandoned.is_set():
            raise Abandoned()


#: The try the current code runs in (set by the multi-region keyring on its worker threads).
current: ContextVar[RegionTry | None] = ContextVar("kmsguard_region_try", default=None)
