"""API v1 over real HTTP against `kmsguard serve`, on the local backend and on AWS (moto behind the fault proxy)."""

from __future__ import annotations

import base64
import collections
import json
import re
import socket
import time

import httpx
import pytest

from kmsguard.audit import AuditRecord

from .conftest import Service, kmsguard_cli


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "retryable"}
    assert body["error"]["code"] == code
    return str(body["error"]["message"])


def test_encrypt_decrypt_round_trip_text_and_binary(service: Service) -> None:
    with service.client() as c:
        r = c.post("/v1/encrypt", json={"classification": "pii", "context": {"user": "42"}, "plaintext": "Zoë"})
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        assert token.startswith("kg1:")
        assert c.post("/v1/decrypt", json={"token": token, "context": {"user": "42"}}).json() == {"plaintext": "Zoë"}
        binary = bytes(range(256))
        b64 = base64.b64encode(binary).decode()
        r = c.post("/v1/encrypt", json={"classification": "general", "plaintext_b64": b64})
        opened = c.post("/v1/decrypt", json={"token": r.json()["token"]}).json()
        assert set(opened) == {"plaintext_b64"} and base64.b64decode(opened["plaintext_b64"]) == binary


def test_kmsguard_errors_answer_their_status(service: Service) -> None:
    with service.client() as c:
        body = {"classification": "pii", "context": {"user": "1"}, "plaintext": "x"}
        token = c.post("/v1/encrypt", json=body).json()["token"]
        _error(c.post("/v1/decrypt", json={"token": token, "context": {"user": "2"}}), 400, "CONTEXT_MISMATCH")
        tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        message = _error(c.post("/v1/decrypt", json={"token": tampered}), 400, "INVALID_CIPHERTEXT")
        assert message == "invalid ciphertext"
        _error(c.post("/v1/decrypt", json={"token": "kg1:nonsense"}), 400, "INVALID_CIPHERTEXT")
        _error(c.post("/v1/encrypt", json={"classification": "payment", "plaintext": "4111"}), 400, "CONTEXT_REQUIRED")
        _error(c.post("/v1/encrypt", json={"classification": "nope", "plaintext": "x"}), 400, "UNKNOWN_CLASSIFICATION")
        both = {"classification": "general", "plaintext": "x", "plaintext_b64": "eA=="}
        assert "plaintext" in _error(c.post("/v1/encrypt", json=both), 400, "INVALID_INPUT")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"plaintext": "x"}, "classification"),
        ({"classification": 5, "plaintext": "x"}, "classification"),
        ({"classification": "general", "plaintext": "x", "context": {"a": 1}}, "context.a"),
        ({"classification": "general", "plaintext": "x", "plantext": "typo"}, "plantext"),
        ([1, 2], "body"),
    ],
)
def test_malformed_bodies_are_400_naming_the_field(local_service: Service, body: object, field: str) -> None:
    with local_service.client() as c:
        message = _error(c.post("/v1/encrypt", json=body), 400, "INVALID_INPUT")
        assert message.startswith(field)


def test_batch_bodies_are_checked_as_single_ones_are(local_service: Service) -> None:
    """The batch routes parse their bodies themselves (one pass): the same 400s, naming the field."""
    json_type = {"content-type": "application/json"}
    item = {"classification": "general", "plaintext": "x"}
    with local_service.client() as c:
        for path in ("/v1/encrypt/batch", "/v1/decrypt/batch"):
            assert _error(c.post(path, content=b'{"items": [', headers=json_type), 400, "INVALID_INPUT") == (
                "body: not valid JSON"
            )
            _error(c.post(path, content=b'{"items": []}', headers={"content-type": "text/plain"}), 400, "INVALID_INPUT")
            assert _error(c.post(path, content=b"", headers=json_type), 400, "INVALID_INPUT").startswith("body")
            assert _error(c.post(path, json={"itemz": []}), 400, "INVALID_INPUT").startswith("items")
            deep = b'{"items": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
            _error(c.post(path, content=deep, headers=json_type), 400, "INVALID_INPUT")
        bad = c.post("/v1/encrypt/batch", json={"items": [item, {**item, "plaintext": 5}]})
        assert _error(bad, 400, "INVALID_INPUT") == "items[1].plaintext: must be a string"
        typo = c.post("/v1/decrypt/batch", json={"items": [{"tokn": "kg1:x"}]})
        assert _error(typo, 400, "INVALID_INPUT").startswith("items[0]")
        with_charset = {"content-type": "application/json; charset=utf-8"}
        assert c.post("/v1/encrypt/batch", json={"items": [item]}, headers=with_charset).status_code == 200


