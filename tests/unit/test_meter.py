"""The response meter reads usage at any response size, in bounded memory."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from tollgate.meter import JSONUsageScanner, ResponseMeter
from tollgate.sse import CappedEvents, EventFilter, SSEParser


def feed_in_pieces(meter: ResponseMeter | JSONUsageScanner, body: bytes, seed: int = 1,
                   most: int = 65536) -> None:
    rng = random.Random(seed)
    i = 0
    while i < len(body):
        n = rng.randint(1, most)
        meter.feed(body[i:i + n])
        i += n


def peak_while(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def openai_json_meter(body: bytes) -> ResponseMeter:
    meter = ResponseMeter("openai", stream_requested=False)
    meter.start("application/json", len(body))
    return meter


def test_embeddings_of_2000_inputs_are_metered_past_the_first_mib():
    usage = {"prompt_tokens": 24000, "total_tokens": 24000}
    body = json.dumps({"object": "list", "data": [
        {"object": "embedding", "index": i, "embedding": [0.0123456] * 256}
        for i in range(2000)], "model": "text-embedding-3-small", "usage": usage}).encode()
    assert len(body) > 5 << 20
    meter = openai_json_meter(body)
    feed_in_pieces(meter, body)
    assert meter.complete
    assert (meter.usage().input_tokens, meter.usage().reported) == (24000, True)


def test_20mb_answer_is_metered_in_bounded_memory():
    # Decoys a naive search would take: "usage" inside strings, escaped quotes, a nested
    # usage key in a tool's input, a string value "usage".
    content = ('He said \\"usage\\": {\\"input_tokens\\": 1} and "usage": {} ' * 10
               ).replace('"usage"', '\\"usage\\"')
    filler = "x\\n\\\\" * (20 * 1024 * 1024 // 4)
    body = (
        '{"id": "msg_1", "type": "message", "role": "usage", "content": ['
        f'{{"type": "text", "text": "{content}{filler}"}}, '
        '{"type": "tool_use", "id": "t", "name": "n", "input": {"usage": {"input_tokens": 7}}}'
        '], "stop_reason": "end_turn", '
        '"usage": {"input_tokens": 31, "output_tokens": 5000000, '
        '"cache_read_input_tokens": 2}}'
    ).encode()
    json.loads(body)  # it is valid JSON
    meter = ResponseMeter("anthropic", stream_requested=False)
    meter.start("application/json", len(body))
    peak = peak_while(lambda: feed_in_pieces(meter, body, most=1 << 16))
    used = meter.usage()
    assert (used.input_tokens, used.output_tokens, used.cached_input_tokens) == (31, 5000000, 2)
    assert peak < 1 << 20, f"the meter held {peak} bytes for a {len(body)} byte answer"


@pytest.mark.parametrize("seed", range(20))
def test_usage_found_whatever_the_split(seed):
    body = json.dumps({"id": "x", "choices": [{"message": {"content": 'a"b\\c' * 50}}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 4},
                       "metadata": {"usage": "not this"}}).encode()
    scanner = JSONUsageScanner()
    feed_in_pieces(scanner, body, seed=seed, most=7)
    assert json.loads(scanner.found or b"null") == {"prompt_tokens": 3, "completion_tokens": 4}


def test_no_usage_object_means_no_usage():
    meter = openai_json_meter(b'{"usage": null, "x": {"usage": {"prompt_tokens": 9}}}')
    meter.feed(b'{"usage": null, "x": {"usage": {"prompt_tokens": 9}}}')
    assert not meter.usage().reported


def sse(doc: dict) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def test_stream_memory_does_not_grow_with_its_length():
    chunk = sse({"choices": [{"delta": {"content": "word "}}]})
    meter = ResponseMeter("openai", stream_requested=True)
    meter.start("text/event-stream", None)

    def run(n: int) -> None:
        for _ in range(n):
            meter.feed(chunk)

    small, large = peak_while(lambda: run(2_000)), peak_while(lambda: run(50_000))
    assert large < small + 64 * 1024, (small, large)
    meter.feed(sse({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 52000}}))
    meter.feed(b"data: [DONE]\n\n")
    assert meter.complete and meter.events == 52_002
    assert meter.usage().output_tokens == 52000


def test_a_10mb_event_line_is_counted_not_held():
    line = sse({"choices": [{"delta": {"content": "z" * (10 << 20)}}]})
    meter = ResponseMeter("openai", stream_requested=True)
    meter.start("text/event-stream", None)
    peak = peak_while(lambda: feed_in_pieces(meter, line, most=1 << 14))
    assert peak < 1 << 20, peak
    used = meter.usage()  # cut off before any usage: estimated from what streamed
    assert not used.reported and used.output_tokens >= (10 << 20) // 4


@pytest.mark.parametrize("seed", range(30))
def test_lf_only_streams_parse_as_the_general_line_rules_parse_them(seed):
    """Streams whose lines end in LF alone take a faster path; cut anywhere, they give the
    events the rules for every line end give (comments, named events, ids, multi-line data,
    lines over the parser's bound, UTF-8 split across chunks)."""
    rng = random.Random(seed)
    pieces = [b": keep-alive\n", b"event: delta\n", b"id: 7\n", b"data: first\n",
              b"data: second line\n", "data: caf\u00e9 \u2713\n".encode(), b"data\n",
              b"data:tight\n", b"data:  two spaces\n", b"data: \n",
              b"data: " + b"x" * 300 + b"\n", b"retry: 10\n", b"\n", b"\n"]
    stream = b"".join(rng.choice(pieces) for _ in range(200)) + b"\n"
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 60)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    fast, general = SSEParser(max_line=200), SSEParser(max_line=200)
    got = [e for c in chunks for e in fast.feed(c)]
    assert got == [e for c in chunks for e in general._feed_any(c)]
    assert any(e.dropped for e in got) and any(e.event == "delta" for e in got)


