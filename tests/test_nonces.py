"""Bulk-drawn nonces: never handed out twice, across threads and across fork."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

from kmsguard import envelope, nonces


@pytest.fixture
def small_draws(monkeypatch: pytest.MonkeyPatch, racy: None) -> None:
    """Refill every few nonces and switch threads often, so refills race."""
    monkeypatch.setattr(nonces, "NONCES_PER_DRAW", 5)


def test_nonces_are_12_random_bytes_and_distinct() -> None:
    drawn = [nonces.nonce() for _ in range(3 * nonces.NONCES_PER_DRAW)]  # spans refills
    assert all(type(n) is bytes and len(n) == nonces.NONCE_SIZE for n in drawn)
    assert len(set(drawn)) == len(drawn)


def test_threads_never_share_a_nonce(small_draws: None) -> None:
    per_thread = 4000
    results: list[list[bytes]] = [[] for _ in range(8)]
    start = threading.Barrier(len(results))

    def collect(out: list[bytes]) -> None:
        start.wait()
        for _ in range(per_thread):
            out.append(nonces.nonce())

    threads = [threading.Thread(target=collect, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [n for out in results for n in out]
    assert len(everything) == 8 * per_thread
    assert all(len(n) == nonces.NONCE_SIZE for n in everything)
    assert len(set(everything)) == len(everything)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_repeat_the_parents_next_nonces(fresh_python: Callable[[str], str]) -> None:
    out = fresh_python("""
        import os
        from kmsguard import nonces

        nonces.nonce()  # the parent now holds a buffer with unused nonces in it
        read_end, write_end = os.pipe()
        pid = os.fork()  # before any thread starts
        if pid == 0:  # child: report its next nonces
            try:
                os.close(read_end)
                os.write(write_end, b"".join(nonces.nonce() for _ in range(50)))
            finally:
                os._exit(0)
        os.close(write_end)
        parents = b"".join(nonces.nonce() for _ in range(50))
        with os.fdopen(read_end, "rb") as pipe:
            childs = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        print(parents.hex(), childs.hex())
    """)
    parents, childs = (bytes.fromhex(half) for half in out.split())
    size = nonces.NONCE_SIZE
    assert len(parents) == len(childs) == 50 * size
    assert not {parents[i : i + size] for i in range(0, len(parents), size)} & {
        childs[i : i + size] for i in range(0, len(childs), size)
    }


def test_sealed_envelopes_carry_pool_nonces_that_differ(small_draws: None) -> None:
    from kmsguard.datakey import DataKey, WrappedKey

    dk = DataKey(os.urandom(32), (WrappedKey("local", "local:general:v1", b"w"),))
    sealer = envelope.Sealer(dk, "general", {})
    seen = {envelope.parse(sealer.seal(b"x")).nonce for _ in range(100)}
    assert len(seen) == 100
