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
from collections.abc import Sequence
from typing import Any

from jsonpath_ng import Child, Fields, Index, Root, Wildcard
from jsonpath_ng.ext.parser import parse as _parse
from jsonpath_ng.lexer import JsonPathLexer

from kmsguard.errors import InvalidInput

Step = str | int
Location = tuple[Step, ...]
#: One selected value: its location, the value, and the location's canonical path.
Match = tuple[Location, Any, str]

#: Parsed expressions kept per process before starting over.
MAX_COMPILED = 1024
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Names jsonpath-ng's lexer reads as operators (``$.where`` does not parse): always quoted.
_RESERVED = frozenset(JsonPathLexer.reserved_words)
_EACH = object()


class CompiledPath:
    """One JSONPath expression, ready to select from any number of records."""

    __slots__ = ("_expr", "_fixed", "_fixed_text", "_program", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput("a field path must be a non-empty JSONPath string")
        self.text = text
        try:
            self._expr = _parse(text)
        except Exception:  # jsonpath-ng raises bare Exception subclasses of its own
            raise InvalidInput(f"invalid JSONPath {text!r}") from None
        self._program = _program(self._expr)
        #: For a path naming one location (member names, indexes from the start): that location.
        self._fixed: Location | None = None
        if self._program is not None and all(
            (type(step) is tuple and len(step) == 1) or (type(step) is int and step >= 0) for step in self._program
        ):
            self._fixed = tuple(step if type(step) is int else step[0][0] for step in self._program)
        self._fixed_text = format_path(self._fixed) if self._fixed is not None else ""

    @property
    def location(self) -> Location | None:
        """The one location this path names, if it names one (members and indexes from the start)."""
        return self._fixed

    def find(self, doc: Any) -> list[Match]:
        """Every (location, value, path) the expression selects in ``doc``, in document order."""
        fixed = self._fixed
        if fixed is not None:
            for step in fixed:
                if isinstance(step, str):
                    if not isinstance(doc, dict) or step not in doc:
                        return []
                elif not isinstance(doc, list) or step >= len(doc):
                    return []
                doc = doc[step]
            return [(fixed, doc, self._fixed_text)]
        if self._program is not None:
            return _walk(doc, self._program)
        try:
            found = self._expr.find(doc)
        except Exception:  # jsonpath-ng's functions and filters fail on values they cannot compare or sort
            raise InvalidInput(f"JSONPath {self.text!r} cannot be evaluated on this record") from None
        out = []
        for match in found:
            steps: list[Step] = []
            datum: Any = match
            while datum is not None and not isinstance(datum.path, Root):
                steps.append(_step_of(datum.path, datum.context.value if datum.context is not None else None))
                datum = datum.context
            location = tuple(reversed(steps))
            out.append((location, match.value, format_path(location)))
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
    return "$" + "".join(step_text(step) for step in location)


def step_text(step: Step) -> str:
    """One step of a canonical path: ``.name``, ``['other name']`` or ``[3]``."""
    if isinstance(step, int):
        return f"[{step}]"
    if _IDENT.fullmatch(step) and step not in _RESERVED:
        return f".{step}"
    escaped = step.replace("\\", "\\\\").replace("'", "\\'")
    return f"['{escaped}']"


def get(doc: Any, location: Location) -> Any:
    for step in location:
        doc = doc[step]
    return doc


def _program(expr: Any) -> tuple[Any, ...] | None:
    """Steps for an expression of names, indexes and wildcards only; None for anything else."""
    steps: list[Any] = []
    while isinstance(expr, Child):
        right = expr.right
        if isinstance(right, Fields) and "*" not in right.fields:
            steps.append(tuple((str(name), step_text(str(name))) for name in right.fields))
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


def _walk(doc: Any, program: tuple[Any, ...]) -> list[Match]:
    """Run a step program: one pass per step over the matches so far, so document order is kept."""
    frontier: list[Match] = [((), doc, "$")]
    for step in program:
        found: list[Match] = []
        if type(step) is tuple:
            for here, value, text in frontier:
                if isinstance(value, dict):
                    for name, name_text in step:
                        if name in value:
                            found.append(((*here, name), value[name], text + name_text))
        elif type(step) is int:
            for here, value, text in frontier:
                if isinstance(value, list):
                    index = step + len(value) if step < 0 else step
                    if 0 <= index < len(value):
                        found.append(((*here, index), value[index], f"{text}[{index}]"))
        else:
            for here, value, text in frontier:
                if isinstance(value, dict):
                    for name, item in value.items():
                        if isinstance(name, str):
                            found.append(((*here, name), item, text + step_text(name)))
                elif isinstance(value, list):
                    for index, item in enumerate(value):
                        found.append(((*here, index), item, f"{text}[{index}]"))
        frontier = found
        if not frontier:
            break
    return frontier


def _step_of(path: Any, parent: Any) -> Step:
    """The concrete step jsonpath-ng recorded for one match (a field name or an index)."""
    if isinstance(path, Fields) and len(path.fields) == 1:
        return str(path.fields[0])
    if isinstance(path, Index) and len(path.indices) == 1:
        index = int(path.indices[0])
        return index + len(parent) if index < 0 and isinstance(parent, list) else index
    raise InvalidInput("the JSONPath selects something other than object members or array elements")