def test_parser_handles_a_long_line_in_pieces():
    parser = SSEParser()
    data = "q" * (4 << 20)
    payload = f"event: big\ndata: {data}\n\n".encode()
    events = []
    for i in range(0, len(payload), 4096):
        events += parser.feed(payload[i:i + 4096])
    assert [(e.event, len(e.data)) for e in events] == [("big", len(data))]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("ends", [b"\n", b"\r\n"])
def test_a_parser_hands_each_long_line_to_its_reader_whole_and_in_order(seed, ends):
    """`long_line` gets every byte of each line over `max_line` (split anywhere, the whole
    line in one chunk too), then None; shorter lines and the events stay as before."""
    got: list[bytes | None] = []
    parser = SSEParser(max_line=100, long_line=got.append)
    long_one, long_two = b"data: " + b"a" * 300, b"data: " + b"b" * 101
    stream = ends.join([b"event: x", long_one, b"", b"data: short", b"", long_two, b"", b""])
    events = []
    if seed == 0:
        events += parser.feed(stream)
    else:
        rng, i = random.Random(seed), 0
        while i < len(stream):
            n = rng.randint(1, 40)
            events += parser.feed(stream[i:i + n])
            i += n
    lines, line = [], b""
    for piece in got:
        if piece is None:
            lines.append(line)
            line = b""
        else:
            line += piece
    assert lines == [long_one, long_two]
    assert [(e.event, e.data, e.dropped > 0) for e in events] == [
        ("x", "", True), ("message", "short", False), ("message", "", True)]


def test_event_filter_passes_a_long_event_whole():
    kept = EventFilter(lambda e: False)
    payload = b"data: " + b"y" * (2 << 20) + b"\n\n" + b"data: next\n\n"
    out = b"".join(kept.feed(payload[i:i + 1000]) for i in range(0, len(payload), 1000))
    assert out + kept.flush() == payload


