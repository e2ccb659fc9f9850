"""Guard: the one object an application holds to encrypt and decrypt classified data.

Guard is the only place where data keys (from a keyring) meet data (through the
envelope). Around every operation it applies the policy (which key, which context is
required), and reports an :class:`~kmsguard.operation.Operation` to its observers
(audit, metrics). It holds no mutable state of its own, so one Guard is shared by all
threads of a process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar, overload

from kmsguard import batch, envelope, fastpath, operation, plans
from kmsguard.config import Settings, load_settings
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import (
    AuditUnavailable,
    ContextMismatch,
    ContextRequired,
    InvalidCiphertext,
    InvalidInput,
    KmsGuardError,
    UnknownClassification,
)
from kmsguard.keyrings.base import KeyRequest, Keyring, sized_generate
from kmsguard.operation import Observer, Operation
from kmsguard.policy import ClassPolicy, Policy

T = TypeVar("T")
Context = Mapping[str, str] | None
EnvelopeInput = bytes | bytearray | memoryview | str
Unwrap = Callable[[Sequence[WrappedKey], KeyRequest], DataKey]


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

    @classmethod
    def of(cls, data: EnvelopeInput) -> EnvelopeInfo:
        raw = envelope.coerce(data)
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "suite": self.suite,
            "classification": self.classification,
            "context": self.context,
            "keys": self.keys,
            "size": self.size,
            "body_size": self.body_size,
        }


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
    ) -> None:
        self.policy = policy
        self.keyring = keyring
        self.observers = tuple(observers)
        self.principal = principal
        self.settings = settings
        self._generate = sized_generate(keyring)
        self._unwrap = keyring.unwrap
        self._encrypt_plans = plans.EncryptPlans(policy)
        self._decrypt_plans = plans.DecryptPlans(policy)
        #: A cache that lends its Budgets (CachingKeyring) lets cache hits take a lane.
        self._lease: Callable[[KeyRequest], tuple[DataKey, fastpath.Budget] | None] | None = getattr(
            keyring, "lease", None
        )
        # Cache hits take a lane, observed or not, if every observer takes hits in compact
        # form; with another observer every operation takes the full path.
        sinks = [o.hit_recorder() for o in self.observers if isinstance(o, operation.HitObserver)]
        self._lanes = fastpath.Lanes(
            observed=bool(self.observers),
            sinks=tuple(sink for sink in sinks if sink is not None),
            principal=principal,
            acting=operation.principal,
        )
        self._use_lanes = len(sinks) == len(self.observers)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Guard:
        return cls.from_settings(load_settings(env))

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        from kmsguard.stack import build_keyring, build_observers, build_telemetry

        telemetry = build_telemetry(settings)
        keyring = build_keyring(settings, telemetry)
        return cls(
            settings.policy,
            keyring,
            observers=build_observers(settings, keyring, telemetry),
            principal=settings.principal,
            settings=settings,
        )

    def close(self) -> None:
        """Flush and stop observers (the audit writer) and keyrings that hold resources."""
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
        if self._use_lanes:
            out = self._lanes.seal(plaintext, classification, context)
            if out is not None:
                return out
        if not self.observers:
            return self._encrypt(plaintext, classification, context)
        # A dict is checked by the plan lookup (a known plan's key is a checked context's
        # items; _encrypt records the plan's copy), or if the operation fails, by _observe:
        # an invalid one is refused unrecorded.
        ctx = context if type(context) is dict else plans.check_context(context)
        # The classification is recorded once the policy accepts it (_note_class): an
        # arbitrary string a caller passed must not reach audit records or metric labels.
        return self._observe("encrypt", ctx, self._encrypt, plaintext, classification, ctx)

    def decrypt(self, data: EnvelopeInput, context: Context = None) -> bytes:
        """Open an envelope (binary or ``kg1:`` text).

        Every pair in ``context`` must match the header (else ContextMismatch), and the
        classification's required keys must be among them: a caller states why it
        decrypts payment data as it did when encrypting.
        """
        if type(data) is bytes and self._use_lanes:
            plain = self._lanes.open(data, context)
            if plain is not None:
                return plain
        if not self.observers:  # the caller's context is checked against the header (_check_context)
            return self._decrypt(data, _mapping(context), self._unwrap)
        ctx = plans.check_context(context)
        return self._observe("decrypt", ctx, self._decrypt, data, ctx, self._unwrap)

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
        unwrap = batch.UnwrapOnce(self.keyring)

        def one(data: EnvelopeInput) -> bytes:
            if not self.observers:
                return self._decrypt(data, ctx, unwrap)
            return self._observe("decrypt", ctx, self._decrypt, data, ctx, unwrap)

        return batch.settle(one, envelopes, max_concurrency)

    def encrypt_text(self, text: str, classification: str, context: Context = None) -> str:
        """``encrypt`` for text: UTF-8 in, ``kg1:`` token out (for columns and JSON)."""
        if not isinstance(text, str):
            raise InvalidInput("encrypt_text takes a str")
        return envelope.to_text(self.encrypt(text.encode("utf-8"), classification, context))

    def decrypt_text(self, token: str, context: Context = None) -> str:
        """``decrypt`` for a token made by ``encrypt_text``."""
        plain = self.decrypt(token, context)
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("the decrypted data is not UTF-8 text; use decrypt()") from None

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

    def inspect(self, data: EnvelopeInput) -> EnvelopeInfo:
        """The header of an envelope: version, classification, context, key references."""
        return EnvelopeInfo.of(data)

    # ------------------------------------------------------------------ internals

    # The two hot paths: with a cached data key and no observers, each costs a plan
    # lookup, a cache lookup and AES-GCM (see kmsguard.plans).

    def _encrypt(self, plaintext: bytes, classification: str, context: Context) -> bytes:
        if type(plaintext) is not bytes:
            if not isinstance(plaintext, bytearray | memoryview):
                raise InvalidInput("plaintext must be bytes")
            plaintext = bytes(plaintext)
        plan = self._encrypt_plans.get(classification, context)
        op = operation.current.get()
        if op is not None:
            self._note_class(op, plan.policy, len(plaintext))
            op.context = plan.context  # checked, in plain str (the caller's may hold subclasses)
        data_key = self._generate(plan.request, len(plaintext))
        if op is not None:
            self._note_keys(op, data_key.wrapped)
        sealer = envelope.Sealer(data_key, header=plan.header)
        out = sealer.seal(plaintext)
        if self._lease is not None:
            lease = self._lease(plan.request)
            if lease is not None and lease[0] is data_key:
                key = (classification, tuple(context.items()) if context else ())
                lane = self._lanes.encrypt.get(key)
                if lane is None or lane.budget is not lease[1]:
                    lane = fastpath.EncryptLane(lease[1], sealer.out_prefix, sealer.aad_prefix)
                    self._lanes.bind_encrypt(key, lane)
                if op is not None:
                    op.lane = lane
        return out

    def _decrypt(self, data: EnvelopeInput, ctx: Mapping[str, str], unwrap: Unwrap) -> bytes:
        raw = data if type(data) is bytes and not data.startswith(_TEXT_PREFIX) else envelope.coerce(data)
        plan = self._decrypt_plans.get(raw)
        op = operation.current.get()
        if op is not None:
            self._note_class(op, plan.policy, len(raw) - plan.body_start - envelope.TAG_SIZE)
        if ctx or plan.policy.required_context:
            self._check_context(plan.policy, plan.context, ctx)
        data_key = unwrap(plan.wrapped, plan.request)
        if op is not None:
            self._note_keys(op, plan.wrapped)
        nonce = raw[plan.prefix_len : plan.body_start]
        body = memoryview(raw)[plan.body_start :]
        out = envelope.open_body(data_key, plan.commitment, nonce, body, plan.aad_prefix + nonce)
        if self._lease is not None:  # the commitment matched: this prefix opens with this key
            lease = self._lease(plan.request)
            if lease is not None and lease[0] is data_key:
                prefix = raw[: plan.prefix_len]
                lane = self._lanes.decrypt.get(prefix)
                if lane is None or lane.budget is not lease[1]:
                    required = tuple(plan.policy.required_context)
                    lane = fastpath.DecryptLane(
                        lease[1], plan.context, required, plan.aad_prefix, plan.prefix_len, plan.body_start
                    )
                    self._lanes.bind_decrypt(prefix, lane)
                if op is not None:
                    op.lane = lane
        return out

    def _rewrap(self, data: EnvelopeInput, ctx: Mapping[str, str]) -> bytes:
        raw = envelope.coerce(data)
        env = envelope.parse(raw)
        cls = self._class_of(env)
        op = operation.current.get()
        if op is not None:
            self._note_class(op, cls, env.plaintext_size)
        self._check_context(cls, env.context, ctx)
        request = self.policy.request(cls, env.context)
        # Authenticate before re-wrapping: rewrap must never launder a forged envelope.
        envelope.unseal(self.keyring.unwrap(env.wrapped_keys, request), env)
        wrapped = self.keyring.rewrap(env.wrapped_keys, request)
        if op is not None:
            self._note_keys(op, wrapped)
        return envelope.replace_wrapped_keys(raw, wrapped)

    def _class_of(self, env: envelope.Envelope) -> ClassPolicy:
        """An envelope naming no configured classification is as bad as a tampered one."""
        try:
            return self.policy.get(env.classification)
        except UnknownClassification:
            raise InvalidCiphertext() from None

    @staticmethod
    def _check_context(cls: ClassPolicy, header_context: Mapping[str, str], ctx: Mapping[str, str]) -> None:
        """Every pair the caller gives must match the header; the class's required keys must be given.

        A pair that matches a header pair is two strings, so types need checking only on
        a mismatch: the hot path validates the caller's context here, in one pass.
        """
        for key, value in ctx.items():
            if header_context.get(key, _ABSENT) != value:
                if not isinstance(key, str) or not isinstance(value, str):
                    raise InvalidInput("context keys and values must be strings")
                raise ContextMismatch(f"context key {key!r} does not match the ciphertext")
        for key in cls.required_context:
            if key not in ctx:
                missing = sorted(cls.required_context.difference(ctx))
                raise ContextRequired(
                    f"classification {cls.name!r} requires context keys at decrypt: {', '.join(missing)}"
                )

    def _observe(self, name: str, ctx: Mapping[str, str], run: Callable[..., T], *args: Any) -> T:
        """Run ``run(*args)`` as one operation; with observers, record it and let strict audit veto it.

        The classification is recorded once the policy accepts it (see _note_class)."""
        if not self.observers:
            return run(*args)
        op = Operation(name, None, ctx, operation.principal.get() or self.principal)
        token = operation.current.set(op)
        try:
            result = run(*args)
        except BaseException as exc:
            op.context = _checked(ctx)
            op.finish(exc)
            self._notify(op)
            raise
        finally:
            operation.current.reset(token)
        op.finish(None)
        self._notify(op)
        if op.lane is not None and op.cache_hit and not op.kms_calls and not op.strict_audit:
            self._bind_kind(op)
        return result

    def _bind_kind(self, op: Operation) -> None:
        """Let the next operations of this kind be recorded as hits (see kmsguard.operation.HitKind)."""
        lane = op.lane
        if isinstance(lane, fastpath.EncryptLane):
            fastpath.bind_kind(lane, op.principal, operation.HitKind(op))
        elif isinstance(lane, fastpath.DecryptLane):
            fastpath.bind_kind(lane, (op.principal, tuple(op.context.items())), operation.HitKind(op))

    def _notify(self, op: Operation) -> None:
        """Tell every observer; a strict operation whose record could not be made durable fails.

        The veto is raised only after all observers have seen the operation, marked as
        refused, so metrics count a refused operation as the error the caller gets.
        """
        veto: AuditUnavailable | None = None
        for observer in self.observers:
            try:
                observer.operation_finished(op)
            except KmsGuardError as exc:
                if op.strict_audit and op.outcome == "ok":
                    veto = exc if isinstance(exc, AuditUnavailable) else AuditUnavailable()
                    op.outcome, op.error_code = "error", veto.code
        if veto is not None:
            raise veto

    @staticmethod
    def _note_class(op: Operation, cls: ClassPolicy, size: int) -> None:
        op.classification = cls.name
        op.strict_audit = cls.strict_audit
        op.size = size

    @staticmethod
    def _note_keys(op: Operation, wrapped: Sequence[Any]) -> None:
        for w in wrapped:
            if w.key_ref not in op.key_refs:
                op.key_refs.append(w.key_ref)

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


_TEXT_PREFIX = envelope.TEXT_PREFIX.encode("ascii")
_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})
#: What a header lacks a key as; equal to nothing a caller can pass (None included).
_ABSENT = object()


def _checked(ctx: Mapping[str, str]) -> Mapping[str, str]:
    """A failed operation's context as its record holds it (see check_context), or check_context's
    error for one the caller passed unchecked (see encrypt): an invalid context reaches no
    audit record or metric, as when it was checked before the operation."""
    try:
        return plans.check_context(ctx)
    except InvalidInput as bad:
        raise bad from None


def _mapping(context: Context) -> Mapping[str, str]:
    if context is None:
        return _NO_CONTEXT
    if type(context) is not dict and not isinstance(context, Mapping):  # the ABC check costs ~0.1 us
        raise InvalidInput("context must be a mapping of str to str")
    return context
