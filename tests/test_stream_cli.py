"""``kmsguard encrypt/decrypt/inspect/cat`` with streams (suite 2): the command in this process,
and the 1 GiB run in a child process whose memory is measured."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kmsguard import segments
from kmsguard.cli.main import cli as cli_group

MIB = 1 << 20



class Cli:
    """The kmsguard command run in this process (click's runner) with its own KMSGUARD_HOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGUARD_")}
        self.env["KMSGUARD_HOME"] = str(home)
        self.peak_rss = 0
        self.seconds = 0.0

    def __call__(self, *args: str, input: bytes = b"", code: int = 0) -> tuple[bytes, str]:
        unset = {k: None for k in os.environ if k.startswith("KMSGUARD_")}
        result = CliRunner().invoke(cli_group, list(args), input=input, env={**unset, "KMSGUARD_HOME": str(self.home)})
        assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.stdout_bytes, result.stderr


def measured(cli: Cli, *args: str) -> None:
    """Run the command and record the child's own peak RSS: VmHWM of its /proc status, read
    while it runs. (getrusage's ru_maxrss would not do: it keeps the high-water mark of the
    memory the child had before exec, which was this test process's.)"""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsguard", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli.env
    )
    status = Path(f"/proc/{proc.pid}/status")
    peak = 0
    while proc.poll() is None:
        try:
            lines = status.read_text().splitlines()
        except OSError:
            break
        for line in lines:
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) * 1024)
        time.sleep(0.02)
    _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert peak > 0
    cli.peak_rss = peak
    cli.seconds = time.monotonic() - start


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path / "home")
    c("init")
    return c


def data_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def info(cli: Cli, path: Path) -> dict[str, object]:
    return json.loads(cli("inspect", "--in", str(path))[0])  # type: ignore[no-any-return]


def test_above_the_threshold_encrypt_streams_and_decrypt_reads_it(cli: Cli, tmp_path: Path) -> None:
    with (cli.home / "kmsguard.toml").open("a") as fh:
        fh.write("\n[stream]\nthreshold = 100000\nsegment_size = 8192\n")
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(data_of(100_000, 1))
    big.write_bytes(data_of(100_001, 2))
    for path in (small, big):
        cli("encrypt", "--class", "pii", "-c", "doc=x", "--in", str(path), "--out", f"{path}.kg")
        cli("decrypt", "-c", "doc=x", "--in", f"{path}.kg", "--out", f"{path}.out")
        assert Path(f"{path}.out").read_bytes() == path.read_bytes()
        assert Path(f"{path}.out").stat().st_mode & 0o777 == 0o600
    assert info(cli, Path(f"{small}.kg"))["suite"] == 1 and "segments" not in info(cli, Path(f"{small}.kg"))
    shown = info(cli, Path(f"{big}.kg"))
    assert (shown["suite"], shown["segment_size"], shown["segments"], shown["body_size"]) == (2, 8192, 13, 100_001)
    # stdin above the threshold streams too; --stream forces it; --segment-size overrides.
    out, _ = cli("encrypt", "--class", "general", input=big.read_bytes())
    assert out[3] == 2 and cli("decrypt", input=out)[0] == big.read_bytes()
    out, _ = cli("encrypt", "--class", "general", "--stream", "--segment-size", "4096", input=b"tiny")
    assert out[3] == 2 and segments.parse(out).segment_size == 4096
    assert cli("decrypt", input=out)[0] == b"tiny"
    _, err = cli("encrypt", "--class", "general", "--stream", "--text", input=b"x", code=2)
    assert "text form" in err