@pytest.mark.parametrize("seed", range(40))
def test_the_usage_cut_holds_little_and_drops_only_the_usage_chunk(seed):
    """However the stream is cut into chunks (at random, and between the two newlines that
    end a 200 KB event), the client gets every byte but the usage chunk's, and the cut never
    holds more than a usage chunk's worth of an unfinished event."""
    from tollgate.usage import MAX_USAGE_CHUNK_BYTES, USAGE_ONLY_HINT, is_usage_only_chunk

    big = b'data: {"choices": [{"delta": {"content": "' + b"z" * 200_000 + b'"}}]}\n\n'
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
    done = b"data: [DONE]\n\n"
    stream = b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n' + big + usage + done
    rng = random.Random(seed)
    cuts = [len(stream) - len(done) - len(usage) - 1] if seed == 0 else \
        sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40)))
    cut = EventFilter(is_usage_only_chunk, MAX_USAGE_CHUNK_BYTES, USAGE_ONLY_HINT)
    out, sent = b"", 0
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += cut.feed(stream[a:b])
        sent = b
        assert sent - len(out) <= MAX_USAGE_CHUNK_BYTES + len(usage)  # held back, at most
    assert out + cut.flush() == stream.replace(usage, b"")


def test_a_rewriter_never_holds_an_event_past_the_cap():
    ended: list[str] = []
    capped = CappedEvents(EventFilter(lambda e: False), b"data: {\"error\": {}}\n\n",
                          ended.append, cap=64 * 1024)
    small = b"data: ok\n\n" * 3
    assert capped.feed(small[:7]) + capped.feed(small[7:]) == small  # whole events pass
    big = b"data: " + b"z" * (1 << 20) + b"\n\n"
    out = b"".join(capped.feed(big[i:i + 4096]) for i in range(0, len(big), 4096))
    assert out == b"data: {\"error\": {}}\n\n" and len(ended) == 1
    assert capped.feed(b"data: later\n\n") == b"" and capped.flush() == b""


@pytest.mark.parametrize("size", [64 * 1024 - 2, 64 * 1024 - 1, 64 * 1024 + 10])
@pytest.mark.parametrize("piece", [1000, 70_000])
def test_an_event_over_the_cap_ends_the_stream_however_it_arrives(size, piece):
    """Exactly the events over the cap end the stream, whether they arrive in pieces or
    whole in one chunk (with their boundary)."""
    ended: list[str] = []
    capped = CappedEvents(EventFilter(lambda e: False), b"END", ended.append, cap=64 * 1024)
    event = b"data: " + b"z" * (size - 8) + b"\n\n"
    stream = b"data: a\n\n" + event + b"data: b\n\n"
    out = b"".join(capped.feed(stream[i:i + piece]) for i in range(0, len(stream), piece))
    out += capped.flush()
    assert len(event) == size
    if size > 64 * 1024:
        assert out == b"data: a\n\nEND" and len(ended) == 1
    else:
        assert out == stream and ended == []