def test_not_json_wrong_type_404_405(local_service: Service) -> None:
    with local_service.client() as c:
        bad = c.post("/v1/encrypt", content=b'{"classification": ', headers={"content-type": "application/json"})
        assert _error(bad, 400, "INVALID_INPUT") == "body: not valid JSON"
        text = c.post("/v1/encrypt", content=b"plaintext=x", headers={"content-type": "text/plain"})
        _error(text, 400, "INVALID_INPUT")
        deep = b'{"token": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
        _error(c.post("/v1/decrypt", content=deep, headers={"content-type": "application/json"}), 400, "INVALID_INPUT")
        _error(c.get("/v2/encrypt"), 404, "NOT_FOUND")
        _error(c.get("/v1/encrypt"), 405, "METHOD_NOT_ALLOWED")


#: A body of each route's shape, over the default 1 MiB limit, cut in 64 KiB pieces.
OVERSIZED = {
    "/v1/encrypt": [b'{"classification": "general", "plaintext": "', *[b"a" * 65536] * 40, b'"}'],
    "/v1/encrypt/batch": [
        b'{"items": [', *[b'{"classification": "general", "plaintext": "' + b"a" * 65000 + b'"},'] * 40,
        b'{"classification": "general", "plaintext": "a"}]}',
    ],
    "/v1/decrypt/batch": [b'{"items": [', *[b'{"token": "kg1:' + b"A" * 65000 + b'"},'] * 40, b'{"token": "kg1:A"}]}'],
}


@pytest.mark.parametrize("path", list(OVERSIZED))
def test_body_over_the_limit_is_413_with_or_without_content_length(local_service: Service, path: str) -> None:
    """Declared too long: refused before a byte is read. Chunked (no Content-Length): cut where
    it passes the limit; the batch routes read their bodies themselves, and must answer 413 too."""
    pieces = OVERSIZED[path]
    headers = {"content-type": "application/json"}
    with local_service.client() as c:
        _error(c.post(path, content=b"".join(pieces), headers=headers), 413, "REQUEST_TOO_LARGE")

        def chunks():  # type: ignore[no-untyped-def]
            yield from pieces

        _error(c.post(path, content=chunks(), headers=headers), 413, "REQUEST_TOO_LARGE")
        assert c.get("/healthz").status_code == 200  # the connection pool and the server are fine
    assert "ClientDisconnect" not in local_service.process.log()