def test_a_bad_stream_leaves_no_output_file(cli: Cli, tmp_path: Path) -> None:
    plain = data_of(5 * 4096 + 10, 3)
    src = tmp_path / "in"
    src.write_bytes(plain)
    sealed_path = tmp_path / "in.kg"
    cli(
        "encrypt",
        "--class",
        "general",
        "--stream",
        "--segment-size",
        "4096",
        "--in",
        str(src),
        "--out",
        str(sealed_path),
    )
    sealed = sealed_path.read_bytes()
    size = segments.parse(sealed).size
    flipped = bytearray(sealed)
    flipped[size + 3 * 4112 + 7] ^= 4
    bad_cases = {
        "truncated-at-boundary": sealed[: size + 5 * 4112],
        "truncated-inside": sealed[:-3],
        "flipped": bytes(flipped),
        "segments-swapped": sealed[:size] + sealed[size + 4112 : size + 2 * 4112] + sealed[size : size + 4112]
        + sealed[size + 2 * 4112 :],
    }  # fmt: skip
    existing = tmp_path / "kept"
    existing.write_bytes(b"an earlier file")
    for name, bad in bad_cases.items():
        path = tmp_path / f"{name}.kg"
        path.write_bytes(bad)
        out = tmp_path / f"{name}.out"
        _, err = cli("decrypt", "--in", str(path), "--out", str(out), code=1)
        assert err.strip() == "error: INVALID_CIPHERTEXT: invalid ciphertext"
        assert not out.exists(), name
        cli("decrypt", "--in", str(path), "--out", str(existing), code=1)
        assert existing.read_bytes() == b"an earlier file"  # a failed decrypt never replaces a file
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    # To stdout the verified segments before the bad one are out already: the exit status says it failed.
    out, _ = cli("decrypt", "--in", str(tmp_path / "flipped.kg"), code=1)
    assert out == plain[: 3 * 4096]


def test_cat_prints_byte_ranges(cli: Cli, tmp_path: Path) -> None:
    plain = data_of(10 * 4096 + 33, 4)
    src, sealed = tmp_path / "in", tmp_path / "in.kg"
    src.write_bytes(plain)
    cli("encrypt", "--class", "payment", "-c", "purpose=audit", "--stream", "--segment-size", "4096",
        "--in", str(src), "--out", str(sealed))  # fmt: skip
    ctx = ("-c", "purpose=audit")
    for offset, length in ((0, 10), (4090, 20), (8192, 4096), (len(plain) - 5, 100), (len(plain) + 7, 3)):
        out, _ = cli("cat", *ctx, "--in", str(sealed), "--offset", str(offset), "--length", str(length))
        assert out == plain[offset : offset + length]
    assert cli("cat", *ctx, "--in", str(sealed), "--offset", "40000")[0] == plain[40000:]
    assert cli("cat", *ctx, "--in", str(sealed))[0] == plain
    _, err = cli("cat", "--in", str(sealed), code=1)  # payment requires its purpose
    assert "CONTEXT_REQUIRED" in err
    _, err = cli("cat", *ctx, "--in", str(tmp_path / "absent"), code=1)
    assert "cannot read" in err


def test_a_gib_through_the_cli_in_bounded_memory(cli: Cli, tmp_path: Path) -> None:
    """1 GiB (a sparse file: zeros that cost no disk or memory to make) encrypts and decrypts
    through the command with its peak RSS, measured for the child, under 64 MiB."""
    size = 1 << 30
    src, sealed, back = tmp_path / "big", tmp_path / "big.kg", tmp_path / "big.out"
    with src.open("wb") as fh:
        fh.truncate(size)
    measured(cli, "encrypt", "--class", "general", "--in", str(src), "--out", str(sealed))
    enc_rss, enc_s = cli.peak_rss, cli.seconds
    src.unlink()
    count = size // segments.DEFAULT_SEGMENT_SIZE
    with sealed.open("rb") as fh:
        header = segments.parse(fh.read(segments.MAX_HEADER_SIZE))
    assert sealed.stat().st_size == header.size + size + 16 * count
    measured(cli, "decrypt", "--in", str(sealed), "--out", str(back))
    dec_rss, dec_s = cli.peak_rss, cli.seconds
    sealed.unlink()
    assert back.stat().st_size == size
    zeros = bytes(8 * MIB)
    with back.open("rb") as fh:
        while chunk := fh.read(len(zeros)):
            assert chunk == zeros[: len(chunk)]
    back.unlink()
    print(
        f"1 GiB: encrypt {enc_s:.1f} s, peak RSS {enc_rss / MIB:.1f} MiB;",
        f"decrypt {dec_s:.1f} s, {dec_rss / MIB:.1f} MiB",
    )
    assert enc_rss < 64 * MIB, enc_rss
    assert dec_rss < 64 * MIB, dec_rss