def test_bedrock_event_stream_frames_become_anthropic_sse_at_any_split():
    """Frames split anywhere are decoded once whole; usage is metered from them; an
    exception frame mid-stream becomes an Anthropic error event."""
    from tests.fakes.providers import _frame, _frame_of
    from tollgate.eventstream import EventStreamToSSE
    from tollgate.meter import ResponseMeter

    def sse(kind: str, doc: dict) -> bytes:
        return f"event: {kind}\ndata: {json.dumps(doc)}\n\n".encode()

    events = [
        sse("message_start", {"type": "message_start", "message": {
            "id": "m", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [], "usage": {"input_tokens": 12, "output_tokens": 1}}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": "Hi"}}),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                              "usage": {"output_tokens": 7}}),
        sse("message_stop", {"type": "message_stop"})]
    raw = b"".join(_frame_of(e) for e in events)
    for step in (1, 7, 64, len(raw)):
        frames, meter = EventStreamToSSE(), ResponseMeter("anthropic", True)
        meter.start("application/vnd.amazon.eventstream", None)
        out = b""
        for i in range(0, len(raw), step):
            out += frames.feed(raw[i:i + step])
            meter.feed(raw[i:i + step])
        assert out.count(b"event: ") == 4 and b"amazon-bedrock-invocationMetrics" not in out
        used = meter.usage()
        assert (used.input_tokens, used.output_tokens) == (12, 7) and meter.complete
    throttled = _frame({":message-type": "exception", ":exception-type": "throttlingException",
                        ":content-type": "application/json"},
                       b'{"message": "Too many tokens, please wait."}')
    out = EventStreamToSSE().feed(_frame_of(events[0]) + throttled)
    assert b"event: error" in out and b"rate_limit_error" in out and b"Too many tokens" in out
    assert b"could not be read" in EventStreamToSSE().feed(b"\x00" * 16)


@pytest.mark.parametrize("seed", range(5))
def test_the_service_tier_is_found_beside_usage_whatever_the_split(seed):
    body = json.dumps({"id": "x", "service_tier": "flex", "choices": [{"message": {
        "content": 'quoted "service_tier": "priority" ' * 500}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5}}).encode()
    meter = ResponseMeter("openai", False)
    meter.start("application/json", len(body))
    feed_in_pieces(meter, body, seed, most=7)
    used = meter.usage()
    assert (used.service_tier, used.input_tokens, used.output_tokens) == ("flex", 10, 5)


def test_a_null_service_tier_is_none_and_the_next_key_is_not_taken_for_it():
    body = b'{"service_tier": null, "model": "gpt-5", "usage": {"prompt_tokens": 3}}'
    for size in (1, 2, 3, len(body)):
        meter = ResponseMeter("openai", False)
        meter.start("application/json", None)
        for i in range(0, len(body), size):
            meter.feed(body[i:i + size])
        assert meter.usage().service_tier is None and meter.usage().input_tokens == 3


def test_converse_tier_object_and_invoke_tier_header():
    body = json.dumps({"output": {}, "serviceTier": {"type": "priority"},
                       "usage": {"inputTokens": 3, "outputTokens": 4}}).encode()
    meter = ResponseMeter("converse", False)
    meter.start("application/json", len(body))
    feed_in_pieces(meter, body, 3, most=5)
    assert meter.usage().service_tier == "priority"
    invoke = ResponseMeter("anthropic", False)
    invoke.start("application/json", None, tier="flex")
    invoke.feed(b'{"usage": {"input_tokens": 3, "output_tokens": 4}}')
    assert invoke.usage().service_tier == "flex"
    standard = ResponseMeter("anthropic", False)
    standard.start("application/json", None, tier="default")
    standard.feed(b'{"usage": {"input_tokens": 3, "output_tokens": 4}}')
    assert standard.usage().service_tier is None


def test_anthropic_stream_keeps_its_hour_long_cache_writes_through_message_delta():
    meter = ResponseMeter("anthropic", True)
    meter.start("text/event-stream", None)
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 100,
        "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 70},
        "service_tier": "priority"}}}
    delta = {"type": "message_delta", "usage": {"output_tokens": 9,
                                                "cache_creation_input_tokens": 100}}
    for doc in (start, delta, {"type": "message_stop"}):
        meter.feed(f"event: {doc['type']}\ndata: {json.dumps(doc)}\n\n".encode())
    used = meter.usage()
    assert (used.cache_write_tokens, used.cache_write_1h_tokens, used.output_tokens) == \
        (30, 70, 9)
    assert used.service_tier == "priority" and used.reported


def test_usage_is_read_from_json_the_fast_reader_refuses():
    """NaN and half a surrogate pair are JSON Python reads (a provider echoing a client's
    text can send them): the answer and the stream are still metered."""
    odd = '"text": "\\ud800", "score": NaN'
    body = ('{"id": "x", ' + odd + ', "usage": {"prompt_tokens": 8, '
            '"completion_tokens": 2}}').encode()
    meter = openai_json_meter(body)
    meter.feed(body)
    assert (meter.usage().input_tokens, meter.usage().output_tokens) == (8, 2)
    stream = ResponseMeter("openai", True)
    stream.start("text/event-stream", None)
    stream.feed(b'data: {"choices": [], ' + odd.encode() + b', "usage": {"prompt_tokens": 8, '
                b'"completion_tokens": 3}}\n\ndata: [DONE]\n\n')
    assert (stream.usage().output_tokens, stream.usage().reported) == (3, True)


