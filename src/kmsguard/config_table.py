"""Typed reads of one settings table, every failure a ConfigurationError naming the setting.

Every section of ``kmsguard.toml`` that kmsguard reads goes through :class:`ConfigTable`:
the top level and ``[classifications.*]`` (:mod:`kmsguard.config`), ``[aws]``
(:mod:`kmsguard.aws.settings` and the multi-region keyring's part of it), ``[audit]`` and
``[metrics]``. So a setting a section does not know is an error, and every message has one shape,
``<dotted.name>: <what it must be>`` (or ``<VARIABLE>: ...`` when the value came from the
environment), short enough to fix from one line of a service's log.

A message names settings and describes types and bounds; it repeats a value only when
the value is a plain word (a backend or sink name), so a secret put in the wrong place
never reaches a log.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from kmsguard.errors import ConfigurationError

_WORD = re.compile(r"[A-Za-z0-9_.-]{1,32}")


class ConfigTable:
    """One table of settings (``where`` is its dotted name; ``""`` for the top level).

    ``known`` lists the settings the table may hold; any other is refused when the
    table is opened. ``None`` accepts any name, for tables keyed by the user's own
    names (regions, classifications). ``env`` supplies the ``KMSGUARD_*`` overrides
    that ``var=`` names; a non-empty variable wins over the file.
    """

    def __init__(
        self,
        raw: object,
        where: str,
        known: Collection[str] | None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigurationError(f"{where}: must be a table")
        self.where = where
        self.raw: Mapping[str, Any] = raw
        self.env: Mapping[str, str] = env or {}
        if known is not None:
            unknown = sorted(str(name) for name in raw if name not in known)
            if unknown:
                close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(unknown[0], f"unknown setting{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def names(self) -> list[str]:
        """The settings present, in file order."""
        return list(self.raw)

    def path(self, name: str) -> str:
        """The dotted name of a setting of this table (``aws.read_timeout``)."""
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str, problem: str) -> ConfigurationError:
        """The error for a setting of this table: ``<dotted.name>: <problem>``."""
        return ConfigurationError(f"{self.path(name)}: {problem}")

    # ------------------------------------------------------------------ nested tables

    def table(self, name: str, known: Collection[str] | None) -> ConfigTable:
        """A nested table, empty when absent, checked as its own ConfigTable."""
        return ConfigTable(self.raw.get(name, {}), self.path(name), known, self.env)

    def raw_table(self, name: str) -> dict[str, Any]:
        """A nested table that another component validates: only checked to be a table."""
        value = self.raw.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, "must be a table")
        return value

    # ------------------------------------------------------------------ values

    def string(
        self,
        name: str,
        default: str | None = None,
        *,
        var: str | None = None,
        pattern: re.Pattern[str] | None = None,
        shape: str = "a non-empty string",
    ) -> str:
        """A string, required when ``default`` is None; empty only where ``default`` is
        empty (there an empty string means "not set").

        ``pattern`` must match the whole value; ``shape`` then says what it must be.
        """
        where, value = self._lookup(name, default, var)
        if value is None:
            raise ConfigurationError(f"{where}: must be set")
        if not isinstance(value, str) or (not value and default != ""):
            raise ConfigurationError(f"{where}: must be a non-empty string")
        if value and pattern is not None and not pattern.fullmatch(value):
            raise ConfigurationError(f"{where}: must be {shape}")
        return value

    def optional_string(
        self,
        name: str,
        *,
        var: str | None = None,
        pattern: re.Pattern[str] | None = None,
        shape: str = "a non-empty string",
    ) -> str | None:
        """A non-empty string, or None when neither the table nor ``var`` sets it."""
        where, value = self._lookup(name, None, var)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{where}: must be a non-empty string")
        if pattern is not None and not pattern.fullmatch(value):
            raise ConfigurationError(f"{where}: must be {shape}")
        return value

    def choice(self, name: str, choices: Collection[str], default: str, *, var: str | None = None) -> str:
        """One of ``choices``."""
        where, value = self._lookup(name, default, var)
        if not isinstance(value, str) or value not in choices:
            shown = f", not {value!r}" if isinstance(value, str) and _WORD.fullmatch(value) else ""
            raise ConfigurationError(f"{where}: must be one of {', '.join(choices)}{shown}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, "must be true or false")
        return value

    def optional_boolean(self, name: str) -> bool | None:
        """true or false, or None when absent (the decision is left to someone else)."""
        return self.boolean(name, False) if name in self.raw else None

    def integer(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        """A whole number (not a bool, not a float such as 1.0) within the bounds given."""
        value = self.raw.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            raise self.error(name, "must be a whole number" + _bounds(minimum, maximum))
        return value

    def number(
        self,
        name: str,
        default: float,
        *,
        above: float | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        """A finite number (an int is accepted as a float) within the bounds given.

        ``above`` is an exclusive lower bound (a timeout must be above zero), ``minimum``
        and ``maximum`` inclusive ones.
        """
        value = self.raw.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or (above is not None and value <= above)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            bounds = f" above {_show(above)}" if above is not None else _bounds(minimum, maximum)
            if above is not None and maximum is not None:
                bounds += f" and at most {_show(maximum)}"
            raise self.error(name, "must be a finite number" + bounds)
        return float(value)

    def strings(self, name: str) -> list[str]:
        """A list of non-empty strings, empty when absent."""
        value = self.raw.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(name, "must be a list of non-empty strings")
        return list(value)

    def _lookup(self, name: str, default: object, var: str | None) -> tuple[str, object]:
        """The value and the name to blame for it: the variable when it is set, else the setting."""
        if var is not None and self.env.get(var):
            return var, self.env[var]
        return self.path(name), self.raw.get(name, default)


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" between {_show(minimum)} and {_show(maximum)}"
    if minimum is not None:
        return f" of at least {_show(minimum)}"
    if maximum is not None:
        return f" of at most {_show(maximum)}"
    return ""
