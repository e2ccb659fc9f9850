"""Streams (envelope suite 2): MB/s of a 1 GiB file against a raw AES-GCM loop, the AWS
Encryption SDK and Tink, then the CLI's peak memory on a 4 GiB file.

Every implementation reads the same file (in the page cache after the first pass) and
writes its output to a sink that discards it, so the figures are the cost of the
encryption library, not of the disk; decrypt reads each one's own ciphertext from disk.

* raw: ``cryptography``'s AESGCM sealing the file's segments in a loop (read a segment,
  ``encrypt`` with a counter nonce, write) -- the least any segmented format costs;
* kmsguard: ``Guard.encrypt_stream`` / ``decrypt_stream`` (local keyring, no observers);
* AWS Encryption SDK: ``EncryptionSDKClient.stream`` with a raw AES key provider and the
  non-signing committing suite (AES_256_GCM_HKDF_SHA512_COMMIT_KEY), frame = segment;
* Tink: streaming AEAD AES256_GCM_HKDF_1MB (its only 1 MiB GCM template; shown once).

The contenders take turns and each keeps its best run, so load on the machine slows them
alike.

``KMSGUARD_BENCH_STREAM_GIB`` (default 1) sets the file's size and
``KMSGUARD_BENCH_STREAM_CLI_GIB`` (default 4) the CLI run's; 0 skips the CLI run.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.common import table
from kmsguard import Guard
from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
from kmsguard.policy import Policy

SEGMENTS = (64 << 10, 1 << 20)
#: Best of this many runs: the raw loop and kmsguard, which take under a second per GiB,
#: and the libraries that take several.
ROUNDS_FAST, ROUNDS_SLOW = 5, 2
MIB = 1 << 20
_READ = 1 << 20
#: A contender's encrypt and decrypt of the whole file.
Runs = tuple[Callable[[], object], Callable[[], object]]


class _Discard(io.RawIOBase):
    """A writable binary file that keeps nothing."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(data)


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _speeds(size: int, contenders: dict[str, Runs], rounds: dict[str, int]) -> dict[str, tuple[float, float]]:
    """MB/s (10^6 bytes) of ``size`` plaintext bytes, encrypt and decrypt, best of each
    contender's ``rounds``; the contenders take turns, so a busy machine slows all alike."""
    best = {name: [float("inf"), float("inf")] for name in contenders}
    for turn in range(max(rounds.values())):
        for name, (enc, dec) in contenders.items():
            if turn < rounds[name]:
                best[name][0] = min(best[name][0], _seconds(enc))
                best[name][1] = min(best[name][1], _seconds(dec))
    return {name: (size / enc / 1e6, size / dec / 1e6) for name, (enc, dec) in best.items()}


# --------------------------------------------------------------------------- the contenders


def _raw(src: Path, out: Path, segment: int) -> Runs:
    aead, prefix, aad = AESGCM(os.urandom(32)), os.urandom(7), os.urandom(64)

    def encrypt(sink: Any) -> None:
        with src.open("rb") as fh:
            i = 0
            while chunk := fh.read(segment):
                sink.write(aead.encrypt(prefix + i.to_bytes(4, "big") + b"\0", chunk, aad))
                i += 1

    def decrypt() -> None:
        sink = _Discard()
        with out.open("rb") as fh:
            i = 0
            while chunk := fh.read(segment + 16):
                sink.write(aead.decrypt(prefix + i.to_bytes(4, "big") + b"\0", chunk, aad))
                i += 1

    with out.open("wb") as fh:
        encrypt(fh)
    return lambda: encrypt(_Discard()), decrypt


def _kmsguard(guard: Guard, src: Path, out: Path, segment: int) -> Runs:
    def encrypt(sink: Any) -> None:
        with src.open("rb") as fh:
            guard.encrypt_stream(fh, sink, "general", {"doc": "bench"}, segment_size=segment)

    def decrypt() -> None:
        with out.open("rb") as fh:
            guard.decrypt_stream(fh, _Discard(), {"doc": "bench"})

    with out.open("wb") as fh:
        encrypt(fh)
    return lambda: encrypt(_Discard()), decrypt


def _aws_sdk(src: Path, out: Path, segment: int) -> Runs:
    import aws_encryption_sdk
    from aws_encryption_sdk.identifiers import (
        Algorithm,
        CommitmentPolicy,
        EncryptionKeyType,
        WrappingAlgorithm,
    )
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
    from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider

    wrapping = os.urandom(32)

    class StaticKeys(RawMasterKeyProvider):  # type: ignore[misc]
        provider_id = "bench"

        def _get_raw_key(self, key_id: bytes) -> WrappingKey:
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=wrapping,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    keys = StaticKeys()
    keys.add_master_key(b"key")
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)

    def encrypt(sink: Any) -> None:
        with (
            src.open("rb") as fh,
            client.stream(
                mode="e",
                source=fh,
                key_provider=keys,
                algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
                frame_length=segment,
                encryption_context={"doc": "bench"},
            ) as enc,
        ):
            for chunk in enc:
                sink.write(chunk)

    def decrypt() -> None:
        sink = _Discard()
        with out.open("rb") as fh, client.stream(mode="d", source=fh, key_provider=keys) as dec:
            for chunk in dec:
                sink.write(chunk)

    with out.open("wb") as fh:
        encrypt(fh)
    return lambda: encrypt(_Discard()), decrypt


