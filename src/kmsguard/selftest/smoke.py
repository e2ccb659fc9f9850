"""``kmsguard smoke``: a running service checked from outside, over HTTP only.

It needs a URL and an API key, nothing else (no configuration, no keys), so it runs
as a CI step or a Kubernetes post-deploy Job. Checks: ``healthz``, ``readyz``, ``auth``
(a made-up token is answered 401), ``deny`` (with ``--deny-token``: every encrypt that
token tries is answered 403), ``roundtrip`` per classification (encrypt, decrypt, the
wrong context refused with CONTEXT_MISMATCH), ``metrics`` (``/metrics`` scraped) and
``latency`` (every call against ``max_latency_ms``). The report is the self-test's
(:mod:`kmsguard.selftest.report`): same statuses, JSON and exit codes.

Tokens are sent, never shown: a detail holds HTTP statuses and kmsguard error codes.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from kmsguard.policy import SELFTEST_CONTEXT_KEY
from kmsguard.selftest.report import Report, Result, Status, percentile

SMOKE_CONTEXT = {SELFTEST_CONTEXT_KEY: "1"}
DEFAULT_CLASSES = ("general", "pii", "payment")
#: Used when no --context is given: what payment (the default policy) requires.
DEFAULT_CONTEXT = {"purpose": "smoke"}


@dataclass
class _Smoke:
    client: httpx.Client
    token: str
    report: Report
    max_latency_ms: float
    strict: bool
    calls: list[tuple[str, float]] = field(default_factory=list)

    def call(self, what: str, method: str, path: str, token: str | None, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        started = time.perf_counter()
        try:
            return self.client.request(method, path, headers=headers, json=body)
        finally:
            self.calls.append((what, (time.perf_counter() - started) * 1000))

    def add(self, check: str, title: str, status: Status, detail: str, critical: bool, subject: str | None = None,
            started: float | None = None) -> None:
        ms = (time.perf_counter() - started) * 1000 if started is not None else 0.0
        self.report.add(Result(check, title, critical, status, detail, subject, ms))


def run_smoke(
    url: str,
    token: str,
    *,
    deny_token: str | None = None,
    classes: Sequence[str] = DEFAULT_CLASSES,
    context: Mapping[str, str] | None = None,
    max_latency_ms: float = 1000.0,
    timeout: float = 10.0,
    strict: bool = False,
    transport: httpx.BaseTransport | None = None,
) -> Report:
    """Smoke-test the service at ``url`` with the API key ``token`` (encrypt and decrypt scopes)."""
    report = Report("smoke", strict=strict)
    report.facts.update(url=url, classifications=list(classes))
    ctx = {**(DEFAULT_CONTEXT if context is None else context), **SMOKE_CONTEXT}
    started = time.time()
    with httpx.Client(base_url=url, timeout=timeout, transport=transport, trust_env=False) as client:
        smoke = _Smoke(client, token, report, max_latency_ms, strict)
        if _health(smoke):
            _ready(smoke)
            _auth(smoke)
            _deny(smoke, deny_token, classes)
            for name in classes:
                _roundtrip(smoke, name, ctx)
            _metrics(smoke)
            _latency(smoke)
        else:
            for check in ("readyz", "auth", "deny", "roundtrip", "metrics", "latency"):
                report.add(Result(check, check, False, "skip", "the service does not answer /healthz"))
    report.duration_ms = (time.time() - started) * 1000
    return report


def sample() -> str:
    """The text a smoke test encrypts: fresh random text (a module function, so a test can plant a marker)."""
    return "kmsguard smoke " + secrets.token_hex(16)


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "-"


def _answer(response: httpx.Response) -> str:
    code = _error_code(response)
    return f"HTTP {response.status_code}" + (f" {code}" if code != "-" else "")


def _health(s: _Smoke) -> bool:
    title = "GET /healthz answers 200"
    t0 = time.perf_counter()
    try:
        response = s.call("healthz", "GET", "/healthz", None)
    except httpx.HTTPError as exc:
        s.add("healthz", title, "fail", f"the service does not answer ({type(exc).__name__})", True, started=t0)
        return False
    ok = response.status_code == 200
    s.add("healthz", title, "pass" if ok else "fail", _answer(response), True, started=t0)
    return True


def _ready(s: _Smoke) -> None:
    title = "GET /readyz answers 200 (config, keys, audit spool)"
    t0 = time.perf_counter()
    try:
        response = s.call("readyz", "GET", "/readyz", None)
        checks = response.json().get("checks", {}) if response.status_code in (200, 503) else {}
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        s.add("readyz", title, "fail", f"no readiness answer ({type(exc).__name__})", True, started=t0)
        return
    if response.status_code == 200:
        s.add("readyz", title, "pass", f"ready: {', '.join(sorted(checks))}", True, started=t0)
        return
    failing = [f"{name}: {str(value).split(':', 1)[0]}" for name, value in sorted(checks.items()) if value != "ok"]
    s.add("readyz", title, "fail", f"{_answer(response)}; " + ("; ".join(failing) or "not ready"), True, started=t0)


def _auth(s: _Smoke) -> None:
    title = "a request without a valid API key is answered 401"
    t0 = time.perf_counter()
    body = {"classification": "general", "plaintext": "x", "context": SMOKE_CONTEXT}
    try:
        made_up = s.call("auth", "POST", "/v1/encrypt", "kg_smoke_" + secrets.token_urlsafe(24), body)
        missing = s.call("auth", "POST", "/v1/encrypt", None, body)
    except httpx.HTTPError as exc:
        s.add("auth", title, "fail", f"no answer ({type(exc).__name__})", True, started=t0)
        return
    if made_up.status_code == 401 and missing.status_code == 401:
        s.add("auth", title, "pass", "a made-up token and no token: both HTTP 401", True, started=t0)
    else:
        s.add("auth", title, "fail", f"a made-up token: {_answer(made_up)}; no token: {_answer(missing)}", True,
              started=t0)


def _deny(s: _Smoke, deny_token: str | None, classes: Sequence[str]) -> None:
    title = "an out-of-scope API key is answered 403"
    if deny_token is None:
        s.add("deny", title, "skip", "no --deny-token given", False)
        return
    t0 = time.perf_counter()
    answers = []
    for name in classes:
        try:
            r = s.call("deny", "POST", "/v1/encrypt", deny_token,
                       {"classification": name, "plaintext": "x", "context": {**DEFAULT_CONTEXT, **SMOKE_CONTEXT}})
        except httpx.HTTPError as exc:
            answers.append((name, f"no answer ({type(exc).__name__})", False))
            continue
        answers.append((name, _answer(r), r.status_code == 403))
    wrong = [f"{name}: {answer}" for name, answer, ok in answers if not ok]
    if wrong:
        s.add("deny", title, "fail", "encrypt with the deny token: " + "; ".join(wrong), True, started=t0)
    else:
        s.add("deny", title, "pass", f"encrypt refused 403 for {', '.join(classes)}", True, started=t0)


def _roundtrip(s: _Smoke, name: str, ctx: Mapping[str, str]) -> None:
    title = "encrypt and decrypt over HTTP; the wrong context refused"
    t0 = time.perf_counter()
    plain = sample()
    try:
        sealed = s.call("encrypt", "POST", "/v1/encrypt", s.token,
                        {"classification": name, "plaintext": plain, "context": dict(ctx)})
        if sealed.status_code != 200:
            s.add("roundtrip", title, "fail", f"encrypt: {_answer(sealed)}", True, name, t0)
            return
        token = sealed.json()["token"]
        opened = s.call("decrypt", "POST", "/v1/decrypt", s.token, {"token": token, "context": dict(ctx)})
        if opened.status_code != 200:
            s.add("roundtrip", title, "fail", f"decrypt: {_answer(opened)}", True, name, t0)
            return
        if not hmac.compare_digest(str(opened.json().get("plaintext", "")).encode(), plain.encode()):
            s.add("roundtrip", title, "fail", "decrypt returned other data than was encrypted", True, name, t0)
            return
        wrong = s.call("decrypt", "POST", "/v1/decrypt", s.token,
                       {"token": token, "context": {**ctx, SELFTEST_CONTEXT_KEY: "0"}})
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        s.add("roundtrip", title, "fail", f"no usable answer ({type(exc).__name__})", True, name, t0)
        return
    if wrong.status_code != 400 or _error_code(wrong) != "CONTEXT_MISMATCH":
        s.add("roundtrip", title, "fail", f"the wrong context: expected HTTP 400 CONTEXT_MISMATCH, {_answer(wrong)}",
              True, name, t0)
        return
    s.add("roundtrip", title, "pass", "encrypt, decrypt ok; wrong context -> HTTP 400 CONTEXT_MISMATCH", True, name, t0)


def _metrics(s: _Smoke) -> None:
    title = "GET /metrics serves Prometheus metrics"
    t0 = time.perf_counter()
    try:
        response = s.call("metrics", "GET", "/metrics", s.token)
    except httpx.HTTPError as exc:
        s.add("metrics", title, "warn", f"no answer ({type(exc).__name__})", False, started=t0)
        return
    if response.status_code in (401, 403):
        s.add("metrics", title, "warn", f"{_answer(response)}: this token may not read /metrics (an admin key may)",
              False, started=t0)
    elif response.status_code != 200 or "kmsguard_" not in response.text:
        s.add("metrics", title, "fail", f"{_answer(response)}: no kmsguard metrics", False, started=t0)
    else:
        samples = sum(1 for line in response.text.splitlines() if line and not line.startswith("#"))
        s.add("metrics", title, "pass", f"{samples} samples", False, started=t0)


def _latency(s: _Smoke) -> None:
    title = "every call answered within the latency threshold"
    times = [ms for _, ms in s.calls]
    slow = sorted({what for what, ms in s.calls if ms > s.max_latency_ms})
    detail = (
        f"{len(times)} calls: p50 {percentile(times, 0.5):.1f} / p95 {percentile(times, 0.95):.1f} / "
        f"max {max(times):.1f} ms (threshold {s.max_latency_ms:g} ms)"
    )
    if slow:
        s.add("latency", title, "fail" if s.strict else "warn", f"slow: {', '.join(slow)}; {detail}", s.strict)
    else:
        s.add("latency", title, "pass", detail, s.strict)
