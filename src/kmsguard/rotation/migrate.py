"""Migrate: encrypt the plaintext values of an existing column or file in place.

Text values become ``kg1:`` tokens, binary values binary envelopes; values that already
are envelopes are left alone, so a second run changes nothing. Each value's context is
the fixed ``-c K=V`` pairs plus, for ``--context-from NAME=COLUMN``, the row's own
``COLUMN`` bound as ``NAME``: a token copied into another row then fails to decrypt with
that row's context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kmsguard.errors import InvalidInput, KmsGuardError
from kmsguard.guard import Guard
from kmsguard.rotation.census import skim
from kmsguard.rotation.rewrap import BatchKeys, Change, Row
from kmsguard.rotation.sources import Value
from kmsguard.rotation.tables import BatchResult


class Migrate:
    """What one batch of a migration does."""

    kind = "migrate"

    def __init__(
        self,
        guard: Guard,
        keys: BatchKeys,
        classification: str,
        context: Mapping[str, str],
        context_from: Mapping[str, str],
    ) -> None:
        guard.policy.get(classification)  # an unknown class is a usage error, now
        clash = set(context) & set(context_from)
        if clash:
            raise InvalidInput(f"context key(s) given both by -c and --context-from: {', '.join(sorted(clash))}")
        self.guard = guard
        self.keys = keys
        self.classification = classification
        self.context = dict(context)
        #: context name -> the column (or record field) it is read from
        self.context_from = dict(context_from)

    def options(self) -> str:
        pairs = sorted(self.context.items()) + sorted(("@" + k, v) for k, v in self.context_from.items())
        return self.classification + "|" + ",".join(f"{k}={v}" for k, v in pairs)

    def columns(self) -> list[str]:
        """The extra columns each row must bring along (for ``--context-from``)."""
        return sorted(set(self.context_from.values()))

    @staticmethod
    def wants(value: Value) -> bool:
        """Plaintext (to encrypt) rather than an envelope (already done). Headers only."""
        return skim(value) is None

    def apply(self, rows: Sequence[Row]) -> tuple[list[Change], BatchResult]:
        self.keys.new_batch()
        result = BatchResult(rows=len(rows))
        changes: list[Change] = []
        for key, value, columns in rows:
            if not self.wants(value):
                result.current += 1
                continue
            try:
                context = {**self.context, **{name: _text(columns.get(col)) for name, col in self.context_from.items()}}
                if isinstance(value, str):
                    new: Value = self.guard.encrypt_text(value, self.classification, context)
                else:
                    new = self.guard.encrypt(bytes(value), self.classification, context)
                changes.append((key, value, new))
            except KmsGuardError as exc:
                result.fail(key, exc)
        result.key_calls = self.keys.counter.take()
        return changes, result


def _text(value: object) -> str:
    if value is None:
        raise InvalidInput("a --context-from column is NULL in this row")
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
