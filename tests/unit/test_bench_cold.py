"""bench.cold: the decision service's time on requests decided from a precedent, in one
process, with the caches emptied before each step."""

from __future__ import annotations

import base64
import json

import pytest

from bench.cold import (
    ANSWER,
    ROOT,
    STEPS,
    Evictor,
    _round,
    decide_request,
    end_entry,
    meter_post,
    request_id_of,
    table,
)
from bench.latency import BODY, _Url
from bench.quick import governed
from extproc.decider import _head, client_request, response_head
from extproc.proxy_replies import _decided
from tests.conftest import make_config


def test_it_sends_what_the_decide_filter_sends_for_the_sdks_request():
    raw = decide_request("tg-secret", BODY)
    head, _, body = raw.partition(b"\r\n\r\n")
    parsed = _head(head)
    assert (parsed.path, parsed.length, body) == (b"/decide", len(BODY), BODY)
    headers, whole, declared = client_request(parsed.fields[b"x-tollgate-head"], body,
                                              parsed.fields[b"x-tollgate-body"])
    assert (whole, declared) == (BODY, None)
    assert headers[":path"] == "/v1/chat/completions" and headers[":method"] == "POST"
    assert headers["authorization"] == "Bearer tg-secret"
    # What differs on every request is not in it (the filter leaves it out).
    assert "content-length" not in headers and "x-request-id" not in headers
    assert base64.b64decode(parsed.fields[b"x-tollgate-head"]).count(b"\n") == \
        len(headers) - 1


def test_a_json_answers_end_is_the_access_log_entry_the_meter_filter_leaves():
    request_id, posts, tail, whole = _decided(end_entry("req_01"))
    assert (request_id, posts, tail) == ("req_01", 0, ANSWER)
    assert whole is not None and whole.first_byte is None and whole.at is not None
    status, headers, rest = response_head(whole.head)
    assert (status, headers["content-type"], rest) == (200, "application/json", b"")
    assert json.loads(tail)["usage"]["prompt_tokens"] == 8


def test_for_an_older_code_it_is_the_meter_filters_last_post():
    head, _, payload = meter_post("req_02").partition(b"\r\n\r\n")
    parsed = _head(head)
    assert parsed.path == b"/meter" and parsed.length == len(payload)
    assert (parsed.fields[b"x-tollgate-request"], parsed.fields[b"x-tollgate-seq"],
            parsed.fields[b"x-tollgate-end"]) == ("req_02", "0", "1")
    status, headers, body = response_head(payload)
    assert (status, headers["content-type"], body) == (200, "application/json", ANSWER)


def test_a_short_streams_end_is_its_head_its_events_and_its_first_byte():
    """(A short stream: the meter filter posted none of it.)"""
    _, posts, body, whole = _decided(end_entry("req_03", stream=True))
    assert posts == 0 and whole is not None and whole.first_byte is not None
    status, headers, _ = response_head(whole.head)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == json.loads(ANSWER)["usage"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "pong"


def test_the_request_id_is_read_from_a_forwarding_answer_alone():
    answer = (b"HTTP/1.1 200 OK\r\nx-tollgate-set-authorization: Bearer sk\r\n"
              b"x-tollgate-meta-request_id: req_02\r\ncontent-length: 0\r\n\r\n")
    assert request_id_of(answer) == "req_02"
    with pytest.raises(ValueError, match="not a forwarded"):
        request_id_of(b"HTTP/1.1 200 OK\r\nx-tollgate-reply: 401\r\n\r\n{}")


def test_the_evictor_writes_all_of_its_buffer():
    evict = Evictor(3 << 20)
    evict.buffer[:] = b"\xff" * len(evict.buffer)
    evict()
    assert evict.buffer.count(0) == len(evict.buffer)


def test_the_table_gives_each_codes_median_round_and_their_ratio_round_by_round():
    def run(us: float) -> dict[str, dict[str, list[float]]]:
        return {mode: {step: [us / 1e6, us / 1e6, 9.0] for step in STEPS}
                for mode in ("cold", "warm")}

    # The third round met a slow machine: both codes took twice as long.
    lines = table("label", {"now": [run(100), run(110), run(220)],
                            "abc1234": [run(200), run(220), run(440)]})
    assert lines[0] == "label" and lines[3].split() == ["step", "now", "abc1234", "ratio",
                                                        "now", "abc1234", "ratio"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[5:9]}
    assert rows["decide"] == ["110.0", "220.0", "0.50x"] * 2
    assert rows["total"] == ["330.0", "660.0", "0.50x"] * 2
    assert lines[9:] == ["", "ratios round by round, lowest to highest:",
                         "  cold: decide 0.50 to 0.50, meter 0.50 to 0.50, settle 0.50 to "
                         "0.50, total 0.50 to 0.50", "  warm: decide 0.50 to 0.50, meter 0.50 "
                         "to 0.50, settle 0.50 to 0.50, total 0.50 to 0.50"]
    # Rounds that disagree show it: the median says 0.50x, the spread says how sure.
    lines = table("label", {"now": [run(100), run(100), run(100)],
                            "abc1234": [run(200), run(250), run(125)]})
    assert "  cold: decide 0.40 to 0.80," in "\n".join(lines)
    assert table("one", {"now": [run(100)]})[-1].startswith("total")


def test_a_round_decides_every_request_but_the_first_from_its_precedent(tmp_path):
    """The real decision service, through its exchange, a JSON answer and a stream: a round
    that measured full decisions instead would say so rather than print their figures."""
    config = make_config(tmp_path, _Url("http://127.0.0.1:9"), _Url("http://127.0.0.1:9"))
    secret = governed(config)
    for stream in (False, True):
        result = _round(ROOT, config, secret, 3, stream=stream)
        for mode in ("cold", "warm"):
            assert [len(result[mode][step]) for step in STEPS] == [3, 3, 3]
            assert all(0 < t < 1 for step in STEPS for t in result[mode][step])
    full = config.with_name("full.yaml")
    full.write_text(config.read_text().replace("gateway:\n", "gateway:\n  precedents: false\n",
                                               1))
    with pytest.raises(RuntimeError, match="0 of 44 requests were decided from a precedent"):
        _round(ROOT, full, secret, 3)


def test_functions_named_on_the_command_line_are_timed_too(tmp_path):
    """`--function` adds to bench.timed's list, a property's getter and a cached
    property's function as well."""
    from bench.timed import resolve
    from tollgate.telemetry import RequestTrace

    assert resolve("tollgate.telemetry:RequestTrace.traceparent") == (
        RequestTrace.traceparent.fget.__code__, "RequestTrace.traceparent")
    assert resolve("tollgate.telemetry:RequestTrace.trace_id")[0] is \
        RequestTrace.__dict__["trace_id"].func.__code__
    config = make_config(tmp_path, _Url("http://127.0.0.1:9"), _Url("http://127.0.0.1:9"))
    result = _round(ROOT, config, governed(config), 3,
                    functions=["tollgate.precedent:head_of",
                               "tollgate.telemetry:RequestTrace.traceparent"])
    timed = result["functions"]
    assert "decide_now" in " ".join(timed) and len(timed["precedent.head_of"]) >= 1
    assert all(0 < t < 1 for t in timed["RequestTrace.traceparent"])
    assert len(timed["RequestTrace.traceparent"]) >= 3
