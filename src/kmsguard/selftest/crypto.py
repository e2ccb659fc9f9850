"""Checks that use the keys: a round trip with its refusals, every region pair, and latency.

Every operation goes through a Guard built from the deployment's settings (policy,
keyrings, audit, metrics as configured) and carries :data:`~kmsguard.selftest.run.SELFTEST_CONTEXT`.
The data is random bytes made per run; it is compared in constant time and never
shown.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Mapping
from dataclasses import replace

from kmsguard.errors import KmsGuardError
from kmsguard.guard import Guard
from kmsguard.keyrings.base import Keyring
from kmsguard.policy import SELFTEST_CONTEXT_KEY, ClassPolicy
from kmsguard.selftest.report import Timer, percentile
from kmsguard.selftest.run import SELFTEST_CONTEXT, Run, describe

ROUNDTRIP = "roundtrip"
MULTI_REGION = "multi_region"
LATENCY = "latency"


def sample() -> bytes:
    """The data a self-test encrypts: fresh random bytes (a module function, so a test can plant a marker)."""
    return os.urandom(32)


def context_for(cls: ClassPolicy) -> dict[str, str]:
    """The self-test marker plus a value for each context key the classification requires."""
    return {**{key: "selftest" for key in sorted(cls.required_context)}, **SELFTEST_CONTEXT}


# ---------------------------------------------------------------------- roundtrip


def roundtrip(run: Run) -> None:
    """Per classification: encrypt then decrypt; a wrong context, a missing required key and a
    flipped bit each refused with their own code."""
    title = "encrypt, decrypt, and refuse a wrong context, a missing key, a flipped bit"
    for cls in run.classes:
        timer = Timer()
        try:
            guard = run.guard()
            ctx = context_for(cls)
            plain = sample()
            sealed = guard.encrypt(plain, cls.name, ctx)
            opened = guard.decrypt(sealed, ctx)
        except Exception as exc:
            run.add(ROUNDTRIP, title, "fail", describe(exc), critical=True, subject=cls.name, timer=timer)
            continue
        if not hmac.compare_digest(opened, plain):
            run.add(ROUNDTRIP, title, "fail", "decrypt returned other data than was encrypted", critical=True,
                    subject=cls.name, timer=timer)
            continue
        problems, shown = [], []
        flipped = bytearray(sealed)
        flipped[-1] ^= 0x01
        # (what, the code expected, the envelope, the context decrypt gets)
        probes: list[tuple[str, str, bytes, dict[str, str]]] = [
            ("wrong context", "CONTEXT_MISMATCH", sealed, {**ctx, SELFTEST_CONTEXT_KEY: "0"}),
            ("flipped bit", "INVALID_CIPHERTEXT", bytes(flipped), ctx),
        ]
        if cls.required_context:
            missing = sorted(cls.required_context)[0]
            without = {k: v for k, v in ctx.items() if k != missing}
            probes.insert(1, (f"no {missing}", "CONTEXT_REQUIRED", sealed, without))
        for what, code, data, context in probes:
            outcome = _refused(guard, data, context, code)
            shown.append(f"{what} -> {code}")
            if outcome is not None:
                problems.append(f"{what}: expected {code}, {outcome}")
        if problems:
            run.add(ROUNDTRIP, title, "fail", "; ".join(problems), critical=True, subject=cls.name, timer=timer)
            continue
        run.roundtrip_ok.add(cls.name)
        run.add(ROUNDTRIP, title, "pass", "round trip ok; " + ", ".join(shown), critical=True, subject=cls.name,
                timer=timer)


def _refused(guard: Guard, data: bytes, context: Mapping[str, str], code: str) -> str | None:
    """None when decrypting ``data`` with ``context`` is refused with ``code``; else what happened instead."""
    try:
        guard.decrypt(data, context)
    except KmsGuardError as exc:
        return None if exc.code == code else f"got {exc.code}"
    except Exception as exc:
        return f"got {describe(exc)}"
    return "it was accepted"


# ---------------------------------------------------------------------- multi_region


def multi_region(run: Run) -> None:
    """An envelope made in each region decrypts in every other configured region.

    Critical when the configuration promises it (``wrap_in_all_regions``, or a
    multi-region ``mrk-`` key); otherwise a failure only warns (single-region keys
    wrapped in one region cannot open elsewhere, by design).
    """
    title = "an envelope made in one region decrypts in every other"
    if not run.aws:
        run.add(MULTI_REGION, title, "skip", "local backend: no regions", critical=False)
        return
    try:
        from kmsguard.keyrings.multi_region import MultiRegionOptions

        regions = run.aws_settings().regions
        options = MultiRegionOptions.from_section(run.settings.section("aws"))
    except Exception as exc:
        run.add(MULTI_REGION, title, "fail", describe(exc), critical=True)
        return
    if len(regions) < 2:
        run.add(MULTI_REGION, title, "skip", f"one region configured ({regions[0]})", critical=False)
        return
    for cls in run.classes:
        keys = [cls.key, *options.region_keys.get(cls.name, {}).values()]
        critical = options.wrap_in_all_regions or any("mrk-" in key for key in keys)
        if cls.name not in run.roundtrip_ok:
            run.add(MULTI_REGION, title, "skip", "the round trip failed", critical=critical, subject=cls.name)
            continue
        timer = Timer()
        problems = _region_pairs(run, cls, regions)
        if problems:
            run.add(MULTI_REGION, title, "fail" if critical else "warn", "; ".join(problems), critical=critical,
                    subject=cls.name, timer=timer)
        else:
            run.add(MULTI_REGION, title, "pass", f"every pair of {', '.join(regions)} opens the other's envelopes",
                    critical=critical, subject=cls.name, timer=timer)


def _region_pairs(run: Run, cls: ClassPolicy, regions: tuple[str, ...]) -> list[str]:
    """Seal preferring region A, open with region B alone, for every A != B; the problems found."""
    ctx = context_for(cls)
    guard = run.guard()
    problems: list[str] = []
    keyrings: dict[tuple[str, ...], Keyring] = {}

    def in_regions(*order: str) -> Guard:
        keyring = keyrings.get(order)
        if keyring is None:
            keyring = keyrings[order] = _keyring_in(run, order)
        return Guard(guard.policy, keyring, observers=guard.observers, principal=guard.principal)

    try:
        for a in regions:
            try:
                sealed = in_regions(a, *(r for r in regions if r != a)).encrypt(sample(), cls.name, ctx)
            except Exception as exc:
                problems.append(f"sealing in {a}: {describe(exc)}")
                continue
            if not any(f":{a}:" in key["key_ref"] for key in guard.inspect(sealed).keys):
                problems.append(f"sealing in {a}: another region served it (failover)")
                continue
            for b in regions:
                if b == a:
                    continue
                try:
                    in_regions(b).decrypt(sealed, ctx)
                except Exception as exc:
                    problems.append(f"made in {a}, opened in {b}: {describe(exc)}")
    finally:
        for keyring in keyrings.values():
            closer = getattr(keyring, "close", None)
            if callable(closer):
                closer()
    return problems


def _keyring_in(run: Run, regions: tuple[str, ...]) -> Keyring:
    """The deployment's AWS keyring restricted to ``regions`` (and their per-region keys), in that
    order, without hedging: the first region seals unless it fails."""
    from kmsguard.stack import build_aws_keyring

    settings = run.settings
    section = dict(settings.section("aws"))
    section["regions"] = list(regions)
    section["hedge"] = False  # each try stays in its region unless that region fails
    keys = section.get("keys")
    if isinstance(keys, dict):  # validated by the config check: a table of tables
        section["keys"] = {name: {r: k for r, k in table.items() if r in regions} for name, table in keys.items()}
    env = {k: v for k, v in settings.env.items() if k != "KMSGUARD_REGIONS"}
    return build_aws_keyring(replace(settings, sections={**settings.sections, "aws": section}, env=env))


# ---------------------------------------------------------------------- latency


def latency(run: Run, iterations: int) -> None:
    """Per classification: ``iterations`` cold operations (the cache bypassed) and as many warm
    ones (cache hits), encrypt and decrypt each; p50/p95/p99 against ``[selftest]``'s thresholds.

    Over a threshold warns; with ``--strict`` it fails, critically.
    """
    title = "p99 latency, cold (key-service call) and warm (cache hit), within thresholds"
    opts = run.options
    for cls in run.classes:
        if cls.name not in run.roundtrip_ok:
            run.add(LATENCY, title, "skip", "the round trip failed", critical=run.strict, subject=cls.name)
            continue
        timer = Timer()
        ctx = context_for(cls)
        try:
            cold = _samples(run.cold_guard(), cls, ctx, iterations)
            warm_guard = run.guard()
            _samples(warm_guard, cls, ctx, 1)  # fill the cache
            warm = _samples(warm_guard, cls, ctx, iterations)
        except Exception as exc:
            run.add(LATENCY, title, "fail", f"the measurement failed: {describe(exc)}", critical=True,
                    subject=cls.name, timer=timer)
            continue
        cached = cls.cache.reuse or cls.cache.decrypt_ttl > 0
        over = []
        if percentile(cold, 0.99) > opts.cold_p99_ms:
            over.append(f"cold p99 above {opts.cold_p99_ms:g} ms")
        if cached and percentile(warm, 0.99) > opts.warm_p99_ms:
            over.append(f"warm p99 above {opts.warm_p99_ms:g} ms")
        detail = (
            f"cold {_quantiles(cold)} (p99 <= {opts.cold_p99_ms:g}); "
            + (f"warm {_quantiles(warm)} (p99 <= {opts.warm_p99_ms:g})" if cached else "warm: the cache is off")
            + f"; {iterations} x encrypt+decrypt each"
        )
        if over:
            run.add(LATENCY, title, "fail" if run.strict else "warn", f"{', '.join(over)}: {detail}",
                    critical=run.strict, subject=cls.name, timer=timer)
        else:
            run.add(LATENCY, title, "pass", detail, critical=run.strict, subject=cls.name, timer=timer)


def _samples(guard: Guard, cls: ClassPolicy, ctx: Mapping[str, str], iterations: int) -> list[float]:
    """Milliseconds of each encrypt and each decrypt, ``iterations`` of each."""
    out = []
    for _ in range(iterations):
        plain = sample()
        t0 = time.perf_counter()
        sealed = guard.encrypt(plain, cls.name, ctx)
        t1 = time.perf_counter()
        guard.decrypt(sealed, ctx)
        t2 = time.perf_counter()
        out += [(t1 - t0) * 1000, (t2 - t1) * 1000]
    return out


def _quantiles(samples: list[float]) -> str:
    p50, p95, p99 = (percentile(samples, q) for q in (0.5, 0.95, 0.99))
    return f"p50 {p50:.2f} / p95 {p95:.2f} / p99 {p99:.2f} ms"
