"""Scan files and directory trees for unprotected sensitive data (``kmsguard scan``).

Formats: JSON documents (findings located by JSON path), JSON lines (``line N`` plus the
path within that line's record), CSV and any other text (``line:column``), and gzip of
any of these. A file whose first block holds a NUL byte or is not UTF-8 is binary: it
is skipped and counted, never guessed at. Large text is read in blocks of whole lines,
so memory stays flat and each detector runs over a block at a time.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmsguard.detect import Finding, detect_json, detect_text, finding
from kmsguard.detect.finders import spans
from kmsguard.jsonpaths import Location, format_path

#: Bytes read per block of lines.
BLOCK = 4 << 20
#: JSON documents up to this size are parsed whole (and located by path); larger ones are scanned as text.
MAX_JSON_DOCUMENT = 64 << 20
_SNIFF = 8192
_GZIP_MAGIC = b"\x1f\x8b"
_JSON_LINES = {".jsonl", ".ndjson"}


@dataclass
class FileFindings:
    path: str
    findings: list[Finding]


@dataclass
class ScanReport:
    """What a scan found: findings per file, and counts of what was read and skipped."""

    files: list[FileFindings] = field(default_factory=list)
    files_scanned: int = 0
    binary_skipped: int = 0
    unreadable: list[str] = field(default_factory=list)
    bytes_scanned: int = 0

    def findings(self) -> Iterator[tuple[str, Finding]]:
        for f in self.files:
            for item in f.findings:
                yield f.path, item

    def counts(self) -> dict[str, int]:
        """Findings per kind."""
        out: dict[str, int] = {}
        for _, item in self.findings():
            out[item.kind] = out.get(item.kind, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "files_scanned": self.files_scanned,
            "binary_skipped": self.binary_skipped,
            "unreadable": self.unreadable,
            "bytes_scanned": self.bytes_scanned,
            "counts": self.counts(),
            "findings": [{"file": path, **item.to_dict()} for path, item in self.findings()],
        }


def scan_paths(paths: Iterable[str | os.PathLike[str]]) -> ScanReport:
    """Scan each file, and each file under each directory (recursively, in name order)."""
    report = ScanReport()
    for root in paths:
        for path in _files(Path(root)):
            scan_file(path, report)
    return report


def scan_file(path: Path, report: ScanReport) -> None:
    """Add ``path``'s findings and counts to ``report``; an unreadable file is listed, not fatal."""
    try:
        with open(path, "rb") as raw:
            name = path.name
            stream: io.BufferedReader = raw
            if raw.peek(2)[:2] == _GZIP_MAGIC:
                stream = io.BufferedReader(gzip.GzipFile(fileobj=raw))
                name = name.removesuffix(".gz")
            sniff = stream.peek(_SNIFF)[:_SNIFF]
            if _is_binary(sniff):
                report.binary_skipped += 1
                return
            found = _scan_stream(stream, Path(name).suffix.lower(), report)
    except (OSError, EOFError, gzip.BadGzipFile):
        report.unreadable.append(str(path))
        return
    report.files_scanned += 1
    if found:
        report.files.append(FileFindings(str(path), found))


def _scan_stream(stream: io.BufferedIOBase, suffix: str, report: ScanReport) -> list[Finding]:
    if suffix == ".json":
        data = stream.read(MAX_JSON_DOCUMENT + 1)
        report.bytes_scanned += len(data)
        text = data.decode("utf-8", errors="replace")
        if len(data) <= MAX_JSON_DOCUMENT:
            try:
                return detect_json(json.loads(text))
            except ValueError:
                pass
        found = detect_text(text)
        line = text.count("\n") + 1
        return found + _scan_blocks(stream, report, json_lines=False, first_line=line)
    return _scan_blocks(stream, report, json_lines=suffix in _JSON_LINES, first_line=1)


def _scan_blocks(stream: io.BufferedIOBase, report: ScanReport, *, json_lines: bool, first_line: int) -> list[Finding]:
    found: list[Finding] = []
    line = first_line
    while True:
        block = stream.read(BLOCK)
        if not block:
            break
        if not block.endswith(b"\n"):
            block += stream.readline()
        report.bytes_scanned += len(block)
        text = block.decode("utf-8", errors="replace")
        found.extend(_json_lines(text, line) if json_lines else detect_text(text, first_line=line))
        line += text.count("\n")
    return found


def _json_lines(text: str, first_line: int) -> list[Finding]:
    """Findings in a block of JSON lines, each located by line and by the path of the member holding it.

    Only lines holding a span are parsed; each span is matched to the string (or number)
    member that contains its text. A span found in no member (the line escapes it, or
    is not JSON) is reported by ``line:column``.
    """
    out: list[Finding] = []
    found = spans(text)
    line, line_start, i = first_line, 0, 0
    while i < len(found):
        start = found[i][1]
        line += text.count("\n", line_start, start)
        line_start = text.rfind("\n", 0, start) + 1
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        on_line = []
        while i < len(found) and found[i][1] < line_end:
            on_line.append(found[i])
            i += 1
        record_text = text[line_start:line_end]
        try:
            members = list(_members(json.loads(record_text), ()))
        except ValueError:
            members = []
        for kind, s, e in on_line:
            value = text[s:e]
            where = next((loc for loc, member in members if value in member), None)
            location = f"{line}:{s - line_start + 1}" if where is None else f"line {line} {format_path(where)}"
            out.append(finding(kind, location, value, where))
    return out


def _members(value: Any, here: Location) -> Iterator[tuple[Location, str]]:
    """Each string member's location and text (numbers as their digits), in document order."""
    if isinstance(value, str):
        yield here, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _members(item, (*here, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _members(item, (*here, index))
    elif isinstance(value, int) and not isinstance(value, bool):
        yield here, str(value)


def _is_binary(head: bytes) -> bool:
    if b"\x00" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(head) - 3  # a character cut at the end of the block is not binary
    return False


def _files(root: Path) -> Iterator[Path]:
    """Regular files only: a FIFO or a device would block the scan or never end."""
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.is_file():
                    yield path
    elif root.is_file():
        yield root


__all__ = ["FileFindings", "ScanReport", "scan_file", "scan_paths"]
