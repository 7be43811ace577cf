"""Bad input on both hosts: a clear 4xx in the client's API family, nothing forwarded, and
the gateway serving the next request."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import socket
import zlib

import httpx
import pytest

from tests.harness import ledger, wait_until

CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}
MSG = {"model": "claude-haiku-4-5", "max_tokens": 5,
       "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def key(gateway):
    return gateway.create_key()


def post(gateway, key, path: str, content: bytes, **headers: str) -> httpx.Response:
    h = {"authorization": f"Bearer {key.secret}", "content-type": "application/json",
         **{k.replace("_", "-"): v for k, v in headers.items()}}
    return httpx.post(f"{gateway.url}{path}", content=content, headers=h, timeout=30)


def assert_refused(r: httpx.Response, status: int, code: str, family: str = "openai") -> None:
    assert r.status_code == status, r.text[:300]
    doc = r.json()
    if family == "openai":
        assert doc["error"]["code"] == code and doc["error"]["message"]
    else:
        assert doc["type"] == "error" and doc["error"]["code"] == code


def still_serving(gateway, key) -> None:
    r = post(gateway, key, "/v1/chat/completions", json.dumps(CHAT).encode())
    assert r.status_code == 200, r.text


BODIES = {
    "not json": b"model=gpt-5-mini",
    "truncated": b'{"model": "gpt-5-mini", "messages": [{"role": "us',
    "invalid utf-8": b'{"model": "gpt-5-\xff", "messages": []}',
    "model of the wrong type": json.dumps({**CHAT, "model": 42}).encode(),
    "tools not a list": json.dumps({**CHAT, "tools": {"name": "x"}}).encode(),
    "nested 100,000 deep": b'{"model": "gpt-5-mini", "messages": [], "x": '
                           + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "duplicate keys": b'{"model": "gpt-5-mini", "messages": [], "model": "o3"}',
}


@pytest.mark.parametrize("case", list(BODIES))
def test_bad_bodies(gateway, key, fake_openai, fake_anthropic, case):
    body = BODIES[case]
    assert_refused(post(gateway, key, "/v1/chat/completions", body), 400, "invalid_request")
    anthropic_body = body.replace(b"gpt-5-mini", b"claude-haiku-4-5")
    assert_refused(post(gateway, key, "/v1/messages", anthropic_body, anthropic_version="1"),
                   400, "invalid_request", "anthropic")
    assert fake_openai.requests == [] and fake_anthropic.requests == []
    still_serving(gateway, key)


def test_a_model_named_with_half_a_surrogate_pair_is_refused_and_recorded(gateway, key,
                                                                           fake_openai):
    """JSON may escape half a UTF-16 pair (`"\\ud800"`), which no store can keep as text:
    the refusal still leaves its row, the name with a replacement character in its place."""
    before = refusals(gateway, key, "model_not_priced")
    body = b'{"model": "gpt-\\ud800", "messages": [{"role": "user", "content": "hi"}]}'
    r = post(gateway, key, "/v1/chat/completions", body)
    assert_refused(r, 400, "model_not_priced")
    assert fake_openai.requests == []
    expect_one_more_refusal(gateway, key, "model_not_priced", before)
    request_id = r.headers["x-langwatch-request-id"]
    assert [row.model for row in ledger(gateway.config) if row.request_id == request_id] \
        == ["gpt-\ufffd"]


def test_wrong_content_type(gateway, key, fake_openai):
    r = post(gateway, key, "/v1/chat/completions", json.dumps(CHAT).encode(),
             content_type="text/plain")
    assert_refused(r, 400, "invalid_request")
    assert "content-type" in r.json()["error"]["message"].lower()
    assert fake_openai.requests == []
    still_serving(gateway, key)


@pytest.mark.parametrize(("coding", "compress"), [
    ("gzip", gzip.compress), ("deflate", zlib.compress),
    # Declared but not applied: read as JSON by a gateway that ignored the header, then
    # decoded (or refused) by a provider that did not.
    ("br", bytes), ("gzip, identity", gzip.compress)])
def test_an_encoded_body_is_refused_not_forwarded(gateway, key, fake_openai, coding, compress):
    r = post(gateway, key, "/v1/chat/completions", compress(json.dumps(CHAT).encode()),
             content_encoding=coding)
    assert_refused(r, 400, "invalid_request")
    assert "content-encoding" in r.json()["error"]["message"].lower()
    assert fake_openai.requests == []
    assert post(gateway, key, "/v1/chat/completions", json.dumps(CHAT).encode(),
                content_encoding="identity").status_code == 200


def test_oversized_body_is_refused_from_its_content_length(gateway, key, fake_openai):
    """The client announces 64 MiB and sends a byte: the answer comes from the headers
    alone (a gateway waiting for the body would hang until the client gives up)."""
    with socket.create_connection(("127.0.0.1", gateway.process.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                  b"authorization: Bearer " + key.secret.encode() + b"\r\n"
                  b"content-type: application/json\r\ncontent-length: 67108864\r\n\r\n{")
        head = b""
        while b"payload_too_large" not in head and (chunk := s.recv(65536)):
            head += chunk
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"payload_too_large" in head
    assert fake_openai.requests == []
    rid = re.search(rb"x-langwatch-request-id: (\S+)", head, re.I).group(1).decode()
    rows = wait_until(lambda: [r for r in ledger(gateway.config) if r.request_id == rid],
                      timeout=5, what="the refusal's row")
    assert [(r.status, r.code) for r in rows] == [(413, "payload_too_large")]
    still_serving(gateway, key)


def _rest(head: bytes) -> bytes:
    return head.split(b"\r\n\r\n", 1)[-1]


def test_oversized_chunked_body_stops_at_the_cap(gateway, key, fake_openai):
    cap = 8 * 1024 * 1024
    before = refusals(gateway, key, "payload_too_large")

    def chunks():
        yield b'{"model": "gpt-5-mini", "messages": [], "pad": "'
        for _ in range(cap // 65536 + 4):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(f"{gateway.url}/v1/chat/completions", content=chunks(), timeout=30,
                   headers={"authorization": f"Bearer {key.secret}",
                            "content-type": "application/json"})
    assert_refused(r, 413, "payload_too_large")
    assert fake_openai.requests == []
    expect_one_more_refusal(gateway, key, "payload_too_large", before,
                            r.headers["x-langwatch-request-id"])


def test_chunked_body_is_refused_at_the_cap_without_waiting_for_its_end(gateway, key,
                                                                        fake_openai):
    """A chunked body stops being read at the cap: the 413 comes while the client is still
    sending (it never ends its body here), and the refusal is in the ledger."""
    cap = 8 * 1024 * 1024
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    before = refusals(gateway, key, "payload_too_large")
    with socket.create_connection(("127.0.0.1", gateway.process.port), timeout=15) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                  b"authorization: Bearer " + key.secret.encode() + b"\r\n"
                  b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        with contextlib.suppress(OSError):  # the gateway may stop reading, and close
            for _ in range(cap // len(piece) + 2):
                s.sendall(chunk)
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer and (data := s.recv(65536)):
                answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert fake_openai.requests == []
    expect_one_more_refusal(gateway, key, "payload_too_large", before)


def raw(gateway, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes no well-behaved client would; (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", gateway.process.port), timeout=10) as s:
        s.sendall(head + b"connection: close\r\n\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), _rest(answer)


@pytest.mark.parametrize("secret", [b"  tg-spaces ", "tg-ünïcode-kéy".encode(),
                                    b"tg\tkey", b"\xff\xfe"])
def test_odd_keys_are_401(gateway, key, fake_openai, secret):
    body = json.dumps(CHAT).encode()
    status, answer = raw(gateway, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                         b"authorization: Bearer " + secret + b"\r\n"
                         b"content-type: application/json\r\n"
                         b"content-length: " + str(len(body)).encode() + b"\r\n", body)
    assert status == 401, answer
    assert json.loads(answer)["error"]["code"] == "invalid_api_key"
    assert fake_openai.requests == []


@pytest.mark.parametrize("path", ["/v1/../admin", "/v1/chat%2Fcompletions",
                                  "//v1/chat/completions", "/v1/chat/completions/../../x",
                                  "/v1/chat/completions%00"])
def test_odd_paths_are_not_routes(gateway, key, fake_openai, path):
    body = json.dumps(CHAT).encode()
    status, answer = raw(gateway, f"POST {path} HTTP/1.1\r\nhost: x\r\n"
                         f"authorization: Bearer {key.secret}\r\n"
                         f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                         .encode(), body)
    assert 400 <= status < 500, answer[:300]
    assert json.loads(answer)["error"]["code"] in ("not_found", "invalid_request")
    assert fake_openai.requests == []


def test_query_string_on_a_known_route_is_served(gateway, key, fake_openai):
    r = post(gateway, key, "/v1/chat/completions?trace=1", json.dumps(CHAT).encode())
    assert r.status_code == 200
    assert fake_openai.requests[-1].path.startswith("/v1/chat/completions")


def send_with_header(gateway, key, header: bytes) -> tuple[int, bytes]:
    body = json.dumps(CHAT).encode()
    return raw(gateway, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
               b"authorization: Bearer " + key.secret.encode() + b"\r\n" + header +
               b"content-type: application/json\r\ncontent-length: "
               + str(len(body)).encode() + b"\r\n", body)


def refusals(gateway, key, code: str) -> int:
    """Refusals with `code` of this key, or of no known key: a request Envoy's codec
    refuses is logged before its headers are parsed, so its key is not known."""
    return sum(r.code == code and r.key_id in (key.id, None) and r.outcome == "refused"
               for r in ledger(gateway.config))


def expect_one_more_refusal(gateway, key, code: str, before: int,
                            request_id: str | None = None) -> None:
    """Whoever refused it (the core, or the proxy itself), the request left exactly one
    ledger row, under the request id its answer carried."""
    wait_until(lambda: refusals(gateway, key, code) == before + 1, timeout=5,
               what=f"the {code} refusal's ledger row")
    still_serving(gateway, key)
    assert refusals(gateway, key, code) == before + 1
    if request_id is not None:
        assert [r.code for r in ledger(gateway.config) if r.request_id == request_id] == [code]


def test_control_character_in_a_header_is_refused(gateway, key, fake_openai):
    before = refusals(gateway, key, "invalid_request")
    status, answer = send_with_header(gateway, key, b"x-evil: a\x00b\r\n")
    assert status == 400, answer[:200]
    assert json.loads(answer)["error"]["code"] == "invalid_request"
    assert fake_openai.requests == []
    expect_one_more_refusal(gateway, key, "invalid_request", before)


@pytest.mark.parametrize("header", [b"x-evil: a\rinjected: c\r\n",
                                    b"x-evil: a\ninjected: c\r\n",
                                    b"x-evil: a\r\n folded\r\n"])
def test_cr_lf_never_reach_a_provider_inside_a_value(gateway, key, fake_openai, header):
    """Each proxy's parser ends a header at a bare CR or LF (or refuses it): whatever it
    decides, no value that reaches the provider holds one."""
    status, _ = send_with_header(gateway, key, header)
    assert status in (200, 400)
    for request in fake_openai.requests:
        assert not any(c in v for v in request.headers.values() for c in "\r\n\x00")
    still_serving(gateway, key)


@pytest.mark.parametrize("head", [b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                                  b"this line has no colon\r\n",
                                  b"POST /v1/chat/completions HTTP/1.1 extra\r\nhost: x\r\n"])
def test_a_request_head_that_is_not_http_gets_a_400_and_one_row(gateway, key, fake_openai,
                                                                head):
    """Refused by the proxy's own parser, before any hook or filter: a JSON 400, and the
    request still leaves one ledger row."""
    before = refusals(gateway, key, "invalid_request")
    status, answer = raw(gateway, head)
    assert status == 400, answer[:200]
    assert json.loads(answer)["error"]["code"] == "invalid_request"
    assert fake_openai.requests == []
    expect_one_more_refusal(gateway, key, "invalid_request", before)


def test_oversized_headers_are_refused(gateway, key, fake_openai):
    before = refusals(gateway, key, "invalid_request")
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, timeout=10,
                   headers={"authorization": f"Bearer {key.secret}", "x-big": "y" * 200_000})
    assert 400 <= r.status_code < 500
    assert fake_openai.requests == []
    expect_one_more_refusal(gateway, key, "invalid_request", before)


def test_unreachable_provider_is_a_json_502(gateway, fake_openai):
    """A plan of one whose provider refuses connections: the client gets the gateway's
    envelope (on mitmproxy, not mitmproxy's HTML error page), and each SDK its error."""
    from tests.harness import free_port

    # Serves a model no other test asks for, so the shared gateway's routing is unchanged.
    gateway.cli("model-providers", "create", "--id", "mp_gone", "--type", "openai",
                "--scope", "ORG:acme", "--base-url", f"http://127.0.0.1:{free_port()}",
                "--api-key-env", "FAKE_OPENAI_KEY", "--models", "o4-mini",
                "--fallback-priority", "0", check=False)  # the other host may have made it
    key = gateway.create_key()
    r = httpx.post(f"{gateway.openai_base}/chat/completions", json={**CHAT, "model": "o4-mini"},
                   timeout=30, headers={"authorization": f"Bearer {key.secret}"})
    assert r.status_code == 502 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "provider_unreachable"
    assert fake_openai.requests == []


def test_a_provider_event_over_the_cap_ends_the_stream_with_an_error(gateway, key,
                                                                     fake_openai):
    """A stream the gateway rewrites (here: an Anthropic client served by an OpenAI model)
    holds one event at a time; an event over the cap is never held whole: the client's
    stream ends with an error event in its API's shape, and the request is charged what the
    provider reported for it (the meter reads the provider's stream to its end)."""
    from tollgate.sse import MAX_EVENT_BYTES

    fake_openai.giant_word = MAX_EVENT_BYTES + 4096
    with httpx.stream("POST", f"{gateway.url}/v1/messages", timeout=60,
                      json={**CHAT, "stream": True, "max_tokens": 64},
                      headers={"x-api-key": key.secret,
                               "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200
        request_id = r.headers["x-langwatch-request-id"]
        body = b"".join(r.iter_bytes())
    assert len(body) < 64 * 1024  # the huge event never reached the client
    last = body.strip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\n")
    error = json.loads(last.split(b"data: ", 1)[1])["error"]
    assert error["type"] == "api_error" and "larger than the gateway handles" in error["message"]
    (row,) = wait_until(lambda: [r for r in ledger(gateway.config)
                                 if r.request_id == request_id], timeout=10, what="its row")
    assert (row.status, row.outcome, row.usage_reported) == (200, "error", True)
    assert row.output_tokens == 2 and row.cost_micros > 0  # the fake's count: two "words"
    fake_openai.giant_word = 0
    still_serving(gateway, key)


def test_a_huge_event_passes_whole_when_only_the_usage_chunk_is_cut(gateway, key,
                                                                    fake_openai):
    """Cutting the usage chunk the gateway asked for holds at most a usage chunk's worth of
    an event: a 16 MiB event of a chat-completions stream reaches the client whole, as the
    provider sent it, and only the usage chunk is missing."""
    from tollgate.sse import MAX_EVENT_BYTES

    fake_openai.giant_word = MAX_EVENT_BYTES + 4096
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", timeout=60,
                      json={**CHAT, "stream": True},
                      headers={"authorization": f"Bearer {key.secret}"}) as r:
        assert r.status_code == 200
        request_id = r.headers["x-langwatch-request-id"]
        body = b"".join(r.iter_bytes())
    (row,) = wait_until(lambda: [r for r in ledger(gateway.config)
                                 if r.request_id == request_id], timeout=10, what="its row")
    assert row.usage_reported and row.output_tokens == 2 and row.cost_micros > 0
    assert row.outcome == "completed"
    assert len(body) > MAX_EVENT_BYTES and b"z" * MAX_EVENT_BYTES in body
    assert b'"usage"' not in body and body.endswith(b"data: [DONE]\n\n")
    fake_openai.giant_word = 0
    still_serving(gateway, key)