def _responses_answer(searches: int, text: str) -> bytes:
    calls = [{"type": "web_search_call", "id": f"ws_{i}", "status": "completed",
              "action": {"type": "search", "query": "q"}} for i in range(searches)]
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return json.dumps({"id": "resp_1", "object": "response", "status": "completed",
                       "output": [*calls, message], "tools": [{"type": "web_search"}],
                       "usage": {"input_tokens": 10, "output_tokens": 20}}).encode()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("size", [100, 400_000])  # held and parsed whole; scanned
def test_responses_web_search_calls_are_counted_in_json_whatever_the_split(seed, size):
    """OpenAI's usage does not count the searches: its `web_search_call` output items do,
    split anywhere across chunks; text that quotes one (escaped) is not one."""
    decoy = 'she wrote {"type": "web_search_call"} ' + "x" * size
    body = _responses_answer(3, decoy)
    meter = openai_json_meter(body)
    feed_in_pieces(meter, body, seed=seed, most=17 if size < 1000 else 4096)
    used = meter.usage()
    assert (used.web_search_requests, used.input_tokens) == (3, 10)


def test_responses_web_search_calls_are_counted_in_a_stream_as_each_is_done():
    """Counted from each call's `response.output_item.done`: a closing event too large to
    hold, or none (a stream cut short), still leaves the searches that ran."""
    def ev(kind: str, **data: object) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

    calls = [ev("response.output_item.done", output_index=i,
                item={"type": "web_search_call", "id": f"ws_{i}", "status": "completed"})
             for i in range(2)]
    message = ev("response.output_item.done", output_index=2, item={"type": "message"})
    closing = ev("response.completed", response=json.loads(_responses_answer(2, "y" * 70_000)))
    for tail, reported in ((closing, True), (b"", False)):  # 70 KB: scanned, not held
        meter = ResponseMeter("openai", stream_requested=True)
        meter.start("text/event-stream", None)
        meter.feed(b"".join([*calls, message, tail]))
        used = meter.usage()
        assert (used.web_search_requests, used.reported) == (2, reported)


def _closing_event(text: str, usage: object, tier: object = "default") -> bytes:
    """A Responses `response.completed` event: the whole answer again, then its usage."""
    response = {"id": "resp_1", "object": "response", "status": "completed",
                "output": [{"type": "message", "content": [
                    {"type": "output_text", "text": text,
                     "annotations": [{"usage": {"input_tokens": 666}}]}]}],
                "service_tier": tier, "usage": usage, "metadata": {"usage": "no"}}
    doc = {"type": "response.completed", "sequence_number": 9, "response": response}
    return f"event: response.completed\ndata: {json.dumps(doc)}\n\n".encode()


@pytest.mark.parametrize("seed", range(12))
def test_a_long_responses_closing_event_is_scanned_for_its_usage_whatever_the_split(seed):
    """`response.completed` repeats the whole answer, so past 64 KiB it is not held: its
    `response.usage` and `response.service_tier` are found as it passes, in bounded memory,
    and nothing else that looks like usage (in text, an annotation, metadata) is taken."""
    text = 'quoting "usage": {"input_tokens": 5} ' + "w " * 200_000
    usage = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 8},
             "output_tokens": 200_010, "output_tokens_details": {"reasoning_tokens": 1_500}}
    stream = b"event: response.created\ndata: {\"type\": \"response.created\"}\n\n" + \
        _closing_event(text, usage, "flex")
    meter = ResponseMeter("openai", stream_requested=True)
    meter.start("text/event-stream", None)
    peak = peak_while(lambda: feed_in_pieces(meter, stream, seed=seed, most=1 << 15))
    used = meter.usage()
    assert used.reported and meter.complete
    assert (used.input_tokens, used.cached_input_tokens, used.output_tokens,
            used.reasoning_tokens, used.service_tier) == (32, 8, 200_010, 1_500, "flex")
    assert peak < 256 << 10, f"the meter held {peak} bytes for a {len(stream)} byte stream"


