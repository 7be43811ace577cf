"""Local stand-ins for the OpenAI and Anthropic APIs, speaking their wire formats.

Each fake is a real HTTP/1.1 server on 127.0.0.1: JSON and SSE (chunked) responses with
`usage`, tool calls when the request declares tools, the providers' own error shapes, and
failure modes a test can queue (`fail`, `hang`, `cut`). Every request is recorded with its
raw body bytes and headers so tests can assert what reached the provider.

Run standalone (for `make run` demos and benchmarks):
    python -m tests.fakes.providers --openai-port 9101 --anthropic-port 9102
"""

from __future__ import annotations

import argparse
import base64
import calendar
import contextlib
import hmac
import itertools
import json
import re
import struct
import sys
import threading
import time
import traceback
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.harness import QuietHTTPServer

TEXT = "Hello from the fake provider, streamed word by word."


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Behaviour:
    kind: str = "ok"  # ok | fail | hang | cut
    status: int = 503
    seconds: float = 30.0  # hang duration
    after_events: int = 2  # cut: events sent before the connection drops
    body: bytes | None = None  # fail: body to send instead of the family's default


def _words(text: str) -> list[str]:
    parts = text.split(" ")
    return [p if i == 0 else " " + p for i, p in enumerate(parts)]


def _count_tokens(doc: Any) -> int:
    """A stable stand-in for a tokenizer: about one token per four bytes of JSON."""
    return max(1, len(json.dumps(doc)) // 4)


@dataclass(frozen=True)
class AwsCredentials:
    access_key: str = "AKIAFAKEBEDROCK00001"
    secret_key: str = "fake/bedrock/secret/key/0000000000000000"
    region: str = "us-east-1"


@dataclass
class FakeProvider:
    family: str  # "openai" | "anthropic"
    api_key: str
    port: int = 0
    chunk_delay: float = 0.0
    response_delay: float = 0.0  # before any response: keeps requests in flight together
    answer_words: int = 0  # > 0: chat answers this many words (large responses)
    giant_word: int = 0  # > 0: the answer starts with one word this long (one huge event)
    # > 0: a chat answer runs this many words when the request sets no output cap, and up
    # to its cap when it does (as a model writing at length would).
    uncapped_words: int = 0
    # Each streamed event is written in two pieces, split mid-event (with chunk_delay
    # between them): a proxy sees events cut across its reads.
    split_events: bool = False
    # The whole stream written at once (the terminating chunk apart): a proxy reads every
    # event, the usage chunk among them, in one piece.
    one_write: bool = False
    # The same with its length declared (content-length), not in chunks: as a provider
    # behind a proxy that buffers answers may send it.
    sized_stream: bool = False
    # Streamed events' JSON written without spaces, as OpenAI writes it (`"choices":[]`).
    compact_events: bool = False
    # > 0: a JSON answer is written in two halves this many seconds apart (a slow link, a
    # provider that flushes as it writes): a proxy that holds answers shows the pause.
    json_pause: float = 0.0
    # The service tier the account serves a request that names none at (an OpenAI project's
    # default, Anthropic Priority Tier capacity); None: the standard tier.
    default_tier: str | None = None
    # Azure OpenAI (family "azure"): deployment name -> the model it runs.
    deployments: dict[str, str] = field(default_factory=dict)
    # AWS Bedrock (family "bedrock"): the credentials SigV4 signatures are checked against
    # (`api_key`, when set, is a Bedrock API key accepted as a bearer token).
    aws: AwsCredentials = field(default_factory=AwsCredentials)
    # Google Vertex AI (family "vertex"): the service account whose signed assertions its
    # token endpoint (/token) accepts, how long the tokens it issues live, and them.
    service_account: dict[str, str] | None = None
    token_ttl: int = 3600
    tokens: dict[str, float] = field(default_factory=dict)  # access token -> expiry
    requests: list[Recorded] = field(default_factory=list)
    streamed: list[bytearray] = field(default_factory=list)  # each event stream's bytes, as sent
    # The fake's own failures (a bug of the fake's, not a client's doing), with their
    # tracebacks: the tests' fixtures fail the test that was running on any.
    failures: list[str] = field(default_factory=list)
    _script: deque[Behaviour] = field(default_factory=deque)
    _server: QuietHTTPServer | None = None

    # -- control ----------------------------------------------------------------------------
    def enqueue(self, *behaviours: Behaviour) -> None:
        self._script.extend(behaviours)

    def reset(self) -> None:
        self.requests.clear()
        self._script.clear()
        self.chunk_delay = 0.0
        self.response_delay = 0.0
        self.answer_words = 0
        self.giant_word = 0
        self.uncapped_words = 0
        self.split_events = False
        self.one_write = False
        self.sized_stream = False
        self.compact_events = False
        self.json_pause = 0.0
        self.streamed.clear()
        self.default_tier = None

    def next_behaviour(self) -> Behaviour:
        return self._script.popleft() if self._script else Behaviour()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeProvider:
        provider = self

        class Handler(_Handler):
            fake = provider

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self._server.failures = self.failures
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name=f"fake-{self.family}").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Server(QuietHTTPServer):
    request_queue_size = 1024  # the stdlib default of 5 resets bursts of connections

    failures: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Anything but a client's reset is the fake's own failure: kept for the tests'
        # fixtures, and printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            self.failures.append(f"from {client_address}: {traceback.format_exc()}")
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    fake: FakeProvider
    _tier_header: dict[str, str] = {}  # replaced per request, never mutated

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, doc: Any, extra: dict[str, str] | None = None) -> None:
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in {**self._account_headers(), **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.fake.json_pause and len(data) > 1:
            half = len(data) // 2
            self.wfile.write(data[:half])
            self.wfile.flush()
            time.sleep(self.fake.json_pause)
            data = data[half:]
        self.wfile.write(data)

    def _account_headers(self) -> dict[str, str]:
        """What the real services send about the account a key belongs to (its cookies,
        its organization and project)."""
        if self.fake.family in ("openai", "azure"):
            return {"openai-organization": "org-fake-provider", "openai-project":
                    "proj_fake_provider", "set-cookie": "__cf_bm=fake; path=/; HttpOnly"}
        if self.fake.family == "anthropic":
            return {"anthropic-organization-id": "fake-org-0000",
                    "set-cookie": "_cfuvid=fake; path=/; HttpOnly"}
        return self._tier_header

    def _served_tier(self, asked: Any, standard: str, auto: tuple[str, ...] = ("auto",)
                     ) -> str:
        """The tier a request is served at: the one it names, else the account's default."""
        if isinstance(asked, str) and asked not in auto:
            return asked
        return self.fake.default_tier or standard

    def _start_sse(self, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("content-type", EVENTSTREAM if self.fake.family == "bedrock" else
                         "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        if length is None:
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("content-length", str(length))
        for k, v in self._account_headers().items():
            self.send_header(k, v)
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stream(self, events: list[bytes], behaviour: Behaviour, framed: bool = False) -> None:
        cut = behaviour.after_events if behaviour.kind == "cut" else None
        if self.fake.one_write or self.fake.sized_stream:
            wired = [self._wire(event, framed) for event in events]
            whole = b"".join(wired)
            body = whole if cut is None else b"".join(wired[:cut])
            self.fake.streamed.append(bytearray(body))
            if self.fake.sized_stream:  # (cut short of the length it declared)
                self._start_sse(len(whole))
                self.wfile.write(body)
            else:
                self._start_sse()
                if body:
                    self._chunk(body)
            if cut is not None:
                self._drop()
            elif not self.fake.sized_stream:
                self._chunk(b"")
            return
        self._start_sse()
        # This stream's own record, grown in place: `streamed[-1]` would be another stream's
        # under concurrency, and gone once a test's reset() clears the list mid-stream.
        sent = bytearray()
        self.fake.streamed.append(sent)
        for i, event in enumerate(events):
            if cut is not None and i >= cut:
                self._drop()
                return
            data = self._wire(event, framed)
            pieces = [data[:len(data) - 1], data[len(data) - 1:]] if self.fake.split_events \
                else [data]
            for piece in pieces:
                self._chunk(piece)
                sent += piece
                if self.fake.chunk_delay:
                    time.sleep(self.fake.chunk_delay)
        self._chunk(b"")

    def _drop(self) -> None:
        """The connection dropped mid-stream: no terminating chunk, no more bytes."""
        self.wfile.flush()
        self.connection.shutdown(2)
        self.close_connection = True

    def _wire(self, event: bytes, framed: bool) -> bytes:
        """An event as it goes on the wire: compact JSON if asked, framed for Bedrock."""
        if self.fake.compact_events and event.startswith(b"data: {"):
            event = b"data: " + json.dumps(json.loads(event[6:]),
                                           separators=(",", ":")).encode() + b"\n\n"
        return _frame_of(event) if self.fake.family == "bedrock" and not framed else event

    def _error(self, status: int, message: str, kind: str, code: str | None = None) -> None:
        if self.fake.family in ("vertex", "gemini"):
            self._google_error(status, message)
            return
        if self.fake.family == "bedrock":
            self._bedrock_error(status, {429: "ThrottlingException",
                                         400: "ValidationException",
                                         408: "ModelTimeoutException",
                                         424: "ModelErrorException"}.get(
                                             status, "ServiceUnavailableException"), message)
            return
        if self.fake.family == "anthropic":
            doc: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            doc = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        self._send_json(status, doc, {"x-fake-error": "1"})

    # -- dispatch ---------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        self._answer(self._read_body())

    def _answer(self, body: bytes) -> None:
        try:
            self._handle(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the caller hung up: nothing to answer

    def _handle(self, body: bytes) -> None:
        fake = self.fake
        rec = Recorded(self.command, self.path,
                       {k.lower(): v for k, v in self.headers.items()}, body)
        self._tier_header = {}  # Bedrock InvokeModel names its tier in one
        fake.requests.append(rec)
        if not self._authorised(rec):
            return
        if fake.family == "vertex" and self.path == "/token":
            # Scripted behaviours are for model calls: a token fetch (whenever the client's
            # token is due) must not take the failure a test meant for the next call.
            self._vertex_token(parse_qs(body.decode("utf-8", "replace")))
            return
        behaviour = fake.next_behaviour()
        if fake.response_delay:
            time.sleep(fake.response_delay)
        if behaviour.kind == "hang":
            time.sleep(behaviour.seconds)
            self.close_connection = True
            return
        if behaviour.kind == "fail":
            if behaviour.body is not None:
                self._send_json(behaviour.status, behaviour.body)
            elif fake.family == "anthropic":
                kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(
                    behaviour.status, "api_error")
                self._error(behaviour.status, "Overloaded", kind)
            else:
                kind = "requests" if behaviour.status == 429 else "server_error"
                self._error(behaviour.status, "The server is overloaded.", kind)
            return
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            self._error(400, "We could not parse the JSON body of your request.",
                        "invalid_request_error")
            return
        path = self.path.split("?")[0]
        if fake.family == "azure":
            self._azure(path, doc, behaviour)
            return
        if fake.family == "bedrock":
            self._bedrock(path, doc, behaviour)
            return
        if fake.family == "vertex":
            self._vertex(path, doc, behaviour)
            return
        if fake.family == "gemini":
            self._gemini(path, doc, behaviour)
            return
        handler = ROUTES.get((fake.family, path))
        if handler is None:
            self._error(404, f"Unknown path {path}", "not_found_error")
            return
        handler(self, doc, behaviour)

    def _authorised(self, rec: Recorded) -> bool:
        fake = self.fake
        if fake.family == "azure":
            return self._azure_authorised(rec)
        if fake.family == "bedrock":
            return self._bedrock_authorised(rec)
        if fake.family == "vertex":
            return self._vertex_authorised(rec)
        if fake.family == "gemini":
            if rec.headers.get("x-goog-api-key") != fake.api_key:
                self._google_error(400, "API key not valid. Please pass a valid API key.")
                return False
            return True
        if fake.family == "anthropic":
            if rec.headers.get("x-api-key") != fake.api_key:
                self._error(401, "invalid x-api-key", "authentication_error")
                return False
            if "anthropic-version" not in rec.headers:
                self._error(400, "anthropic-version header is required",
                            "invalid_request_error")
                return False
        elif rec.headers.get("authorization") != f"Bearer {fake.api_key}":
            self._error(401, "Incorrect API key provided.", "invalid_request_error",
                        "invalid_api_key")
            return False
        return True

    # -- Azure OpenAI ---------------------------------------------------------------------------
    def _azure_error(self, status: int, code: str, message: str) -> None:
        self._send_json(status, {"error": {"code": code, "message": message}},
                        {"x-fake-error": "1"})

    def _azure_authorised(self, rec: Recorded) -> bool:
        """Azure's data plane: the `api-key` header, and an `api-version` it knows."""
        if rec.headers.get("api-key") != self.fake.api_key:
            self._azure_error(401, "401", "Access denied due to invalid subscription key or "
                              "wrong API endpoint. Make sure to provide a valid key for an "
                              "active subscription and use a correct regional API endpoint "
                              "for your resource.")
            return False
        version = parse_qs(urlsplit(rec.path).query).get("api-version", [""])[0]
        if version not in AZURE_API_VERSIONS and not rec.path.startswith("/openai/v1/"):
            self._azure_error(404, "404", "Resource not found")
            return False
        return True

    def _azure(self, path: str, doc: dict[str, Any], behaviour: Behaviour) -> None:
        if path == "/openai/v1/responses":  # the v1 API: the deployment is the body's model
            model = self.fake.deployments.get(str(doc.get("model")))
            if model is None:
                self._azure_error(404, "DeploymentNotFound", "The API deployment for this "
                                  "resource does not exist.")
                return
            self.openai_responses({**doc, "model": model}, behaviour)
            return
        match = re.fullmatch(r"/openai/deployments/([^/]+)/(chat/completions|embeddings)", path)
        if match is None:
            self._azure_error(404, "404", "Resource not found")
            return
        model = self.fake.deployments.get(unquote(match.group(1)))
        if model is None:
            self._azure_error(404, "DeploymentNotFound", "The API deployment for this "
                              "resource does not exist. If you created the deployment within "
                              "the last 5 minutes, please wait a moment and try again.")
            return
        # The deployment decides the model; Azure answers with the model it runs.
        doc = {**doc, "model": model}
        if match.group(2) == "embeddings":
            self.openai_embeddings(doc, behaviour)
        else:
            self.openai_chat(doc, behaviour)

    # -- Google Vertex AI -----------------------------------------------------------------------
    def _google_error(self, status: int, message: str) -> None:
        kind = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED"}.get(status, "UNAVAILABLE")
        self._send_json(status, {"error": {"code": status, "message": message,
                                           "status": kind}}, {"x-fake-error": "1"})

    def _vertex_authorised(self, rec: Recorded) -> bool:
        """The token endpoint takes a service account's signed JWT; the API takes the
        bearer tokens it issued, until they expire."""
        if rec.path == "/token":
            return True
        token = rec.headers.get("authorization", "").removeprefix("Bearer ")
        expiry = self.fake.tokens.get(token)
        if expiry is None or expiry <= time.time():
            self._google_error(401, "Request had invalid authentication credentials. "
                               "Expected OAuth 2 access token, login cookie or other valid "
                               "authentication credential.")
            return False
        return True

    def _vertex_token(self, form: dict[str, list[str]]) -> None:
        """OAuth 2 JWT-bearer grant (RFC 7523), as google-auth's service-account flow sends
        it: the assertion must be signed by the service account's key, for this endpoint."""
        from google.auth import jwt

        account = self.fake.service_account or {}
        try:
            # google-auth addresses its assertion to Google's token endpoint, wherever the
            # key file's token_uri points.
            claims = jwt.decode(form.get("assertion", [""])[0], certs=account["public_key"],
                                audience=[account["token_uri"],
                                          "https://oauth2.googleapis.com/token"])
        except (ValueError, KeyError):
            claims = None
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"] or \
                claims is None or claims.get("iss") != account.get("client_email"):
            self._send_json(400, {"error": "invalid_grant",
                                  "error_description": "Invalid JWT Signature."})
            return
        token = f"ya29.fake-{uuid.uuid4().hex}"
        self.fake.tokens[token] = time.time() + self.fake.token_ttl
        self._send_json(200, {"access_token": token, "expires_in": self.fake.token_ttl,
                              "token_type": "Bearer"})

    def _vertex(self, path: str, doc: dict[str, Any], behaviour: Behaviour) -> None:
        gemini = re.fullmatch(r"/v1/projects/[^/]+/locations/[^/]+/publishers/google/models/"
                              r"([^/:]+):(generateContent|streamGenerateContent)", path)
        if gemini is not None:  # the same API as AI Studio's, under the project's path
            self._gemini(f"/v1beta/models/{gemini.group(1)}:{gemini.group(2)}", doc, behaviour)
            return
        match = re.fullmatch(r"/v1/projects/([^/]+)/locations/([^/]+)/publishers/anthropic/"
                             r"models/([^/:]+):(rawPredict|streamRawPredict)", path)
        if match is None:
            self._google_error(404, f"The requested URL {path} was not found.")
            return
        if not isinstance(doc.get("anthropic_version"), str) or "model" in doc:
            self._google_error(400, "anthropic_version is required and model is not "
                               "permitted in the body")
            return
        stream = match.group(4) == "streamRawPredict"
        self.anthropic_messages({**doc, "model": unquote(match.group(3)), "stream": stream},
                                behaviour)

    # -- Gemini API --------------------------------------------------------------------------------
    def _gemini(self, path: str, doc: dict[str, Any], behaviour: Behaviour) -> None:
        match = re.fullmatch(r"/v1beta/models/([^/:]+):(generateContent|streamGenerateContent)",
                             path)
        if match is None:
            self._google_error(404, f"The requested URL {path} was not found.")
            return
        contents = doc.get("contents")
        if not isinstance(contents, list) or not contents or "model" in doc or \
                "messages" in doc:
            self._google_error(400, "* GenerateContentRequest.contents: contents is not "
                               "specified")
            return
        model = unquote(match.group(1))
        prompt = _count_tokens([doc.get("systemInstruction"), contents])
        declarations = [d for t in doc.get("tools") or [] for d in
                        t.get("functionDeclarations") or []]
        tool = declarations[0]["name"] if declarations else None
        words = _words(_answer(self.fake))
        out_tokens = len(words) + (5 if tool else 0)
        rid = uuid.uuid4().hex[:22]

        def usage(candidates: int) -> dict[str, int]:
            return {"promptTokenCount": prompt, "candidatesTokenCount": candidates,
                    "totalTokenCount": prompt + candidates}

        def response(parts: list[dict[str, Any]], finish: bool, done: int) -> dict[str, Any]:
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"},
                                         "index": 0}
            if finish:
                candidate["finishReason"] = "STOP"
            return {"candidates": [candidate], "usageMetadata": usage(done),
                    "modelVersion": model, "responseId": rid}

        # A long answer (`answer_words`) is a call's file content: Gemini sends a call's
        # whole arguments in one event, its last.
        args = {"path": "/tmp/x", **({"content": " ".join(words)} if self.fake.answer_words
                                     else {})}
        call = [{"functionCall": {"name": tool, "args": args}}] if tool else []
        if match.group(2) == "generateContent":
            self._send_json(200, response(call or [{"text": "".join(words)}], True, out_tokens))
            return
        if "alt=sse" not in self.path:
            self._google_error(400, "streamGenerateContent without alt=sse is not served "
                               "by this fake")
            return
        if tool:
            events = [response(call, True, out_tokens)]
        else:
            events = [response([{"text": w}], i == len(words) - 1, i + 1)
                      for i, w in enumerate(words)]
        self._stream([b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events],
                     behaviour)

    # -- AWS Bedrock ----------------------------------------------------------------------------
    def _bedrock_error(self, status: int, kind: str, message: str) -> None:
        self._send_json(status, {"message": message}, {
            "x-amzn-errortype": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            "x-fake-error": "1"})

    def _bedrock_authorised(self, rec: Recorded) -> bool:
        """A Bedrock API key as a bearer token, or a SigV4 signature checked with botocore's
        own algorithm against the fake's credentials."""
        auth = rec.headers.get("authorization", "")
        if auth.startswith("Bearer ") and self.fake.api_key:
            if auth == f"Bearer {self.fake.api_key}":
                return True
            self._bedrock_error(403, "AccessDeniedException", "Invalid API Key format")
            return False
        problem = sigv4_problem(self.command, f"http://{rec.headers.get('host', '')}{rec.path}",
                                rec.headers, rec.body, self.fake.aws)
        if problem is not None:
            self._bedrock_error(403, problem[0], problem[1])
            return False
        return True

    def _bedrock(self, path: str, doc: dict[str, Any], behaviour: Behaviour) -> None:
        converse = re.fullmatch(r"/model/([^/]+)/(converse|converse-stream)", path)
        if converse is not None:
            self._converse(unquote(converse.group(1)), converse.group(2) != "converse", doc,
                           behaviour)
            return
        match = re.fullmatch(r"/model/([^/]+)/(invoke|invoke-with-response-stream)", path)
        if match is None:
            self._bedrock_error(404, "UnknownOperationException", "Unknown operation")
            return
        model = unquote(match.group(1))
        if not model.startswith("anthropic."):
            self._bedrock_error(400, "ValidationException", "The provided model identifier "
                                "is invalid.")
            return
        extra = sorted(set(doc) & {"model", "stream"})
        if not isinstance(doc.get("anthropic_version"), str) or extra:
            self._bedrock_error(400, "ValidationException", "Malformed input request: "
                                + (f"extraneous key [{extra[0]}] is not permitted" if extra
                                   else "#: required key [anthropic_version] not found"))
            return
        self._tier_header = {"x-amzn-bedrock-service-tier": self._served_tier(
            self.headers.get("x-amzn-bedrock-service-tier"), "default")}
        self.anthropic_messages({**doc, "model": model,
                                 "stream": match.group(2) != "invoke"}, behaviour,
                                bedrock=True)

    def _converse(self, model: str, stream: bool, doc: dict[str, Any],
                  behaviour: Behaviour) -> None:
        """Bedrock's Converse API: messages of content blocks, tools as toolSpec."""
        unknown = sorted(set(doc) - CONVERSE_FIELDS)
        messages = doc.get("messages")
        if unknown or not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages):
            self._bedrock_error(400, "ValidationException", "Malformed input request: " + (
                f"extraneous key [{unknown[0]}] is not permitted" if unknown
                else "messages must be a non-empty list of content blocks"))
            return
        prompt = _count_tokens([doc.get("system"), messages])
        tools = [t.get("toolSpec") or {} for t in (doc.get("toolConfig") or {}).get("tools")
                 or []]
        tool = tools[0].get("name") if tools else None
        words = _words(_answer(self.fake))
        out_tokens = len(words) + (5 if tool else 0)
        usage = {"inputTokens": prompt, "outputTokens": out_tokens,
                 "totalTokens": prompt + out_tokens}
        tier = {"type": self._served_tier((doc.get("serviceTier") or {}).get("type"),
                                          "default")}
        tool_input = {"path": "/tmp/x"}
        stop = "tool_use" if tool else "end_turn"
        if not stream:
            content = [{"toolUse": {"toolUseId": "tooluse_fake1", "name": tool,
                                    "input": tool_input}}] if tool else \
                [{"text": "".join(words)}]
            self._send_json(200, {"output": {"message": {"role": "assistant",
                                                         "content": content}},
                                  "stopReason": stop, "usage": usage,
                                  "metrics": {"latencyMs": 5}, "serviceTier": tier})
            return

        def event(name: str, body: dict[str, Any]) -> bytes:
            return _frame({":event-type": name, ":content-type": "application/json",
                           ":message-type": "event"}, json.dumps(body).encode())

        events = [event("messageStart", {"role": "assistant"})]
        if tool:
            events += [event("contentBlockStart", {"contentBlockIndex": 0, "start": {
                "toolUse": {"toolUseId": "tooluse_fake1", "name": tool}}}),
                       event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {
                           "toolUse": {"input": json.dumps(tool_input)}}})]
        else:
            events += [event("contentBlockDelta", {"contentBlockIndex": 0,
                                                   "delta": {"text": w}}) for w in words]
        events += [event("contentBlockStop", {"contentBlockIndex": 0}),
                   event("messageStop", {"stopReason": stop}),
                   event("metadata", {"usage": usage, "metrics": {"latencyMs": 5},
                                      "serviceTier": tier})]
        self._stream(events, behaviour, framed=True)

    # -- OpenAI chat completions --------------------------------------------------------------
    def openai_chat(self, doc: dict[str, Any], behaviour: Behaviour) -> None:
        model = doc.get("model", "")
        prompt = _count_tokens(doc.get("messages"))
        tool = _first_tool(doc.get("tools"), "chat")
        words = _words(_answer(self.fake))
        if self.fake.uncapped_words:
            cap = doc.get("max_completion_tokens") or doc.get("max_tokens")
            count = min(cap, self.fake.uncapped_words) if cap else self.fake.uncapped_words
            words = [f"w{i} " for i in range(count)]
        text = "".join(words)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        # `n` choices, each written in full (and billed: usage counts them all).
        n = doc.get("n") if isinstance(doc.get("n"), int) and doc.get("n", 0) > 1 else 1
        written = n * (len(words) + (5 if tool else 0))
        usage = {"prompt_tokens": prompt, "completion_tokens": written,
                 "total_tokens": prompt + written,
                 "prompt_tokens_details": {"cached_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0}}
        args = json.dumps({"path": "/tmp/x"})
        tier = self._served_tier(doc.get("service_tier"), "default")
        if not doc.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": None if tool else text}
            if tool:
                message["tool_calls"] = [{"id": "call_fake1", "type": "function",
                                          "function": {"name": tool, "arguments": args}}]
            self._send_json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": i, "message": message, "logprobs": _logprobs(doc, words),
                             "finish_reason": "tool_calls" if tool else "stop"}
                            for i in range(n)],
                "usage": usage, "service_tier": tier, "system_fingerprint": "fp_fake"})
            return

        def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
            return _data({"id": cid, "object": "chat.completion.chunk", "created": created,
                          "model": model, "service_tier": tier,
                          "choices": [{"index": index, "delta": delta,
                                       "finish_reason": finish}]})

        events = [chunk({"role": "assistant", "content": ""})]
        for i in range(1, n):  # the other choices first, then the first as before
            events += [chunk({"role": "assistant", "content": ""}, index=i),
                       *(chunk({"content": w}, index=i) for w in words),
                       chunk({}, "stop", index=i)]
        if tool:
            events.append(chunk({"tool_calls": [{"index": 0, "id": "call_fake1",
                                                 "type": "function",
                                                 "function": {"name": tool, "arguments": ""}}]}))
            for part in (args[: len(args) // 2], args[len(args) // 2:]):
                events.append(chunk({"tool_calls": [{"index": 0,
                                                     "function": {"arguments": part}}]}))
            events.append(chunk({}, "tool_calls"))
        else:
            events += [chunk({"content": w}) for w in words]
            events.append(chunk({}, "stop"))
        if (doc.get("stream_options") or {}).get("include_usage"):
            events.append(_data({"id": cid, "object": "chat.completion.chunk",
                                 "created": created, "model": model, "service_tier": tier,
                                 "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        self._stream(events, behaviour)

    # -- OpenAI responses -----------------------------------------------------------------
    def openai_responses(self, doc: dict[str, Any], behaviour: Behaviour) -> None:
        model = doc.get("model", "")
        prompt = _count_tokens(doc.get("input"))
        text = _answer(self.fake)
        words = _words(text)
        rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": len(words), "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt + len(words)}
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"type": "message", "id": mid, "status": "completed", "role": "assistant",
                "content": [part]}
        # A web search tool: its calls come first (as many as `max_tool_calls` allows, else
        # one), and what they found is read in as input.
        searches = 0
        if any(str(t.get("type", "")).startswith("web_search") for t in doc.get("tools") or []):
            searches = doc.get("max_tool_calls") or 1
            usage["input_tokens"] += SEARCH_RESULT_TOKENS * searches
            usage["total_tokens"] += SEARCH_RESULT_TOKENS * searches
        calls = [{"type": "web_search_call", "id": f"ws_{uuid.uuid4().hex}",
                  "status": "completed", "action": {"type": "search", "query": f"query {i}"}}
                 for i in range(searches)]

        tier = self._served_tier(doc.get("service_tier"), "default")

        def response(status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
            return {"id": rid, "object": "response", "created_at": int(time.time()),
                    "status": status, "model": model, "output": output, "service_tier": tier,
                    "usage": usage if with_usage else None, "error": None,
                    "incomplete_details": None, "tools": [], "parallel_tool_calls": True,
                    "tool_choice": "auto"}

        if not doc.get("stream"):
            self._send_json(200, response("completed", [*calls, item], True))
            return
        seq = itertools.count()

        def ev(kind: str, **data: Any) -> bytes:
            return _event(kind, {"type": kind, "sequence_number": next(seq), **data})

        events = [
            ev("response.created", response=response("in_progress", [], False)),
            ev("response.in_progress", response=response("in_progress", [], False)),
        ]
        for i, call in enumerate(calls):
            events += [
                ev("response.output_item.added", output_index=i,
                   item={**call, "status": "in_progress"}),
                *[ev(f"response.web_search_call.{step}", output_index=i, item_id=call["id"])
                  for step in ("in_progress", "searching", "completed")],
                ev("response.output_item.done", output_index=i, item=call),
            ]
        at = len(calls)  # the answer's own item
        events += [
            ev("response.output_item.added", output_index=at,
               item={**item, "status": "in_progress", "content": []}),
            ev("response.content_part.added", item_id=mid, output_index=at, content_index=0,
               part={**part, "text": ""}),
            *[ev("response.output_text.delta", item_id=mid, output_index=at, content_index=0,
                 delta=w) for w in words],
            ev("response.output_text.done", item_id=mid, output_index=at, content_index=0,
               text=text),
            ev("response.content_part.done", item_id=mid, output_index=at, content_index=0,
               part=part),
            ev("response.output_item.done", output_index=at, item=item),
            ev("response.completed", response=response("completed", [*calls, item], True)),
        ]
        self._stream(events, behaviour)

    # -- OpenAI embeddings ----------------------------------------------------------------
    def openai_embeddings(self, doc: dict[str, Any], behaviour: Behaviour) -> None:
        inputs = doc.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        dims = doc.get("dimensions")
        vector = [0.25, -0.5, 0.125, 1.0] * (dims // 4 if isinstance(dims, int) else 1)
        data = []
        for i, _ in enumerate(inputs):
            emb: Any = vector
            if doc.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = _count_tokens(inputs)
        self._send_json(200, {"object": "list", "data": data, "model": doc.get("model"),
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # -- Anthropic messages ---------------------------------------------------------------
    def anthropic_messages(self, doc: dict[str, Any], behaviour: Behaviour,
                           bedrock: bool = False) -> None:
        if not isinstance(doc.get("max_tokens"), int):
            self._error(400, "max_tokens: Field required", "invalid_request_error")
            return
        model = doc.get("model", "")
        prompt = _count_tokens([doc.get("system"), doc.get("messages")])
        tool = _first_tool(doc.get("tools"), "anthropic")
        searches = _web_searches(doc.get("tools"))
        words = _words(_answer(self.fake))
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        out_tokens = len(words) + (5 if tool else 0) + 10 * searches
        writes = _cache_writes(doc)
        usage: dict[str, Any] = {
            # What each search found is read in as input.
            "input_tokens": max(1, prompt - sum(writes.values())) + SEARCH_RESULT_TOKENS * searches,
            "output_tokens": out_tokens,
            "cache_creation_input_tokens": sum(writes.values()), "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": writes["5m"],
                               "ephemeral_1h_input_tokens": writes["1h"]}}
        if searches:
            usage["server_tool_use"] = {"web_search_requests": searches}
        searched = [block for i in range(searches) for block in _web_search_blocks(i)]
        if not bedrock:  # Bedrock names its tier in a header
            usage["service_tier"] = self._served_tier(doc.get("service_tier"), "standard",
                                                      ("auto", "standard_only"))
            if doc.get("service_tier") == "standard_only":
                usage["service_tier"] = "standard"
        tool_input = {"path": "/tmp/x"}
        stop = "tool_use" if tool else "end_turn"
        if not doc.get("stream"):
            content: list[dict[str, Any]] = [{"type": "text", "text": "".join(words)}]
            if tool:
                content = [{"type": "tool_use", "id": "toolu_fake1", "name": tool,
                            "input": tool_input}]
            content = searched + content
            self._send_json(200, {"id": mid, "type": "message", "role": "assistant",
                                  "model": model, "content": content, "stop_reason": stop,
                                  "stop_sequence": None, "usage": usage})
            return
        events = [
            _event("message_start", {"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {**usage, "output_tokens": 1, **(
                    {"server_tool_use": {"web_search_requests": 0}} if searches else {})}}}),
        ]
        for index, block in enumerate(searched):  # each whole, as a block of its own
            events += [
                _event("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": block}),
                _event("content_block_stop", {"type": "content_block_stop", "index": index}),
            ]
        first = len(searched)  # the index of the answer's own block
        if tool:
            args = json.dumps(tool_input)
            events += [
                _event("content_block_start", {"type": "content_block_start", "index": first,
                                               "content_block": {"type": "tool_use",
                                                                 "id": "toolu_fake1",
                                                                 "name": tool, "input": {}}}),
                *[_event("content_block_delta", {"type": "content_block_delta", "index": first,
                                                 "delta": {"type": "input_json_delta",
                                                           "partial_json": p}})
                  for p in (args[: len(args) // 2], args[len(args) // 2:])],
            ]
        else:
            events += [
                _event("content_block_start", {"type": "content_block_start", "index": first,
                                               "content_block": {"type": "text", "text": ""}}),
                _event("ping", {"type": "ping"}),
                *[_event("content_block_delta", {"type": "content_block_delta", "index": first,
                                                 "delta": {"type": "text_delta", "text": w}})
                  for w in words],
            ]
        events += [
            _event("content_block_stop", {"type": "content_block_stop", "index": first}),
            _event("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": out_tokens, **(
                                         {"server_tool_use": usage["server_tool_use"]}
                                         if searches else {})}}),
            _event("message_stop", {"type": "message_stop"}),
        ]
        self._stream(events, behaviour)

    def anthropic_count_tokens(self, doc: dict[str, Any], behaviour: Behaviour) -> None:
        self._send_json(200, {"input_tokens": _count_tokens([doc.get("system"),
                                                             doc.get("messages")])})


def _cache_writes(doc: dict[str, Any]) -> dict[str, int]:
    """Prompt-cache writes by how long they are kept: the tokens of each block marked with
    `cache_control` (a first request: nothing is cached yet, so nothing is read)."""
    writes = {"5m": 0, "1h": 0}
    system = doc.get("system")
    blocks = list(system) if isinstance(system, list) else []
    for message in doc.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        blocks += content if isinstance(content, list) else []
    for block in blocks:
        control = block.get("cache_control") if isinstance(block, dict) else None
        if isinstance(control, dict):
            writes["1h" if control.get("ttl") == "1h" else "5m"] += _count_tokens(block)
    return writes


def _answer(fake: FakeProvider) -> str:
    if fake.giant_word:
        return "z" * fake.giant_word + " end"
    if fake.answer_words:
        return " ".join(f"w{i}" for i in range(fake.answer_words))
    return TEXT


def _logprobs(doc: dict[str, Any], words: list[str]) -> dict[str, Any] | None:
    """Chat `logprobs.content`: one entry per token (here, per word), with `top_logprobs`
    alternatives when asked."""
    if not doc.get("logprobs"):
        return None
    top = doc.get("top_logprobs") or 0

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(w, -0.01), "top_logprobs": [
        entry(f"{w}~{k}", -1.0 - k) for k in range(top)]} for w in words], "refusal": None}