def _tink(src: Path, out: Path) -> Runs:
    import tink
    from tink import streaming_aead

    streaming_aead.register()
    handle = tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)
    primitive = handle.primitive(streaming_aead.StreamingAead)
    aad = b"doc=bench"

    def encrypt(sink: Any) -> None:
        with src.open("rb") as fh, primitive.new_encrypting_stream(sink, aad) as enc:
            while chunk := fh.read(_READ):
                enc.write(chunk)

    def decrypt() -> None:
        sink = _Discard()
        with out.open("rb") as fh, primitive.new_decrypting_stream(fh, aad) as dec:
            while chunk := dec.read(_READ):
                sink.write(chunk)

    with out.open("wb") as fh:
        encrypt(fh)
    return lambda: encrypt(_Discard()), decrypt


# --------------------------------------------------------------------------- the CLI's memory


def _cli_peak(env: dict[str, str], *args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one ``kmsguard`` command: VmHWM from /proc while it runs."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kmsguard", *args], env=env, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.05)
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"kmsguard {args[0]} failed: {err.decode()}")
    return time.perf_counter() - start, peak / 1024


def _cli_run(gib: int, workdir: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGUARD_")}
    env["KMSGUARD_HOME"] = str(workdir / "cli-home")
    subprocess.run([sys.executable, "-m", "kmsguard", "init"], env=env, check=True, capture_output=True)
    src, sealed, back = workdir / "cli-in", workdir / "cli-in.kg", workdir / "cli-out"
    with src.open("wb") as fh:
        fh.truncate(gib << 30)  # sparse: costs neither disk nor time to make
    rows = []
    for name, args in (
        ("encrypt", ("encrypt", "--class", "general", "--in", str(src), "--out", str(sealed))),
        ("decrypt", ("decrypt", "--in", str(sealed), "--out", str(back))),
    ):
        seconds, peak = _cli_peak(env, *args)
        rows.append([name, f"{gib} GiB", f"{seconds:.1f}", f"{(gib << 30) / seconds / 1e6:,.0f}", f"{peak:.1f}"])
    for path in (src, sealed, back):
        path.unlink()
    return table(["command", "file", "seconds", "MB/s", "peak RSS MiB"], rows)


def main() -> None:
    gib = int(os.environ.get("KMSGUARD_BENCH_STREAM_GIB", "1"))
    cli_gib = int(os.environ.get("KMSGUARD_BENCH_STREAM_CLI_GIB", "4"))
    size = gib << 30
    with tempfile.TemporaryDirectory(prefix="kmsguard-bench-stream-") as tmp:
        work = Path(tmp)
        keyring = LocalKeyring.create(work / KEY_FILE_NAME, ["general"])
        guard = Guard(Policy.defaults({"general": "local:general", "pii": "pii", "payment": "payment"}), keyring)
        src = work / "plain"
        with src.open("wb") as fh:
            for _ in range(size // (64 * MIB)):
                fh.write(os.urandom(64 * MIB))
        rows = []
        for segment in SEGMENTS:
            label = f"{segment >> 10} KiB"
            contenders: dict[str, Runs] = {
                "raw AES-GCM loop": _raw(src, work / "raw", segment),
                "kmsguard": _kmsguard(guard, src, work / "kg", segment),
                "AWS Encryption SDK": _aws_sdk(src, work / "esdk", segment),
            }
            if segment == 1 << 20:
                contenders["Tink AES256_GCM_HKDF_1MB"] = _tink(src, work / "tink")
            rounds = {
                name: ROUNDS_FAST if name in ("raw AES-GCM loop", "kmsguard") else ROUNDS_SLOW for name in contenders
            }
            speeds = _speeds(size, contenders, rounds)
            raw_enc, raw_dec = speeds["raw AES-GCM loop"]
            for name, (enc, dec) in speeds.items():
                rows.append([label, name, f"{enc:,.0f}", f"{dec:,.0f}", f"{enc / raw_enc:.2f}", f"{dec / raw_dec:.2f}"])
            kg_enc, kg_dec = speeds["kmsguard"]
            sdk_enc, sdk_dec = speeds["AWS Encryption SDK"]
            rows.append(
                [label, "kmsguard / AWS Encryption SDK", "", "", f"{kg_enc / sdk_enc:.1f}x", f"{kg_dec / sdk_dec:.1f}x"]
            )
            for name in ("raw", "kg", "esdk", "tink"):
                (work / name).unlink(missing_ok=True)
        rounds_note = f"best of {ROUNDS_FAST} (raw, kmsguard) or {ROUNDS_SLOW}"
        print(f"{gib} GiB file, MB/s (10^6 bytes per second), {rounds_note}; ratios against the raw loop")
        print(table(["segment", "implementation", "enc MB/s", "dec MB/s", "enc ratio", "dec ratio"], rows))
        src.unlink()
        if cli_gib:
            print(f"\nthe CLI on a {cli_gib} GiB file (sparse input), output to disk")
            print(_cli_run(cli_gib, work))
