"""Guard: the one object an application holds to encrypt and decrypt classified data.

Guard is the only place where data keys (from a keyring) meet data (through the
envelope). Every operation goes through its plan (kmsguard.plans): the policy's
decisions for that classification and context, or that envelope prefix, made once.
A cache hit is served by the plan's lane in one call; anything else takes the full
route, which applies the policy and asks the keyring for a key. Either way, each
observer (audit, metrics, a user's own) is told once per operation, with one
:class:`~kmsguard.fastpath.OperationEvent` (see kmsguard.operation.Observer); a
strict-audit classification's operation is refused when an observer raises.

Guard's mutable state is its plan tables (bounded, least recently used out; see
kmsguard.plans), safe to share: one Guard serves all threads of a process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import IO, Any, TypeVar, overload

from kmsguard import batch, envelope, operation, plans, segments, stream
from kmsguard.config import Settings, load_settings
from kmsguard.datakey import WrappedKey
from kmsguard.errors import AuditUnavailable, InvalidCiphertext, InvalidInput
from kmsguard.fastpath import OperationEvent
from kmsguard.keyrings.base import KeyLender, KeyRequest, Keyring, Loan
from kmsguard.operation import EventKind, Observer, Operation
from kmsguard.policy import ClassPolicy, Policy

log = logging.getLogger("kmsguard")
T = TypeVar("T")
Context = Mapping[str, str] | None
EnvelopeInput = bytes | bytearray | memoryview | str
Unwrap = Callable[[Sequence[WrappedKey], KeyRequest], Loan]


@dataclass(frozen=True)
class EnvelopeInfo:
    """What ``inspect`` shows: the envelope's public header. Nothing is decrypted."""

    version: int
    suite: int
    classification: str
    context: dict[str, str]
    keys: list[dict[str, str]]
    size: int
    body_size: int
    #: Suite 2 only: plaintext bytes per segment, and how many segments.
    segment_size: int | None = None
    segments: int | None = None

    @classmethod
    def of(cls, data: EnvelopeInput) -> EnvelopeInfo:
        raw = envelope.coerce(data)
        if raw[3:4] == _SUITE_2:
            return cls.of_stream(raw[: segments.MAX_HEADER_SIZE], len(raw))
        env = envelope.parse(raw)
        return cls(
            version=env.version,
            suite=env.suite,
            classification=env.classification,
            context=dict(env.context),
            keys=[{"provider": w.provider, "key_ref": w.key_ref} for w in env.wrapped_keys],
            size=len(raw),
            body_size=env.plaintext_size,
        )

    @classmethod
    def of_stream(cls, first: bytes, size: int) -> EnvelopeInfo:
        """The info of a suite-2 envelope of ``size`` bytes from its first bytes (a file's, say)."""
        header = segments.parse(first)
        layout = segments.layout(header, size)
        head = header.header
        return cls(
            version=envelope.VERSION,
            suite=segments.SUITE,
            classification=head.classification,
            context=dict(head.context),
            keys=[{"provider": w.provider, "key_ref": w.key_ref} for w in head.wrapped_keys],
            size=size,
            body_size=layout.plaintext_size,
            segment_size=layout.segment_size,
            segments=layout.count,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "suite": self.suite,
            "classification": self.classification,
            "context": self.context,
            "keys": self.keys,
            "size": self.size,
            "body_size": self.body_size,
        } | ({"segment_size": self.segment_size, "segments": self.segments} if self.suite == segments.SUITE else {})