def _first_tool(tools: Any, shape: str) -> str | None:
    """The first tool the client runs (Anthropic's server tools run here: not those)."""
    if shape == "anthropic":
        tools = [t for t in tools or [] if not str(t.get("type", "")).startswith(SERVER_TOOLS)]
    if not tools:
        return None
    tool = tools[0]
    if shape == "chat":
        return tool.get("function", {}).get("name")
    return tool.get("name")


# Anthropic's tools that run on its side, by their dated type names' stems.
SERVER_TOOLS = ("web_search_", "web_fetch_", "code_execution_")
SEARCH_RESULT_TOKENS = 200  # what one search's results add to the input


def _web_searches(tools: Any) -> int:
    """Searches the fake runs for a request: each web search tool's `max_uses` (its most),
    or one."""
    return sum(t.get("max_uses") or 1 for t in tools or []
               if str(t.get("type", "")).startswith("web_search_"))


def _web_search_blocks(i: int) -> list[dict[str, Any]]:
    """One search as Anthropic writes it in a message: the search, then what it found."""
    tool_id = f"srvtoolu_fake{i}"
    return [{"type": "server_tool_use", "id": tool_id, "name": "web_search",
             "input": {"query": f"query {i}"}},
            {"type": "web_search_tool_result", "tool_use_id": tool_id, "content": [
                {"type": "web_search_result", "url": f"https://example.com/{i}",
                 "title": f"Result {i}", "encrypted_content": "ZmFrZQ==", "page_age": None}]}]


