"""Emulated multi-region keys (``mrk-``) for the local regions.

Why emulate: moto 5.2 writes the key id into a fixed 36-byte field of its ciphertext
format, and its multi-region key ids (``mrk-`` + a dashed UUID) are 40 characters, so a
ciphertext made under an ``mrk-`` key fails to decrypt in moto even in its own region.
Separate moto processes (one per region, so that an outage is real) also share no key
material, so a real replica cannot exist across them.

How: :func:`create_multi_region_key` creates an ordinary symmetric key in the *primary*
region's moto process; that key holds the material every replica shares, as AWS keeps
replicas' material in sync. Its multi-region id is ``mrk-`` + the key's UUID without
dashes (36 characters, the shape real AWS uses). Each region's proxy is given a
:class:`ReplicaRouter`: a request naming that ``mrk-`` key (bare id or ARN in any region)
is sent to the primary's moto process with the key ARN and the signature's region scope
rewritten (moto does not check signatures), and the response's key ids and ARNs are
rewritten back to the ``mrk-`` ARN *in the region that was asked*, with ``MultiRegion``
set. So GenerateDataKey, Encrypt, Decrypt, ReEncrypt and DescribeKey behave as KMS does
for replicas: every region returns its own ARN, and a ciphertext made in one region
decrypts in any other.

What stays real: each region's endpoint is its own proxy, so an outage of the primary
region (``refuse`` or ``blackhole`` on its proxy) is an outage for the code under test,
while the other regions keep serving its ``mrk-`` ciphertexts. What is emulated: where
the shared material lives (the primary's moto process, reached proxy-to-moto, which
stands in for AWS's internal replication). ``ReEncrypt`` between an ``mrk-`` key and an
ordinary key of another region is not supported.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from kmsguard.testing.region import KmsRegion

_KEY_FIELDS = ("KeyId", "SourceKeyId", "DestinationKeyId")
_MRK_RE = re.compile(r"mrk-[0-9a-f]{32}")
_SCOPE_RE = re.compile(r"(Credential=[^/]+/\d{8}/)([a-z0-9-]+)(/kms/)")


@dataclass(frozen=True)
class Replica:
    """Where an emulated multi-region key's material lives: a key in the primary's moto."""

    mrk_id: str
    primary_region: str
    backing_arn: str
    upstream: tuple[str, int]

    @property
    def backing_id(self) -> str:
        return self.backing_arn.rpartition("/")[2]

    def arn_in(self, region: str) -> str:
        account = self.backing_arn.split(":")[4]
        return f"arn:aws:kms:{region}:{account}:key/{self.mrk_id}"


@dataclass(frozen=True)
class Routed:
    """A rewritten request and how to restore its response."""

    upstream: tuple[str, int]
    body: bytes
    headers: dict[str, str]
    restore: Callable[[bytes], bytes]


class ReplicaRouter:
    """Per proxy (per region): sends requests for emulated ``mrk-`` keys to their material."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._replicas: dict[str, Replica] = {}
        self._lock = threading.Lock()

    def add(self, replica: Replica) -> None:
        with self._lock:
            self._replicas[replica.mrk_id] = replica

    def route(self, body: bytes, headers: dict[str, str]) -> Routed | None:
        """The rewritten request when it names an emulated key, else None (forward as is)."""
        with self._lock:
            if not self._replicas:
                return None
            replicas = dict(self._replicas)
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        replica = None
        for name in _KEY_FIELDS:
            value = doc.get(name)
            match = _MRK_RE.search(value) if isinstance(value, str) else None
            if match and match[0] in replicas:
                replica = replicas[match[0]]
                doc[name] = replica.backing_arn
        if replica is None:
            return None
        out_headers = dict(headers)
        for name, value in headers.items():
            if name.lower() == "authorization":
                out_headers[name] = _SCOPE_RE.sub(rf"\g<1>{replica.primary_region}\g<3>", value)
        found = replica

        def restore(payload: bytes) -> bytes:
            try:
                answer = json.loads(payload)
            except ValueError:
                return payload
            return json.dumps(_rewrite(answer, found, self.region)).encode()

        return Routed(replica.upstream, json.dumps(doc).encode(), out_headers, restore)


def _rewrite(value: Any, replica: Replica, region: str) -> Any:
    """Backing key id/ARN -> the ``mrk-`` id/ARN in ``region``, everywhere in a response."""
    if isinstance(value, dict):
        out = {k: _rewrite(v, replica, region) for k, v in value.items()}
        if "KeyManager" in out and out.get("KeyId") == replica.mrk_id:  # DescribeKey's KeyMetadata
            out["MultiRegion"] = True
        return out
    if isinstance(value, list):
        return [_rewrite(v, replica, region) for v in value]
    if value == replica.backing_arn:
        return replica.arn_in(region)
    if value == replica.backing_id:
        return replica.mrk_id
    return value


def create_multi_region_key(primary: KmsRegion, replicas: Sequence[KmsRegion] = (), **kwargs: Any) -> str:
    """An emulated multi-region key: its ``mrk-`` ARN in ``primary``, usable in every region given.

    The returned ARN is the primary's; ``KeyArn.parse(arn).in_region(r)`` (or the
    keyring's own translation) names the replica in region ``r``.
    """
    backing_arn = primary.create_key(**kwargs)
    parts = urlsplit(primary.server.url)
    assert parts.hostname is not None and parts.port is not None
    replica = Replica(
        mrk_id="mrk-" + backing_arn.rpartition("/")[2].replace("-", ""),
        primary_region=primary.name,
        backing_arn=backing_arn,
        upstream=(parts.hostname, parts.port),
    )
    for region in (primary, *replicas):
        if region.proxy.router is None:
            region.proxy.router = ReplicaRouter(region.name)
        region.proxy.router.add(replica)
    return replica.arn_in(primary.name)
