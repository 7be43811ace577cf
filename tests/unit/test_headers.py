"""Which headers cross the gateway, each way: one table, for every class of header."""

from __future__ import annotations

import pytest

from tollgate import headers

PREFIX = "X-LangWatch-"


@pytest.mark.parametrize("name, crosses", [
    # The client's credentials: the provider's own are set instead.
    ("authorization", False), ("x-api-key", False), ("api-key", False),
    ("x-goog-api-key", False), ("proxy-authorization", False),
    # One connection's, not the message's.
    ("keep-alive", False), ("proxy-connection", False), ("te", False), ("trailer", False),
    ("upgrade", False),
    # Who is billed is the provider credential's to say, never the client's.
    ("openai-organization", False), ("openai-project", False),
    ("x-goog-user-project", False),
    # The gateway's and Envoy's own controls.
    ("x-langwatch-debug", False), ("X-LangWatch-Trace", False), ("x-tollgate-cluster", False),
    ("x-tollgate-anything", False), ("x-envoy-retry-on", False),
    ("x-envoy-upstream-rq-timeout-ms", False),
    # The message itself: passes as the client sent it.
    ("content-type", True), ("accept", True), ("user-agent", True),
    ("anthropic-version", True), ("anthropic-beta", True), ("openai-beta", True),
    ("x-stainless-lang", True), ("traceparent", True), ("idempotency-key", True),
    ("x-client-request-id", True),
    # The connection and the body's framing are the host's (it frames what it sends).
    ("connection", True), ("content-length", True), ("transfer-encoding", True),
])
def test_what_goes_up(name, crosses):
    assert (name.lower() not in headers.upstream_removals([name], PREFIX)) is crosses


@pytest.mark.parametrize("name, crosses", [
    ("set-cookie", False), ("Set-Cookie", False), ("set-cookie2", False),
    ("openai-organization", False), ("openai-project", False),
    ("anthropic-organization-id", False),
    ("content-type", True), ("openai-processing-ms", True), ("x-request-id", True),
    ("request-id", True), ("x-ratelimit-remaining-requests", True),
    ("anthropic-ratelimit-requests-remaining", True), ("retry-after", True),
    ("openai-version", True),
])
def test_what_comes_back(name, crosses):
    assert (not headers.downstream_removals([name])) is crosses