def _data(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def _event(kind: str, doc: Any) -> bytes:
    return f"event: {kind}\n".encode() + _data(doc)


EVENTSTREAM = "application/vnd.amazon.eventstream"
# The request fields Bedrock's Converse API takes (anything else is a ValidationException).
CONVERSE_FIELDS = {"messages", "system", "inferenceConfig", "toolConfig", "guardrailConfig",
                   "additionalModelRequestFields", "promptVariables", "requestMetadata",
                   "additionalModelResponseFieldPaths", "performanceConfig", "serviceTier"}


def sigv4_problem(method: str, url: str, headers: dict[str, str], body: bytes,
                  aws: AwsCredentials) -> tuple[str, str] | None:
    """What Bedrock would refuse about a request's SigV4 signature, or None: the signature
    is recomputed with botocore's signer over the headers the request says it signed."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    found = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/"
                         r"aws4_request, ?SignedHeaders=([^,]+), ?Signature=([0-9a-f]{64})",
                         headers.get("authorization", ""))
    if found is None:
        return "MissingAuthenticationTokenException", "Missing Authentication Token"
    key_id, _day, region, service, signed, signature = found.groups()
    if key_id != aws.access_key:
        return ("UnrecognizedClientException",
                "The security token included in the request is invalid.")
    amz_date = headers.get("x-amz-date", "")
    try:
        age = abs(time.time() - calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        age = float("inf")
    if (region, service) != (aws.region, "bedrock") or age > 300:
        return "InvalidSignatureException", "Signature expired or for another scope."
    request = AWSRequest(method=method, url=url, data=body,
                         headers={h: headers.get(h, "") for h in signed.split(";")})
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(aws.access_key, aws.secret_key), "bedrock", aws.region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(
        request)), request)
    if not hmac.compare_digest(expected, signature):
        return ("InvalidSignatureException", "The request signature we calculated does not "
                "match the signature you provided. Check your AWS Secret Access Key and "
                "signing method.")
    return None


def service_account_for(fake: FakeProvider, project: str = "acme-ml") -> dict[str, str]:
    """A new service account whose token endpoint is `fake`'s: the key file an operator
    would point GOOGLE_APPLICATION_CREDENTIALS at. The fake keeps only its public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    email = f"tollgate@{project}.iam.gserviceaccount.com"
    fake.service_account = {"client_email": email, "token_uri": f"{fake.url}/token",
                            "public_key": public.decode()}
    return {"type": "service_account", "project_id": project, "private_key_id": "fake1",
            "private_key": private, "client_email": email, "client_id": "1",
            "token_uri": f"{fake.url}/token"}


def _frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (lengths and CRC), string headers, payload,
    and the CRC of the whole."""
    encoded = b"".join(struct.pack("B", len(k)) + k.encode() + b"\x07" +
                       struct.pack(">H", len(v)) + v.encode() for k, v in headers.items())
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + encoded + payload
    return body + struct.pack(">I", zlib.crc32(body))


def _frame_of(sse_event: bytes) -> bytes:
    """An Anthropic SSE event as Bedrock streams it: a `chunk` event whose payload holds the
    event's JSON, base64-encoded (the last one with Bedrock's invocation metrics)."""
    data = next(line[6:] for line in sse_event.split(b"\n") if line.startswith(b"data: "))
    doc = json.loads(data)
    if doc.get("type") == "message_stop":
        doc["amazon-bedrock-invocationMetrics"] = {"inputTokenCount": 0,
                                                   "outputTokenCount": 0,
                                                   "invocationLatency": 1,
                                                   "firstByteLatency": 1}
    payload = json.dumps({"bytes": base64.b64encode(json.dumps(doc).encode()).decode(),
                          "p": "abcdefgh"}).encode()
    return _frame({":event-type": "chunk", ":content-type": "application/json",
                   ":message-type": "event"}, payload)


# The API versions the Azure fake accepts (Azure answers 404 to any other).
AZURE_API_VERSIONS = {"2024-02-01", "2024-06-01", "2024-10-21", "2025-01-01-preview",
                      "2025-04-01-preview"}

ROUTES = {
    ("openai", "/v1/chat/completions"): _Handler.openai_chat,
    ("openai", "/v1/responses"): _Handler.openai_responses,
    ("openai", "/v1/embeddings"): _Handler.openai_embeddings,
    ("anthropic", "/v1/messages"): _Handler.anthropic_messages,
    ("anthropic", "/v1/messages/count_tokens"): _Handler.anthropic_count_tokens,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--openai-port", type=int, default=9101)
    parser.add_argument("--anthropic-port", type=int, default=9102)
    parser.add_argument("--openai-key", default="sk-fake-openai")
    parser.add_argument("--anthropic-key", default="sk-ant-fake")
    parser.add_argument("--chunk-delay", type=float, default=0.0,
                        help="seconds between streamed events (keeps streams open)")
    parser.add_argument("--answer-words", type=int, default=0,
                        help="words in each answer, one streamed event each (0: a short "
                             "sentence)")
    args = parser.parse_args()
    o = FakeProvider("openai", args.openai_key, args.openai_port,
                     chunk_delay=args.chunk_delay, answer_words=args.answer_words).start()
    a = FakeProvider("anthropic", args.anthropic_key, args.anthropic_port,
                     chunk_delay=args.chunk_delay, answer_words=args.answer_words).start()
    print(f"fake openai on {o.url} (key {args.openai_key}), fake anthropic on {a.url} "
          f"(key {args.anthropic_key})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


if __name__ == "__main__":
    main()
