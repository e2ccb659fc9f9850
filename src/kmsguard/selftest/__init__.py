"""Production validation: ``kmsguard selftest`` (this deployment) and ``kmsguard smoke`` (a running service).

- :mod:`~kmsguard.selftest.report`: results, the verdict and exit code, the JSON document (``schema.json``);
- :mod:`~kmsguard.selftest.render`: the table for people;
- :mod:`~kmsguard.selftest.runner`: the self-test's checks in order (:mod:`.infra`, :mod:`.crypto`, :mod:`.ops`),
  with thresholds from ``[selftest]`` (:mod:`.settings`);
- :mod:`~kmsguard.selftest.smoke`: the smoke test, over HTTP only (no configuration or keys needed).

See docs/selftest.md.
"""

from __future__ import annotations

from kmsguard.selftest.report import Report, Result, schema

__all__ = ["Report", "Result", "schema"]