class Guard:
    """Encrypt, decrypt, inspect and rewrap classified data.

    ``Guard.from_env()`` builds one from ``$KMSGUARD_HOME`` and ``KMSGUARD_*``;
    ``Guard(policy=..., keyring=...)`` composes one by hand (tests, custom stacks).
    """

    def __init__(
        self,
        policy: Policy,
        keyring: Keyring,
        *,
        observers: Sequence[Observer] = (),
        principal: str = "unknown",
        settings: Settings | None = None,
        max_plans: int = plans.DEFAULT_MAX_PLANS,
    ) -> None:
        self.policy = policy
        self.keyring = keyring
        self.observers = tuple(observers)
        self.principal = principal
        self.settings = settings
        self._closed = False
        # A cache lends its keys with their Budgets, which the plans keep (their lanes);
        # any other keyring's keys serve one message each.
        if isinstance(keyring, KeyLender):
            self._lend: Callable[[KeyRequest, int], Loan] = keyring.lend
            self._unwrap: Unwrap = keyring.lend_unwrapped
        else:
            self._lend = lambda request, _size: (keyring.generate(request), None)
            self._unwrap = lambda wrapped, request: (keyring.unwrap(wrapped, request), None)
        # Cache hits take a plan's lane, observed or not: each observer gets them through
        # its HitSink (kmsguard.operation.hit_sink).
        sinks = [operation.hit_sink(o, _report) for o in self.observers]
        self._plans = plans.Plans(
            policy,
            max_plans,
            observed=bool(self.observers),
            sinks=tuple(sink for sink in sinks if sink is not None),
            principal=principal,
            acting=operation.principal,
            served=operation.request,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Guard:
        return cls.from_settings(load_settings(env))

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        from kmsguard.stack import build_keyring, build_observers, build_policy, build_telemetry

        telemetry = build_telemetry(settings)
        keyring = build_keyring(settings, telemetry)
        return cls(
            build_policy(settings),
            keyring,
            observers=build_observers(settings, keyring, telemetry),
            principal=settings.principal,
            settings=settings,
            max_plans=settings.cache_max_entries,
        )

    def close(self) -> None:
        """Flush and stop observers (the audit writer) and keyrings that hold resources; once.

        The audit writer is shared by the process's Guards (docs/audit.md): this Guard's
        records are delivered (waiting at most ``[audit] close_timeout``), and the last
        Guard to close stops it.
        """
        if self._closed:
            return
        self._closed = True
        for obj in (*self.observers, self.keyring):
            closer = getattr(obj, "close", None)
            if callable(closer):
                closer()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ operations

    def encrypt(self, plaintext: bytes, classification: str, context: Context = None) -> bytes:
        """Seal ``plaintext`` under a data key of ``classification``'s key.

        ``context`` is bound to the ciphertext (stored in its header, authenticated, sent
        to the key service); it is not secret. The classification's required context
        keys must be present.
        """
        out = self._plans.seal(plaintext, classification, context)
        if out is not None:
            return out
        return self._observe("encrypt", context, self._encrypt, plaintext, classification, context)

    def encrypt_if_cached(self, plaintext: bytes, classification: str, context: Context = None) -> bytes | None:
        """``encrypt(plaintext, classification, context)`` when a cache hit serves it on its
        fast route, else None (and nothing was done: call ``encrypt``).

        Such an encrypt never calls the key service, so an event loop may run it inline
        (AsyncGuard does).
        """
        return self._plans.seal(plaintext, classification, context)

    def decrypt(self, data: EnvelopeInput, context: Context = None) -> bytes:
        """Open an envelope (binary or ``kg1:`` text).

        Every pair in ``context`` must match the header (else ContextMismatch), and the
        classification's required keys must be among them: a caller states why it
        decrypts payment data as it did when encrypting.
        """
        if type(data) is str:  # decoded once, here: a cache hit's lane takes binary envelopes
            data = _decoded(data)
        plain = self._open_cached(data, context)
        if plain is not None:
            return plain
        ctx = plans.check_context(context)
        return self._observe("decrypt", ctx, self._decrypt, data, ctx, self._unwrap)

    def decrypt_if_cached(self, data: EnvelopeInput, context: Context = None) -> bytes | None:
        """``decrypt(data, context)`` when a cache hit serves it on its fast route, else None
        (and nothing was done: call ``decrypt``).

        Such a decrypt never calls the key service, so an event loop may run it inline
        (AsyncGuard does). Anything it cannot serve (a bad envelope, one whose body fails
        under its cached key) is None too: ``decrypt`` refuses it as an audited operation.
        """
        return self._open_cached(_decoded(data) if type(data) is str else data, context)

    def _open_cached(self, data: EnvelopeInput, context: Context) -> bytes | None:
        try:
            return self._plans.open(data, context)
        except InvalidCiphertext:  # the full route refuses it again, with an audit record
            return None

    def encrypt_many(
        self,
        items: Sequence[bytes],
        classification: str,
        context: Context = None,
        contexts: Sequence[Context] | None = None,
        max_concurrency: int = batch.DEFAULT_CONCURRENCY,
    ) -> list[batch.Result[bytes]]:
        """Encrypt each item; one :class:`~kmsguard.batch.Result` per item, in order.

        ``contexts`` gives each item its own context (same length as ``items``), else
        every item gets ``context``. A bad item yields its error and the rest go on.
        Items sharing a context share a cached data key as far as the limits allow.
        """
        if contexts is not None and len(contexts) != len(items):
            raise InvalidInput("contexts must have one entry per item")
        indexed = list(enumerate(items))

        def one(pair: tuple[int, bytes]) -> bytes:
            index, item = pair
            return self.encrypt(item, classification, context if contexts is None else contexts[index])

        return batch.settle(one, indexed, max_concurrency)

    def decrypt_many(
        self,
        envelopes: Sequence[EnvelopeInput],
        context: Context = None,
        max_concurrency: int = batch.DEFAULT_CONCURRENCY,
    ) -> list[batch.Result[bytes]]:
        """Decrypt each envelope; one :class:`~kmsguard.batch.Result` per envelope, in order.

        Envelopes sharing a data key (same wrapped keys and bound context) are unwrapped
        once for the whole batch, even with the cache off; each is still its own audited
        operation. A bad envelope yields its error and the rest go on.
        """
        ctx = plans.check_context(context)
        unwrap = batch.UnwrapOnce(self._unwrap)

        def one(data: EnvelopeInput) -> bytes:
            plain = self.decrypt_if_cached(data, ctx)
            return plain if plain is not None else self._observe("decrypt", ctx, self._decrypt, data, ctx, unwrap)

        return batch.settle(one, envelopes, max_concurrency)

    def encrypt_text(self, text: str, classification: str, context: Context = None) -> str:
        """``encrypt`` for text: UTF-8 in, ``kg1:`` token out (for columns and JSON)."""
        return envelope.to_text(self.encrypt(utf8_of(text), classification, context))

    def decrypt_text(self, token: str, context: Context = None) -> str:
        """``decrypt`` for a token made by ``encrypt_text``."""
        return text_of(self.decrypt(token, context))

    @overload
    def rewrap(self, data: str, context: Context = None) -> str: ...
    @overload
    def rewrap(self, data: bytes | bytearray | memoryview, context: Context = None) -> bytes: ...
    def rewrap(self, data: EnvelopeInput, context: Context = None) -> bytes | str:
        """Re-wrap the data key under the classification's current key; the body is kept.

        After a rotation (or a key change in the policy) this moves stored ciphertexts to
        the new key without decrypting the data. Returns the form it was given: a
        ``kg1:`` str for a str, binary otherwise.
        """
        ctx = plans.check_context(context)
        out = self._observe("rewrap", ctx, self._rewrap, data, ctx)
        return envelope.to_text(out) if isinstance(data, str) else out

    def rewrap_text(self, token: str, context: Context = None) -> str:
        """``rewrap`` for a ``kg1:`` token (kept for symmetry with encrypt_text/decrypt_text)."""
        return self.rewrap(token, context)

    # ------------------------------------------------------------------ streams (kmsguard.stream)

    def encrypt_stream(
        self,
        src: stream.Source,
        dst: stream.Sink,
        classification: str,
        context: Context = None,
        *,
        segment_size: int | None = None,
    ) -> int:
        """Seal ``src`` (a binary file object or an iterable of bytes chunks) into ``dst`` as
        envelope suite 2, in memory bounded by a few segments; returns the plaintext size.

        ``segment_size`` (4096 to 16 MiB, default 64 KiB) is the plaintext per segment,
        the unit of random access (:meth:`open_encrypted`). One audited operation.
        """
        return self._observe(
            "encrypt_stream", context, stream.encrypt, self, src, dst, classification, context, segment_size
        )

    def decrypt_stream(self, src: stream.Source, dst: stream.Sink, context: Context = None) -> int:
        """Open an envelope of either suite from ``src`` into ``dst``; returns the plaintext size.

        Suite 2 is decrypted segment by segment, each written only after its tag verifies;
        a bad stream raises InvalidCiphertext *after* the segments before the bad one were
        written, so write to a temporary file and keep it only when this returns. A suite-1
        envelope is read whole (it is one AES-GCM message). One audited operation.
        """
        ctx = plans.check_context(context)
        first, rest = stream.read_header(src)
        if first[3:4] != _SUITE_2:
            plain = self.decrypt(first + rest.drain(), ctx)
            stream.write_all(dst, memoryview(plain))
            return len(plain)
        return self._observe("decrypt_stream", ctx, stream.decrypt, self, first, rest, dst, ctx)

    def open_encrypted(self, src: str | os.PathLike[str] | IO[bytes], context: Context = None) -> stream.EncryptedFile:
        """A read-only, seekable binary file over a suite-2 envelope (a path, or a seekable binary
        file object holding the envelope from its offset 0) that decrypts only the segments a
        read touches. One audited operation.

        The key is unwrapped and the commitment and last segment checked here; a segment
        that fails its tag later raises InvalidCiphertext from that read.
        """
        ctx = plans.check_context(context)
        owned = isinstance(src, str | os.PathLike)
        fh: IO[bytes] = open(src, "rb") if isinstance(src, str | os.PathLike) else src  # noqa: SIM115
        try:
            return self._observe("open_encrypted", ctx, stream.open_file, self, fh, ctx, owned)
        except BaseException:
            if owned:
                fh.close()
            raise

    def inspect(self, data: EnvelopeInput) -> EnvelopeInfo:
        """The header of an envelope: version, classification, context, key references."""
        return EnvelopeInfo.of(data)

    def classification_of(self, data: EnvelopeInput) -> str:
        """``inspect(data).classification``, what an access check needs before a decrypt.

        Read from the decrypt plan of the envelope's prefix, kept or made now (the decrypt
        that follows uses it), where ``inspect`` parses the whole header every time.
        """
        raw = data if type(data) is bytes and not data.startswith(_TEXT_PREFIX) else envelope.coerce(data)
        if raw[3:4] != _SUITE_2:
            try:
                return self._plans.decrypt_plan(raw).policy.name
            except InvalidCiphertext:  # malformed, or naming a classification the policy lacks
                pass
        return EnvelopeInfo.of(raw).classification

    # ------------------------------------------------------------------ internals

    # The full route. A plan whose lane still has budget serves a cache hit here too (an
    # observed operation of a kind the lane does not know yet, or a strict one); otherwise
    # the keyring lends a key, and the plan keeps it as its lane when the cache lends a Budget.

    def _encrypt(self, plaintext: bytes, classification: str, context: Context) -> bytes:
        if type(plaintext) is not bytes:
            if not isinstance(plaintext, bytearray | memoryview):
                raise InvalidInput("plaintext must be bytes")
            plaintext = bytes(plaintext)
        if len(plaintext) > envelope.MAX_PLAINTEXT:
            raise InvalidInput("plaintext is too large for one envelope")
        plan = self._plans.encrypt_plan(classification, context)
        op = operation.current.get()
        if op is not None:
            _note_class(op, plan.policy, len(plaintext))
            op.context = plan.context  # checked, in plain str (the caller's may hold subclasses)
        lane = plan.lane
        aead = lane.budget.claim(len(plaintext)) if lane is not None else None
        if lane is not None and aead is not None:
            operation.note_cache(True)
            out = plan.seal(lane, aead, plaintext)
        else:
            data_key, budget = self._lend(plan.request, len(plaintext))
            if budget is None:  # not cached: this key seals this message only
                out = envelope.Sealer(data_key, header=plan.header).seal(plaintext)
                lane = None
            else:  # the Budget counted this first message
                lane = plan.lend(budget, data_key)
                out = plan.seal(lane, data_key.aead, plaintext)
        if op is not None:
            _note_keys(op, lane.key_refs if lane is not None else [w.key_ref for w in data_key.wrapped])
            op.lane = lane
        return out

    def _decrypt(self, data: EnvelopeInput, ctx: Mapping[str, str], unwrap: Unwrap) -> bytes:
        raw = data if type(data) is bytes and not data.startswith(_TEXT_PREFIX) else envelope.coerce(data)
        if raw[3:4] == _SUITE_2:
            return stream.decrypt_bytes(self, raw, ctx)
        plan = self._plans.decrypt_plan(raw)
        op = operation.current.get()
        if op is not None:
            _note_class(op, plan.policy, len(raw) - plan.body_start - envelope.TAG_SIZE)
            op.context = ctx
        error = plans.context_error(plan, ctx)
        if error is not None:
            raise error
        if op is not None:
            _note_keys(op, [w.key_ref for w in plan.wrapped])
        lane = plan.lane
        aead = lane.budget.claim(0) if lane is not None else None
        if lane is not None and aead is not None:
            operation.note_cache(True)
            out = plan.open(aead, raw)
        else:
            data_key, budget = unwrap(plan.wrapped, plan.request)
            out = plan.open_with(data_key, raw)
            # The commitment matched: this prefix opens with this key.
            lane = plan.lend(budget) if budget is not None else None
        if op is not None:
            op.lane = lane
        return out

    def _rewrap(self, data: EnvelopeInput, ctx: Mapping[str, str]) -> bytes:
        raw = envelope.coerce(data)
        if raw[3:4] == _SUITE_2:
            return stream.rewrap_bytes(self, raw, ctx)
        plan = self._plans.decrypt_plan(raw)
        op = operation.current.get()
        if op is not None:
            _note_class(op, plan.policy, len(raw) - plan.body_start - envelope.TAG_SIZE)
            op.context = ctx
        error = plans.context_error(plan, ctx)
        if error is not None:
            raise error
        # Authenticate before re-wrapping: rewrap must never launder a forged envelope.
        plan.open_with(self.keyring.unwrap(plan.wrapped, plan.request), raw)
        wrapped = self.keyring.rewrap(plan.wrapped, plan.request)
        if op is not None:
            _note_keys(op, [w.key_ref for w in wrapped])
        return envelope.replace_wrapped_keys(raw, wrapped)

    def _observe(self, name: str, context: Any, run: Callable[..., T], *args: Any) -> T:
        """Run ``run(*args)`` as one operation; with observers, tell them and refuse it if strict audit fails.

        The classification is recorded once the policy accepts it (see _note_class): an
        arbitrary string a caller passed must not reach audit records or metric labels;
        nor does an invalid context (a failed operation's is checked, see _checked). The
        operation stays kmsguard.operation.current while the observers are told, so one
        can relate what was noted under it (the OpenTelemetry bridge's KMS-call spans).
        """
        if not self.observers:
            return run(*args)
        op = Operation(name, None, _NO_CONTEXT, operation.principal.get() or self.principal)
        token = operation.current.set(op)
        try:
            try:
                result = run(*args)
            except BaseException as exc:
                op.context = _checked(context)
                op.finish(exc)
                self._notify(op.event())
                raise
            op.finish(None)
            event = op.event()
            self._notify(event)
        finally:
            operation.current.reset(token)
        if isinstance(op.lane, plans.Lane) and op.cache_hit and not op.kms_calls and not op.strict_audit:
            # The next operations of this kind are served by the lane, reported as this one was.
            items = None if name == "encrypt" else tuple(op.context.items())
            plans.bind_kind(op.lane, op.principal, event.kind, items)
        return result

    def _notify(self, event: OperationEvent) -> None:
        """Tell every observer. On a strict operation that succeeded, an observer's failure refuses it.

        The refusal is raised after every observer has been told; the observers after the
        one that failed see the operation refused (AUDIT_UNAVAILABLE), so metrics count it
        as the error the caller gets. Any other failure is logged and the result stands.
        """
        refusal: AuditUnavailable | None = None
        cause: Exception | None = None
        for observer in self.observers:
            try:
                observer.observe(event)
            except Exception as exc:
                if not (event.strict and event.outcome == "ok"):
                    _report(exc)
                    continue
                refusal = exc if isinstance(exc, AuditUnavailable) else AuditUnavailable()
                cause = None if refusal is exc else exc
                kind: EventKind = event.kind
                event = OperationEvent(
                    kind.refused(refusal.code),
                    event.started_at,
                    event.duration,
                    event.size,
                    event.request,
                    event.caller_id,
                )
        if refusal is not None:
            raise refusal from cause

    # ------------------------------------------------------------------ JSON fields (kmsguard.fields)
    # Thin delegates: the logic sits a layer above, in kmsguard.fields and kmsguard.blindindex.

    def protect(
        self,
        record: Any,
        fields: Mapping[str, Any] | None = None,
        context: Context = None,
        *,
        missing: str = "error",
        detect: bool = False,
        keep: Sequence[str] = (),
    ) -> Any:
        """A copy of a JSON record with the selected (or detected) values as ``kg1:`` tokens; see kmsguard.fields."""
        from kmsguard import fields as _fields

        return _fields.protect(self, record, fields, context, missing=missing, detect=detect, keep=keep)

    def unprotect(self, record: Any, context: Context = None, *, paths: Sequence[str] | None = None) -> Any:
        """A copy of a record with the tokens ``protect`` made restored to their values."""
        from kmsguard import fields as _fields

        return _fields.unprotect(self, record, context, paths=paths)

    def mask(self, record: Any, fields: Sequence[str], rules: Mapping[str, Any] | None = None) -> Any:
        """A copy of a record with the selected values irreversibly masked (no key is used)."""
        from kmsguard import fields as _fields

        return _fields.mask(record, fields, rules)

    def blind_index(
        self,
        value: str,
        classification: str,
        name: str,
        *,
        normalize: str | Sequence[str] | None = None,
        bits: int = 64,
    ) -> str:
        """A stable keyed hash of ``value`` for equality lookups on an encrypted field; see kmsguard.blindindex."""
        from kmsguard import blindindex

        return blindindex.compute(self, value, classification, name, normalize, bits)


def _note_class(op: Operation, cls: ClassPolicy, size: int) -> None:
    op.classification = cls.name
    op.strict_audit = cls.strict_audit
    op.size = size


def _note_keys(op: Operation, key_refs: Sequence[str]) -> None:
    for ref in key_refs:
        if ref not in op.key_refs:
            op.key_refs.append(ref)


def _report(error: BaseException) -> None:
    """An observer failed on an operation that is not strict: logged, the operation's result stands."""
    log.error("an observer failed: %r", error)


_TEXT_PREFIX = envelope.TEXT_PREFIX.encode("ascii")
_SUITE_2 = bytes((segments.SUITE,))
_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})


def utf8_of(text: str) -> bytes:
    """``text`` as UTF-8, or InvalidInput: what ``encrypt_text`` takes (a str that UTF-8 can
    encode: no lone surrogate). The message never quotes the text."""
    if not isinstance(text, str):
        raise InvalidInput("encrypt_text takes a str")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("the text cannot be encoded as UTF-8 (it holds a lone surrogate)") from None


def text_of(plain: bytes) -> str:
    """``plain`` as text, or InvalidInput: what ``decrypt_text`` answers for data that is not UTF-8."""
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the decrypted data is not UTF-8 text; use decrypt()") from None


def _decoded(token: str) -> EnvelopeInput:
    """The binary envelope of ``token``; ``token`` itself when it is not one (the full route
    refuses it as an audited operation)."""
    try:
        return envelope.from_text(token)
    except InvalidCiphertext:
        return token


def _checked(ctx: Any) -> Mapping[str, str]:
    """A failed operation's context as its record holds it (see check_context), or check_context's
    error for one the caller passed unchecked (see encrypt): an invalid context reaches no
    audit record or metric, as when it was checked before the operation."""
    try:
        return plans.check_context(ctx)
    except InvalidInput as bad:
        raise bad from None
