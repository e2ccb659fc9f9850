"""What audit and metrics add to an encrypt, counted in CPU instructions instead of time.

Time on this kind of machine moves by more than the effect being measured; an
instruction count (valgrind's callgrind) repeats whatever else the machine does. Each
configuration runs twice under callgrind, with fewer and with more encrypts after the
same warm-up (COUNTS), and the difference divided by theirs is the count per encrypt. Caches and
branch prediction are not in the count: it says how much work is done, not how long it
takes. Needs ``valgrind`` on the PATH (the row is left out, saying so, without it).

Run as ``python -m bench audit_instructions``; one configuration alone:
``python -m bench.audit_instructions <on|off> <none|nop|metrics|audit|both> <count>``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import table

#: Encrypts per run (fewer, more), by data-key cache: an uncached encrypt is ~10x the work.
COUNTS = {"on": (2_000, 12_000), "off": (200, 1_200)}
CONFIGS = ("none", "nop", "metrics", "audit", "both")
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def workload(cache: str, config: str, count: int) -> None:
    """``count`` 1 KiB encrypts after a warm-up, with the observers ``config`` names."""
    from bench.audit import Nop, quiet_home
    from kmsguard import Guard
    from kmsguard.audit import build_observer
    from kmsguard.keyrings.caching import CachingKeyring
    from kmsguard.metrics import Metrics
    from kmsguard.operation import Observer

    with tempfile.TemporaryDirectory() as tmp:
        policy, keyring, settings = quiet_home(Path(tmp), reuse=cache == "on")
        observers: list[Observer] = []
        if config in ("audit", "both"):
            observers.append(build_observer(settings, keyring))
        if config in ("metrics", "both"):
            observers.append(Metrics())
        if config == "nop":
            observers.append(Nop())
        guard = Guard(policy, CachingKeyring(keyring, policy), observers=observers)
        data, context = os.urandom(1024), {"tenant": "t-42"}
        for _ in range(300):
            guard.encrypt(data, "general", context)
        for _ in range(count):
            guard.encrypt(data, "general", context)
        os._exit(0)  # no close(): its delivery would be counted too


def instructions(cache: str, config: str, count: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/out",
                sys.executable,
                "-m",
                "bench.audit_instructions",
                cache,
                config,
                str(count),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dictionary layouts every run
        )
    match = _REFS.search(proc.stderr)
    if match is None:
        raise RuntimeError("valgrind printed no instruction count")
    return int(match[1].replace(",", ""))


def per_encrypt(cache: str, config: str) -> float:
    few, many = COUNTS[cache]
    return (instructions(cache, config, many) - instructions(cache, config, few)) / (many - few)


def main() -> None:
    if shutil.which("valgrind") is None:
        print("(valgrind is not installed: no instruction counts)")
        return
    print("instructions per 1 KiB encrypt (callgrind; nop: an observer that does nothing, the full path):")
    rows = []
    for cache in ("on", "off"):
        counts = {config: per_encrypt(cache, config) for config in CONFIGS}
        base = counts["none"]
        rows += [
            [cache, config, f"{n:,.0f}", f"{(n - base) / base * 100:.1f}%"] for config, n in counts.items()
        ]
    print(table(["data-key cache", "observers", "instructions", "added"], rows))


if __name__ == "__main__":
    if len(sys.argv) == 4:
        workload(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    else:
        main()
