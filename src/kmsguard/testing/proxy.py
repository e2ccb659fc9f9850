"""A fault-injecting HTTP proxy between botocore and a local KMS endpoint (moto's server).

moto answers KMS calls over real HTTP but never throttles, never fails with a 5xx,
and lets disabled or pending-deletion keys keep working. This proxy sits on loopback
between botocore and moto and makes those failures happen for real, so retries,
timeouts, error mapping and failover are exercised through botocore's own HTTP stack:

* ``throttle(rate=..., count=...)`` answers ``400 ThrottlingException`` (kmsguard's
  retry policy sees a throttle, backs off and retries until the deadline);
* ``inject(code, api=..., key_id=..., status=...)`` any KMS error, optionally only for
  one API and/or one key (``DisabledException``, ``KMSInvalidStateException``...); a
  query-protocol request (STS: ``api="GetCallerIdentity"``, ``"AssumeRole"``) gets the
  error in that protocol's XML (``ExpiredToken``, ``InvalidClientTokenId``...);
* ``server_error(status=500)``, ``reset()`` (TCP reset), ``stall(seconds)`` (accept and
  read the request, then say nothing);
* ``latency(seconds)`` before every forwarded request;
* ``outage("refuse")`` closes the port (connection refused), ``outage("blackhole")``
  keeps a full, never-accepting listener so connects hang until the client's connect
  timeout, ``outage("silent")`` keeps accepting connections and reading requests but
  never answers one (a network partition behind a load balancer, a stuck service: the
  client's read timeout is what ends the wait); ``restore()`` ends any of them.

Rules take ``count`` (the next N matching requests) or ``rate`` (a probability, from a
seeded generator so runs repeat), or neither (every matching request). The proxy
counts requests per KMS API (``counts``) and remembers which access key signed each
one (``access_keys``) and keeps recent request bodies (``requests``), so a test can prove
which credentials and parameters reached KMS.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from kmsguard.testing.replicas import ReplicaRouter

_AKID_RE = re.compile(r"Credential=([A-Za-z0-9]+)/")
_KEY_FIELDS = ("KeyId", "SourceKeyId", "DestinationKeyId")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}

OutageMode = Literal["refuse", "blackhole", "silent"]


@dataclass
class Rule:
    """One injected fault. ``remaining`` counts down when set; ``rate`` is a probability."""

    kind: Literal["error", "reset", "stall"]
    api: str | None = None
    key_id: str | None = None
    remaining: int | None = None
    rate: float | None = None
    status: int = 400
    code: str = ""
    message: str = ""
    seconds: float = 0.0

    def applies(self, api: str, key_ids: tuple[str, ...]) -> bool:
        if self.api is not None and self.api != api:
            return False
        return self.key_id is None or any(self.key_id in k for k in key_ids)


class SeenRequest(NamedTuple):
    """One request the proxy received: the KMS API, its JSON body and its headers (``r[0]``, ``r[1]`` too)."""

    api: str
    body: dict[str, Any]
    headers: dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def do_POST(self) -> None:
        self.proxy._handle(self)

    do_GET = do_POST
    do_PUT = do_POST
    do_DELETE = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: request lines would only clutter test output."""


