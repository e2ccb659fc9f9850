"""JSONPath selection over JSON records: compiled once, walked many times.

Expressions are parsed by jsonpath-ng (its extended grammar, as Powertools' DataMasking
uses: ``$.card.number``, ``$.passengers[*].passport``, ``$..email``, filters). Parsing
is slow, so each expression is parsed once per process and kept. An expression made only
of field names, indexes and wildcards is turned into a small step program walked here
directly; anything else (descendants, slices, filters) is run by jsonpath-ng.

A match is reported as its *concrete* location: a tuple of steps (``str`` keys and
``int`` indexes) that :func:`format_path` renders as a canonical JSONPath such as
``$.passengers[1].passport``. Field protection binds that string into a token, so it
must be the same for the same location however the selecting expression was written.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from jsonpath_ng import Child, Fields, Index, Root, Wildcard
from jsonpath_ng.ext.parser import parse as _parse

from kmsguard.errors import InvalidInput

Step = str | int
Location = tuple[Step, ...]

#: Parsed expressions kept per process before starting over.
MAX_COMPILED = 1024
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EACH = object()


class CompiledPath:
    """One JSONPath expression, ready to select from any number of records."""

    __slots__ = ("_expr", "_program", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput("a field path must be a non-empty JSONPath string")
        self.text = text
        try:
            self._expr = _parse(text)
        except Exception:  # jsonpath-ng raises bare Exception subclasses of its own
            raise InvalidInput(f"invalid JSONPath {text!r}") from None
        self._program = _program(self._expr)

    def find(self, doc: Any) -> list[tuple[Location, Any]]:
        """Every (location, value) the expression selects in ``doc``, in document order."""
        if self._program is not None:
            return list(_walk(doc, self._program, 0, ()))
        out = []
        for match in self._expr.find(doc):
            steps: list[Step] = []
            datum: Any = match
            while datum is not None and not isinstance(datum.path, Root):
                steps.append(_step_of(datum.path, datum.context.value if datum.context is not None else None))
                datum = datum.context
            out.append((tuple(reversed(steps)), match.value))
        return out


_compiled: dict[str, CompiledPath] = {}
_compiled_lock = threading.Lock()


def compile_path(text: str) -> CompiledPath:
    """The compiled form of ``text``, parsed at most once per process (bounded)."""
    with _compiled_lock:
        found = _compiled.get(text)
    if found is not None:
        return found
    path = CompiledPath(text)
    with _compiled_lock:
        if len(_compiled) >= MAX_COMPILED:
            _compiled.clear()
        _compiled[text] = path
    return path


def format_path(location: Sequence[Step]) -> str:
    """The canonical JSONPath of a concrete location: ``$.a.b[2]``, ``$['a b']``."""
    parts = ["$"]
    for step in location:
        if isinstance(step, int):
            parts.append(f"[{step}]")
        elif _IDENT.fullmatch(step):
            parts.append(f".{step}")
        else:
            escaped = step.replace("\\", "\\\\").replace("'", "\\'")
            parts.append(f"['{escaped}']")
    return "".join(parts)


def get(doc: Any, location: Location) -> Any:
    for step in location:
        doc = doc[step]
    return doc


def put(doc: Any, location: Location, value: Any) -> None:
    """Replace the value at ``location`` (which must exist, and not be the root)."""
    get(doc, location[:-1])[location[-1]] = value


def _program(expr: Any) -> tuple[Any, ...] | None:
    """Steps for an expression of names, indexes and wildcards only; None for anything else."""
    steps: list[Any] = []
    while isinstance(expr, Child):
        right = expr.right
        if isinstance(right, Fields) and "*" not in right.fields:
            steps.append(tuple(right.fields))
        elif isinstance(right, Index) and len(right.indices) == 1:
            steps.append(int(right.indices[0]))
        elif isinstance(right, Wildcard):
            steps.append(_EACH)
        else:
            return None
        expr = expr.left
    if not isinstance(expr, Root):
        return None
    return tuple(reversed(steps))


def _walk(doc: Any, program: tuple[Any, ...], at: int, here: Location) -> Iterator[tuple[Location, Any]]:
    if at == len(program):
        yield here, doc
        return
    step = program[at]
    if type(step) is tuple:
        if type(doc) is dict:
            for name in step:
                if name in doc:
                    yield from _walk(doc[name], program, at + 1, (*here, name))
    elif type(step) is int:
        if type(doc) is list:
            index = step + len(doc) if step < 0 else step
            if 0 <= index < len(doc):
                yield from _walk(doc[index], program, at + 1, (*here, index))
    elif type(doc) is dict:
        for name, value in doc.items():
            yield from _walk(value, program, at + 1, (*here, name))
    elif type(doc) is list:
        for index, value in enumerate(doc):
            yield from _walk(value, program, at + 1, (*here, index))


def _step_of(path: Any, parent: Any) -> Step:
    """The concrete step jsonpath-ng recorded for one match (a field name or an index)."""
    if isinstance(path, Fields) and len(path.fields) == 1:
        return str(path.fields[0])
    if isinstance(path, Index) and len(path.indices) == 1:
        index = int(path.indices[0])
        return index + len(parent) if index < 0 and isinstance(parent, list) else index
    raise InvalidInput("the JSONPath selects something other than object members or array elements")