def test_a_long_closing_event_without_usage_leaves_the_estimate():
    """A `response.failed` (usage null) or a long event of another kind reports nothing:
    the stream stays estimated from what it streamed."""
    for event in (_closing_event("w " * 50_000, None),
                  b"data: " + json.dumps({"type": "response.output_text.delta",
                                          "delta": "w " * 50_000}).encode() + b"\n\n"):
        meter = ResponseMeter("openai", stream_requested=True)
        meter.start("text/event-stream", None)
        meter.feed(event)
        assert not meter.usage().reported


@pytest.mark.parametrize("seed", range(12))
def test_a_long_last_gemini_event_is_scanned_for_its_usage_and_finish_whatever_the_split(
        seed):
    """Gemini's last event can be long (a function call's whole arguments): its running
    usage total is found as it passes, and its finish reason ends the stream; a quoted
    "finishReason" in the arguments is not one."""
    usage = {"promptTokenCount": 12, "candidatesTokenCount": 40_000,
             "thoughtsTokenCount": 900}
    first = {"candidates": [{"content": {"parts": [{"text": "Writing it."}]}}],
             "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 3}}
    content = '{"finishReason": "STOP"} ' + "w " * 60_000

    def last(finish: bool) -> dict:
        candidate = {"content": {"parts": [{"functionCall": {
            "name": "write", "args": {"content": content}}}]}, **(
            {"finishReason": "STOP"} if finish else {})}
        return {"candidates": [candidate], "usageMetadata": usage}

    for finish in (True, False):
        stream = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n"
                          for e in (first, last(finish)))
        meter = ResponseMeter("gemini", stream_requested=True)
        meter.start("text/event-stream", None)
        feed_in_pieces(meter, stream, seed=seed, most=1 << 14)
        used = meter.usage()
        assert (meter.complete, used.reported) == (finish, finish)
        assert (used.input_tokens, used.reasoning_tokens) == (12, 900)
        assert used.output_tokens == 40_900 if finish else used.output_tokens >= 40_900


def test_a_long_chat_chunk_that_carries_usage_is_scanned_for_it():
    """An OpenAI-compatible provider may put usage in the chunk with the last (long) delta,
    where OpenAI sends a chunk of its own: it is found there too, and a long chunk without
    usage leaves the estimate."""
    for usage in ({"prompt_tokens": 21, "completion_tokens": 30_000}, None):
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": "w " * 40_000}, "finish_reason": "stop"}],
            **({"usage": usage} if usage else {})}
        meter = ResponseMeter("openai", stream_requested=True)
        meter.start("text/event-stream", None)
        feed_in_pieces(meter, b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n",
                       most=1 << 13)
        used = meter.usage()
        assert used.reported == (usage is not None)
        if usage:
            assert (used.input_tokens, used.output_tokens) == (21, 30_000)


def _cut_inside(data: bytes, word: bytes) -> list[bytes]:
    """`data` in pieces cut in the middle of every occurrence of `word`."""
    cuts = [i + len(word) // 2 for i in range(len(data)) if data.startswith(word, i)]
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def test_a_search_call_or_finish_reason_cut_across_two_pieces_still_counts():
    """What a scanned answer or a long event says is found however the bytes are cut, a
    cut inside the very words looked for included."""
    body = _responses_answer(3, "x" * 400_000)
    meter = openai_json_meter(body)
    for piece in _cut_inside(body, b"web_search_call"):
        meter.feed(piece)
    assert meter.usage().web_search_requests == 3
    event = {"candidates": [{"content": {"parts": [{"text": "w " * 40_000}]},
                             "finishReason": "STOP"}],
             "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 40_000}}
    stream = b"data: " + json.dumps(event).encode() + b"\r\n\r\n"
    meter = ResponseMeter("gemini", stream_requested=True)
    meter.start("text/event-stream", None)
    for piece in _cut_inside(stream, b"finishReason"):
        meter.feed(piece)
    assert meter.complete and meter.usage().reported