class FaultProxy:
    """A threaded loopback HTTP proxy to ``upstream`` with injectable faults.

    ``FaultProxy(upstream).start()``; ``url`` is what botocore's ``endpoint_url`` (or
    ``AWS_ENDPOINT_URL_KMS``) points at. Thread-safe; ``stop()`` closes everything.
    """

    def __init__(self, upstream: str, host: str = "127.0.0.1", seed: int = 1234) -> None:
        parts = urlsplit(upstream)
        if not parts.hostname or not parts.port:
            raise ValueError("upstream must be an http://host:port URL")
        self.upstream = (parts.hostname, parts.port)
        self.host = host
        self.port = 0
        self.counts: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.access_keys: list[str] = []
        #: The most recent requests, to check what was sent (test use only: bodies hold data keys).
        self.requests: deque[SeenRequest] = deque(maxlen=1000)
        #: Rewrites requests for emulated multi-region keys (kmsguard.testing.replicas).
        self.router: ReplicaRouter | None = None
        self._rules: list[Rule] = []
        self._latency = 0.0
        self._rng = random.Random(seed)  # noqa: S311 - repeatable fault rates, not security
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._blackhole: list[socket.socket] = []
        self._stopping = threading.Event()
        self._silent = threading.Event()
        self._local = threading.local()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._listen()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._close_listener()
        self._close_blackhole()
        self._drop_connections()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ controls

    def throttle(self, *, rate: float | None = None, count: int | None = None, api: str | None = None) -> Rule:
        """Answer ThrottlingException (400), as KMS does when a request quota is exceeded."""
        return self.inject("ThrottlingException", api=api, rate=rate, count=count, message="Rate exceeded")

    def inject(
        self,
        code: str,
        *,
        api: str | None = None,
        key_id: str | None = None,
        status: int = 400,
        rate: float | None = None,
        count: int | None = None,
        message: str = "injected by kmsguard.testing",
    ) -> Rule:
        """Answer a KMS JSON error ``code`` with ``status`` instead of forwarding."""
        return self._add(Rule("error", api, key_id, count, rate, status=status, code=code, message=message))

    def server_error(
        self, status: int = 500, *, api: str | None = None, rate: float | None = None, count: int | None = None
    ) -> Rule:
        """A 5xx from the service (botocore retries these)."""
        code = "KMSInternalException" if status == 500 else "ServiceUnavailableException"
        return self.inject(code, api=api, status=status, rate=rate, count=count, message="internal error")

    def reset(self, *, api: str | None = None, rate: float | None = None, count: int | None = None) -> Rule:
        """Read the request, then reset the TCP connection (RST, no response)."""
        return self._add(Rule("reset", api, None, count, rate))

    def stall(
        self, seconds: float, *, api: str | None = None, rate: float | None = None, count: int | None = None
    ) -> Rule:
        """Read the request, then send nothing for ``seconds`` and close (past any read timeout)."""
        return self._add(Rule("stall", api, None, count, rate, seconds=seconds))

    def latency(self, seconds: float) -> None:
        """Delay every forwarded request by ``seconds``."""
        self._latency = seconds

    def outage(self, mode: OutageMode = "refuse") -> None:
        """Stop serving: refuse connections, blackhole them (connects hang), or go silent (requests hang)."""
        if mode == "silent":
            self._silent.set()
            return
        self._close_listener()
        self._drop_connections()
        if mode == "blackhole":
            self._open_blackhole()

    def restore(self) -> None:
        """End an outage: accept connections on the same port again (and answer the requests that come)."""
        self._silent.clear()
        self._close_blackhole()
        if self._listener is None:
            self._listen()

    def clear(self) -> None:
        """Remove every rule and the latency; counters are kept."""
        with self._lock:
            self._rules.clear()
        self._latency = 0.0

    def last(self, api: str) -> SeenRequest:
        """The most recent request for ``api``; KeyError when there was none."""
        with self._lock:
            for seen in list(self.requests)[::-1]:
                if seen.api == api:
                    return seen
        raise KeyError(api)

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.statuses.clear()
            self.access_keys.clear()
            self.requests.clear()

    # ------------------------------------------------------------------ sockets

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept_loop, args=(sock,), name="kms-proxy-accept", daemon=True).start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, addr = listener.accept()
            except OSError:
                return
            # The handler writes headers and body separately: without NODELAY, Nagle's
            # algorithm meets the client's delayed ACK and every response waits for its timer.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, addr), name="kms-proxy-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        handler_cls = type("Handler", (_Handler,), {"proxy": self})
        try:
            handler_cls(conn, addr, None)
        except OSError:
            pass
        finally:
            upstream = getattr(self._local, "conn", None)
            if upstream is not None:
                upstream.close()
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _close_listener(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
            sock.close()

    def _drop_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _open_blackhole(self) -> None:
        """A listener whose accept queue is full: the kernel drops new SYNs, so connects hang."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(0)
        fillers = []
        for _ in range(2):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((self.host, self.port))
            fillers.append(filler)
        time.sleep(0.05)  # let the fillers' handshakes land in the queue
        self._blackhole = [sock, *fillers]

    def _close_blackhole(self) -> None:
        socks, self._blackhole = self._blackhole, []
        for sock in socks:
            sock.close()

    # ------------------------------------------------------------------ requests

    def _pick(self, api: str, key_ids: tuple[str, ...]) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if not rule.applies(api, key_ids):
                    continue
                if rule.rate is not None and self._rng.random() >= rule.rate:
                    continue
                if rule.remaining is not None:
                    if rule.remaining <= 0:
                        continue
                    rule.remaining -= 1
                return rule
        return None

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _handle(self, h: _Handler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        target = h.headers.get("X-Amz-Target")
        if target:  # KMS: JSON 1.1 protocol
            api, doc = target.rpartition(".")[2], _json(body)
        else:  # STS and other query-protocol services: a form body naming the Action
            doc = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
            api = doc.get("Action", "-")
        key_ids = tuple(str(doc[f]) for f in _KEY_FIELDS if f in doc)
        akid = _AKID_RE.search(h.headers.get("Authorization") or "")
        with self._lock:
            self.counts[api] += 1
            self.requests.append(SeenRequest(api, doc, dict(h.headers.items())))
            if akid:
                self.access_keys.append(akid[1])
        if self._silent.is_set():
            while self._silent.is_set() and not self._stopping.wait(0.05):
                pass  # requests held during the outage are never answered
            h.close_connection = True
            return
        if self._latency:
            self._stopping.wait(self._latency)
        rule = self._pick(api, key_ids)
        if rule is None:
            status, headers, payload = self._forward(h, body)
        elif rule.kind == "reset":
            h.close_connection = True
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            return
        elif rule.kind == "stall":
            self._stopping.wait(rule.seconds)
            h.close_connection = True
            return
        elif target:
            status, headers, payload = _kms_error(rule.status, rule.code, rule.message)
        else:  # STS and the other query-protocol services answer errors in XML
            status, headers, payload = _query_error(rule.status, rule.code, rule.message)
        with self._lock:
            self.statuses[status] += 1
        h.send_response(status)
        for name, value in headers:
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _forward(self, h: _Handler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
        routed = self.router.route(body, headers) if self.router is not None else None
        if routed is not None:  # an emulated multi-region key: see kmsguard.testing.replicas
            direct = http.client.HTTPConnection(*routed.upstream, timeout=60)
            try:
                direct.request(h.command, h.path, body=routed.body, headers=routed.headers)
                resp = direct.getresponse()
                kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                return resp.status, kept, routed.restore(resp.read())
            except (OSError, http.client.HTTPException):
                return _kms_error(502, "BadGateway", "the upstream KMS endpoint is unreachable")
            finally:
                direct.close()
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(*self.upstream, timeout=60)
            try:
                conn.request(h.command, h.path, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                return resp.status, kept, payload
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    break
        return _kms_error(502, "BadGateway", "the upstream KMS endpoint is unreachable")


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _query_error(status: int, code: str, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """The XML error shape of the query protocol (STS's), so botocore reads its code as from AWS."""
    request_id = str(uuid.uuid4())
    payload = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"</Error><RequestId>{request_id}</RequestId></ErrorResponse>"
    ).encode()
    return status, [("Content-Type", "text/xml"), ("x-amzn-RequestId", request_id)], payload


def _kms_error(status: int, code: str, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """The JSON 1.1 error shape KMS uses, so botocore parses and classifies it as real."""
    payload = json.dumps({"__type": code, "message": message}).encode()
    return status, [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-RequestId", str(uuid.uuid4()))], payload