def test_a_huge_declared_body_is_refused_without_waiting_for_it(local_service: Service) -> None:
    """100 MiB declared, 4 KiB sent, the connection left open: the 413 comes at once (a server
    that read the body first would wait here for the other 100 MiB until the socket timed out)."""
    url = httpx.URL(local_service.url)
    head = (
        f"POST /v1/encrypt HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Authorization: Bearer {local_service.tokens['app']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {100 << 20}\r\n\r\n"
    ).encode("ascii")
    with socket.create_connection((url.host, url.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(head + b'{"classification": "general", "plaintext": "' + b"a" * 4096)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _content_length(answer):
            chunk = sock.recv(65536)  # a timeout here (5 s) fails the test
            assert chunk, f"the connection closed before the answer was whole: {answer!r}"
            answer += chunk
        elapsed = time.monotonic() - started
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413 "), status_line
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "REQUEST_TOO_LARGE" and body["error"]["retryable"] is False
    assert elapsed < 2, f"the 413 took {elapsed:.1f} s"


def _content_length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30  # not yet known: read on


def test_batches_answer_in_order_with_item_errors(service: Service) -> None:
    items = [
        {"classification": "general", "plaintext": "a"},
        {"classification": "payment", "plaintext": "b"},  # no purpose: its own error
        {"classification": "payment", "context": {"purpose": "refund"}, "plaintext": "c"},
        {"classification": "pii", "plaintext_b64": "not base64!"},
        {"classification": "pii", "context": {"u": "1"}, "plaintext_b64": base64.b64encode(b"\xff\x00").decode()},
    ]
    with service.client() as c:
        r = c.post("/v1/encrypt/batch", json={"items": items})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [next(iter(x)) for x in results] == ["token", "error", "token", "error", "token"]
        assert results[1]["error"]["code"] == "CONTEXT_REQUIRED"
        assert results[3]["error"]["code"] == "INVALID_INPUT"
        tokens = [results[0]["token"], results[2]["token"], "kg1:broken", results[4]["token"]]
        contexts = [None, {"purpose": "refund"}, None, {"u": "1"}]
        pairs = zip(tokens, contexts, strict=True)
        decrypt_items = [{"token": t, "context": ctx} if ctx else {"token": t} for t, ctx in pairs]
        opened = c.post("/v1/decrypt/batch", json={"items": decrypt_items}).json()["results"]
        assert opened[0] == {"plaintext": "a"} and opened[1] == {"plaintext": "c"}
        assert opened[2]["error"]["code"] == "INVALID_CIPHERTEXT"
        assert base64.b64decode(opened[3]["plaintext_b64"]) == b"\xff\x00"


def test_batch_over_max_items_is_413(local_service: Service) -> None:
    items = [{"classification": "general", "plaintext": ""}] * 1001
    with local_service.client() as c:
        _error(c.post("/v1/encrypt/batch", json={"items": items}), 413, "REQUEST_TOO_LARGE")


def test_rewrap_and_inspect(service: Service) -> None:
    with service.client() as c:
        token = c.post("/v1/encrypt", json={"classification": "pii", "context": {"k": "v"}, "plaintext": "x"}).json()[
            "token"
        ]
        rewrapped = c.post("/v1/rewrap", json={"token": token, "context": {"k": "v"}}).json()["token"]
        assert rewrapped.startswith("kg1:") and rewrapped != token
        assert c.post("/v1/decrypt", json={"token": rewrapped}).json() == {"plaintext": "x"}
        info = c.post("/v1/inspect", json={"token": rewrapped}).json()
        assert info["classification"] == "pii" and info["context"] == {"k": "v"} and info["body_size"] == 1
        assert info["keys"][0]["provider"] == ("local" if "KMSGUARD_BACKEND" not in service.env else "aws-kms")


def test_health_ready_metrics(service: Service) -> None:
    with service.client(None) as anonymous:
        assert anonymous.get("/healthz").json()["status"] == "ok"
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert set(ready.json()["checks"]) == {"config", "key:general", "key:pii", "key:payment", "audit"}
        assert anonymous.get("/metrics").status_code == 401
    with service.client("app") as c:
        assert c.get("/metrics").status_code == 403
    with service.client("admin") as admin:
        text = admin.get("/metrics").text
        assert "kmsguard_operations" in text


def _records_of_requests(service: Service, ids: set[str], count: int) -> list[AuditRecord]:
    """The audit records carrying one of ``ids``, once ``count`` of them are in the sink."""
    records: list[AuditRecord] = []
    for _ in range(200):
        records = [r for r in service.audit_records() if r.request_id in ids]
        if len(records) >= count:
            break
        time.sleep(0.1)  # the deliverer takes the records to the sink in the background
    return records


def test_request_ids_are_echoed_and_recorded_for_every_operation(local_service: Service) -> None:
    """Cache hits too: the kinds are warm (served by the plans' lanes) before the ids are sent."""
    body = {"classification": "general", "context": {"app": "ids"}, "plaintext": "id-test"}
    with local_service.client() as c:
        tokens = [c.post("/v1/encrypt", json=body).json()["token"] for _ in range(3)]
        for token in tokens:
            c.post("/v1/decrypt", json={"token": token, "context": {"app": "ids"}})
        made = c.post("/v1/encrypt", json=body).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{22}", made)
        for _ in range(2):
            r = c.post("/v1/encrypt", json=body, headers={"X-Request-Id": "abc-123"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
        r = c.post("/v1/decrypt", json={"token": tokens[0], "context": {"app": "ids"}},
                   headers={"X-Request-Id": "abc-123"})
        assert r.json() == {"plaintext": "id-test"}
        r = c.post("/v1/encrypt/batch", json={"items": [body] * 5}, headers={"X-Request-Id": "batch-42"})
        assert r.headers["x-request-id"] == "batch-42" and all("token" in x for x in r.json()["results"])
        items = [{"token": t, "context": {"app": "ids"}} for t in tokens]
        r = c.post("/v1/decrypt/batch", json={"items": items}, headers={"X-Request-Id": "batch-43"})
        assert [x["plaintext"] for x in r.json()["results"]] == ["id-test"] * 3
        replaced = {}
        for bad in ("bad\tid", "x" * 129, "semi;colon"):
            r = c.post("/v1/encrypt", json=body, headers={"X-Request-Id": bad})
            assert r.status_code == 200 and r.headers["x-request-id"] != bad
            replaced[bad] = r.headers["x-request-id"]
    assert all(re.fullmatch(r"[0-9a-f]{22}", v) for v in replaced.values())
    ids = {made, "abc-123", "batch-42", "batch-43", *replaced.values()}
    records = _records_of_requests(local_service, ids, 15)
    by_id = collections.Counter(r.request_id for r in records)
    assert by_id == {made: 1, "abc-123": 3, "batch-42": 5, "batch-43": 3, **dict.fromkeys(replaced.values(), 1)}
    assert all(r.principal == "app" and r.outcome == "ok" for r in records)
    assert [r.operation for r in records if r.request_id == "batch-43"] == ["decrypt"] * 3
    shown = kmsguard_cli(local_service.env, "audit", "query", "--request-id", "abc-123", "--json")
    assert shown.returncode == 0, shown.stderr
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [(x["operation"], x["request_id"]) for x in lines] == [("encrypt", "abc-123")] * 2 + [("decrypt", "abc-123")]
    verified = kmsguard_cli(local_service.env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_no_plaintext_or_token_in_any_error(local_service: Service) -> None:
    secret = "4111111111111111"
    with local_service.client() as c:
        token = c.post(
            "/v1/encrypt", json={"classification": "payment", "context": {"purpose": "p"}, "plaintext": secret}
        ).json()["token"]
        answers = [
            c.post("/v1/decrypt", json={"token": token}),  # purpose missing
            c.post("/v1/decrypt", json={"token": token, "context": {"purpose": "other"}}),
            c.post("/v1/encrypt", json={"classification": "payment", "plaintext": secret}),
            c.post("/v1/decrypt", json={"token": token[:-3] + "xyz", "context": {"purpose": "p"}}),
        ]
    for r in answers:
        assert r.status_code == 400
        assert secret not in r.text and token not in r.text and "Traceback" not in r.text
        json.loads(r.text)


def test_a_stream_token_is_inspected_and_decrypted(local_service: Service) -> None:
    """A suite-2 envelope (a stream) in text form: inspect shows its segments, decrypt opens it."""
    import io

    from kmsguard import Guard, envelope

    plain = bytes(range(256)) * 40
    out = io.BytesIO()
    with Guard.from_env({**local_service.env, "KMSGUARD_AUDIT_DELIVERY": "thread"}) as guard:
        guard.encrypt_stream(io.BytesIO(plain), out, "general", {"doc": "x"}, segment_size=4096)
    token = envelope.to_text(out.getvalue())
    with local_service.client() as c:
        info = c.post("/v1/inspect", json={"token": token}).json()
        assert (info["suite"], info["segment_size"], info["segments"], info["body_size"]) == (2, 4096, 3, len(plain))
        opened = c.post("/v1/decrypt", json={"token": token, "context": {"doc": "x"}}).json()
        assert base64.b64decode(opened["plaintext_b64"]) == plain
        cut = {"token": token[:-8], "context": {"doc": "x"}}  # six bytes short of its last tag
        _error(c.post("/v1/decrypt", json=cut), 400, "INVALID_CIPHERTEXT")
