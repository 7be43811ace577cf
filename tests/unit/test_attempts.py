"""The attempt cursor: which provider of a plan is current and why it moved past the others."""

from __future__ import annotations

from types import SimpleNamespace

from tollgate.attempts import AttemptCursor
from tollgate.request import Attempt

# As the OpenAI adapter classes statuses.
FAILURES = {429: "rate_limit", 500: "server_error", 503: "server_error"}


def attempt(provider: str) -> Attempt:
    return Attempt(provider, "http", "127.0.0.1", 1, "/v1/chat/completions", {}, [],
                   adapter=SimpleNamespace(failure_kind=FAILURES.get))


def plan(*providers: str, on: tuple[str, ...] = ("rate_limit", "timeout"),
         passed_over: list[str] | None = None) -> AttemptCursor:
    return AttemptCursor([attempt(p) for p in providers], on, passed_over)


def test_an_outcome_moves_on_only_when_the_key_falls_back_on_it_and_a_provider_is_left():
    cursor = plan("a", "b")
    assert cursor.fallback_reason(status=429) == "rate_limit"
    assert cursor.fallback_reason(error="timeout") == "timeout"
    assert cursor.fallback_reason(status=500) is None  # not in the key's fallback.on
    assert cursor.fallback_reason(status=200) is None and cursor.failure_kind(200) is None
    assert cursor.failure_kind(500) == "server_error"  # a failure all the same
    cursor.advance("rate_limit")
    assert cursor.fallback_reason(status=429) is None  # the last provider: nothing after it


def test_advancing_records_why_after_the_providers_passed_over_before_dispatch():
    cursor = plan("a", "b", "c", passed_over=["x:rate_limit (rpm 2)"])
    assert (cursor.attempt.provider_id, cursor.reached) == ("a", ["a"])
    assert cursor.advance("timeout").provider_id == "b"
    assert cursor.advance("rate_limit").provider_id == "c"
    assert cursor.fallbacks == ["x:rate_limit (rpm 2)", "a:timeout", "b:rate_limit"]
    assert cursor.fallback_count == 3 and cursor.reached == ["a", "b", "c"]


def test_next_to_finds_a_provider_from_the_current_attempt_on():
    cursor = plan("a", "b", "a")
    assert cursor.next_to("a") == 0 and cursor.next_to("b") == 1
    cursor.advance("timeout")
    assert cursor.next_to("a") == 2  # not the attempt already made
    assert cursor.next_to("z") is None
