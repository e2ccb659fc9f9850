"""``python -m bench [topic ...]``: run every registered benchmark topic, or the named ones.

Each topic is a module ``bench/<topic>.py`` with a ``main()`` that prints its own table.
Topics are imported only when they run, so one topic's dependencies never slow another.
To add one, write the module and add a line to ``TOPICS``.
"""

from __future__ import annotations

import importlib
import sys

#: topic name -> module path (imported lazily)
TOPICS: dict[str, str] = {
    "envelope": "bench.envelope",
    "hotpath": "bench.hotpath",
    "kms_calls": "bench.kms_calls",
    "audit": "bench.audit",
    "observer": "bench.observer",
    "audit_instructions": "bench.audit_instructions",
    "aws_client": "bench.aws_client",
    "failover": "bench.failover",
    "throttling": "bench.throttling",
    "cardinality": "bench.cardinality",
    "server": "bench.server",
    "fields": "bench.fields",
    "rewrap": "bench.rewrap",
    "otel": "bench.otel",
    "stream": "bench.stream",
    "cloudwatch": "bench.cloudwatch",
}


def main(argv: list[str]) -> int:
    names = argv or list(TOPICS)
    unknown = [n for n in names if n not in TOPICS]
    if unknown:
        print(f"unknown topic(s): {', '.join(unknown)}; known: {', '.join(TOPICS)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== {name}")
        importlib.import_module(TOPICS[name]).main()
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
