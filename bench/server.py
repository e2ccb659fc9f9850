"""``python -m bench server``: the HTTP service under wrk, against its own echo endpoint.

`kmsguard serve` (local keyring, default audit trail, data-key cache on) runs with 1
and then 2 workers; wrk (compiled, so the client is not the bottleneck) drives each
endpoint for a few seconds with a 1 KiB value:

* ``/v1/echo``: parses, authenticates and rate-limits as ``/v1/encrypt`` does, no crypto
  (the baseline: what FastAPI, uvicorn and the API key cost);
* ``/v1/encrypt`` and ``/v1/decrypt`` of 1 KiB;
* ``/v1/encrypt/batch`` and ``/v1/decrypt/batch`` of 100 items of 1 KiB.

The endpoints take turns, ROUNDS times over, and each figure is the median of its rounds.
Targets (issue 13): ``/v1/encrypt`` >= 0.7x the echo requests/s; batch items/s >= 20x
the single requests/s of the same operation. The ratios are taken within one server run.
Beside them, the service's CPU time per request or item (Linux): on a machine shared
with other jobs it moves much less than requests/s do.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx

from bench.common import table
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.server.apikeys import FileKeyStore, create_key
from kmsguard.testing.service import ServiceProcess

SECONDS = int(os.environ.get("BENCH_SERVER_SECONDS", "3"))
#: The endpoints are measured in turn, this many times over; each figure is the median of its
#: rounds, so a change in the machine's load during the run moves baseline and subject alike.
ROUNDS = int(os.environ.get("BENCH_SERVER_ROUNDS", "3"))
CONNECTIONS = 32
BATCH = 100
VALUE = base64.b64encode(os.urandom(768)).decode()  # 1 KiB of text

_LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
"""


def _wrk(url: str, body: dict[str, object], token: str, workdir: Path, pid: int) -> tuple[float, str, str, float]:
    """Requests/s, p50 and p99 latency of POSTing ``body`` to ``url`` for SECONDS, and the
    CPU seconds per request of process ``pid`` and its children meanwhile."""
    script = workdir / "post.lua"
    script.write_text(_LUA.format(body=json.dumps(json.dumps(body)), token=token))
    cpu = _cpu_seconds(pid)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    cpu = _cpu_seconds(pid) - cpu
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        raise RuntimeError(f"{url}: {non_2xx.group(1)} answers were not 2xx")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    # Anchored at a line's start: the latency's "+/- Stdev" column (e.g. 89.99%) also ends in 99%.
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    return rps, p50, p99, cpu / max(requests, 1)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` and its children (the workers) so far, from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ticks = 0
    for each in (pid, *map(int, children)):
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def _home(root: Path) -> tuple[dict[str, str], str]:
    home = root / "home"
    home.mkdir(parents=True)
    (home / "kmsguard.toml").write_text("[server]\nrate_limit = 0\n")
    LocalKeyring.create(home / KEY_FILE_NAME, ["general", "pii", "payment"])
    token = create_key(FileKeyStore(home / "apikeys.json"), "bench", ["admin:*"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSGUARD_", "AWS_"))}
    env["KMSGUARD_HOME"] = str(home)
    return env, token


def _run(workers: int, root: Path) -> list[list[str]]:
    env, token = _home(root / f"w{workers}")
    one = {"classification": "general", "context": {"tenant": "t1"}, "plaintext": VALUE}
    rows = []
    with ServiceProcess(env, workers=workers) as service:
        sealed = httpx.post(
            service.url + "/v1/encrypt", json=one, headers={"Authorization": f"Bearer {token}"}
        ).json()["token"]
        opened = {"token": sealed, "context": {"tenant": "t1"}}
        cases = [
            ("/v1/echo", one, 1),
            ("/v1/encrypt", one, 1),
            ("/v1/decrypt", opened, 1),
            ("/v1/encrypt/batch", {"items": [one] * BATCH}, BATCH),
            ("/v1/decrypt/batch", {"items": [opened] * BATCH}, BATCH),
        ]
        assert service.proc is not None
        pid = service.proc.pid
        rounds = [
            {path: _wrk(service.url + path, body, token, root, pid) for path, body, _ in cases} for _ in range(ROUNDS)
        ]
        results = {path: sorted((r[path] for r in rounds), key=lambda m: m[0])[ROUNDS // 2] for path, _, _ in cases}
        # CPU time per item: its own median (the round of median requests/s need not have it).
        cpu = {path: sorted(r[path][3] / items for r in rounds)[ROUNDS // 2] for path, _, items in cases}
    echo = results["/v1/echo"][0]
    for path, _, items in cases:
        rps, p50, p99, _ = results[path]
        if path == "/v1/echo":
            ratio = "baseline"
        elif items > 1:
            single = path.removesuffix("/batch")
            ratio = (f"{rps * items / results[single][0]:.1f}x single {single.removeprefix('/v1/')} (items/s), "
                     f"{cpu[single] / cpu[path]:.1f}x (CPU)")
        else:
            ratio = f"{rps / echo:.2f}x echo"
        per_item = f"{cpu[path] * 1e6:,.1f}"
        rows.append([str(workers), path, f"{rps:,.0f}", f"{rps * items:,.0f}", per_item, p50, p99, ratio])
    return rows


def main() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (make bench installs it: apt-get install wrk)")
    root = Path(tempfile.mkdtemp(prefix="kmsguard-bench-server-"))
    try:
        rows = _run(1, root) + _run(2, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrk: 1 thread, {CONNECTIONS} connections, median of {ROUNDS} rounds of {SECONDS} s per endpoint; "
          f"1 KiB values; cache on; {os.cpu_count()} CPUs")
    print(table(["workers", "endpoint", "requests/s", "items/s", "CPU µs/item", "p50", "p99", "ratio"], rows))
    print("targets: /v1/encrypt >= 0.7x echo; batch items/s >= 20x the single requests/s of the operation")
