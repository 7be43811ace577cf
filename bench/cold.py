"""The decision service's own time on a request decided from a precedent, with the
machine's caches emptied before each step (cold) and left as they are (warm): in one
process, with no Envoy, figures that repeat within a few percent, to weigh a change to the
request's path in seconds (bench.quick's move 5% or more with the machine's mood).

    python -m bench.cold [--requests 100] [--rounds 6] [--against REV] [--functions]
                         [--function MODULE:QUALNAME ...] [--stream]

Each request goes through the decision service as Envoy's filters send it, byte for byte
(extproc.decider's exchange, the OpenAI SDK's headers, the governed profile: a key with a
model allowlist under a blocking org budget, on SQLite): its decision (`/decide`, answered
from the precedent the first request left), its JSON answer's end as Envoy's access log
reports it, whole (the entry the meter filter's metadata makes: the answer's head and
bytes), and its settlement (the task that entry starts, to its commit). `--stream`: the
SDK's default stream instead (its body replaced to ask for the usage chunk; its entry: a
short stream's head, events and first byte time, which the meter filter posted none of). A
code from before the access log carried responses' ends takes the meter filter's last post
instead (`/meter`). Cold: 48 MiB are written
before each step, which evicts what the last one left in the caches (L1, L2, the 32 MiB L3
this box shares) and the TLBs, as the client, Envoy and the provider do between two of a
sidecar's requests: the decision then costs what bench.stages times behind Envoy, within
10%. Behind Envoy, every step of the decision costs three to five times its warm time;
this is why.

Each round is a process of its own, and a process's cold figures differ from the next
one's by up to 8% (where its memory lies in the caches' sets): the figures pool several
short rounds (the same code measured against itself: 0.97x to 1.02x). `--against REV` runs
REV's code (a git worktree, reading its own price table) in alternation with this
checkout's, round by round, each first in every other round, and prints the ratios (round
by round: a burst of other work on the machine moves both codes' figures alike);
`--functions` prints, for this checkout, the cold time of each function a request runs
through (bench.timed's list, timed by sys.monitoring as bench.stages does); `--function
module:Class.name` (again for more) adds one to the list, a property's getter too. Under
the table, each step's ratios round by round give their spread, which says how far to trust
a ratio: a change of 3% is not read from a run whose rounds spread 0.90 to 1.08.

Internally, `python bench/cold.py --serve CODE CONFIG SECRET N [--functions] [--function
NAME ...]` is one round: it measures CODE's decision service (imported from that
directory) and prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("decide", "meter", "settle")
WARM_UP = 20
EVICTED = 48 * 1024 * 1024  # past this box's L3 (32 MiB), and every TLB's reach

ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1764892800,
    "model": "gpt-5-mini-2025-08-07", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "pong", "refusal": None},
        "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10,
              "prompt_tokens_details": {"cached_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0}},
    "service_tier": "default"}).encode()


def decide_request(secret: str, body: bytes) -> bytes:
    """What the decide filter (extproc/decide.lua) sends for the OpenAI SDK's request: the
    client's head as Envoy presents it, in base64 (but for its request id and the body's
    length: the same for each request), and the body."""
    from extproc import envoy_config  # the measured code's, once its path is set

    head = "\n".join([
        ":authority: 127.0.0.1:8080", ":path: /v1/chat/completions", ":method: POST",
        ":scheme: http", "accept: application/json", "content-type: application/json",
        "user-agent: OpenAI/Python 2.8.1", "x-stainless-lang: python",
        "x-stainless-package-version: 2.8.1", "x-stainless-os: Linux",
        "x-stainless-arch: x64", "x-stainless-runtime: CPython",
        "x-stainless-runtime-version: 3.13.0", "x-stainless-async: false",
        "x-stainless-retry-count: 0", "x-stainless-read-timeout: 600",
        f"authorization: Bearer {secret}", "x-forwarded-proto: http"])
    encoded = base64.b64encode(head.encode()).decode()
    # (A code from before the filters named their version reads no such header.)
    filters = getattr(envoy_config, "FILTERS_VERSION", "")
    return (f"POST /decide HTTP/1.1\r\nhost: tollgate\r\nx-tollgate-body: whole\r\n"
            f"x-tollgate-head: {encoded}\r\nx-tollgate-filters: {filters}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def _chunk(fields: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764892800,
        "model": "gpt-5-mini-2025-08-07", "service_tier": "default", **fields}).encode() + b"\n\n"


def _delta(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return _chunk({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


# The provider's stream for the SDK's default request, with the usage chunk the gateway asked
# for (which the client does not get).
EVENTS = b"".join([
    _delta({"role": "assistant", "content": ""}), _delta({"content": "po"}),
    _delta({"content": "ng"}), _delta({}, "stop"),
    _chunk({"choices": [], "usage": json.loads(ANSWER)["usage"]}), b"data: [DONE]\n\n"])


def _response(stream: bool) -> tuple[bytes, bytes]:
    """The provider's response, as the meter filter copies it: its head, its body."""
    if stream:
        return b":status: 200\ncontent-type: text/event-stream; charset=utf-8\n\n", EVENTS
    return (b":status: 200\ncontent-type: application/json\n"
            b"content-length: %d\n\n" % len(ANSWER)), ANSWER


def end_entry(request_id: str, stream: bool = False, marked_end: bool = True) -> Any:
    """Envoy's access-log entry of a JSON answer's end, or a short stream's (under a
    batch's size and time: the meter filter made no post), as meter.lua leaves it: the
    response's head and bytes (a JSON answer's, of known length, after its head in the
    `end` mark; a stream's in a chunk of their own), a stream's first byte time.
    `marked_end` False: as a code from before that mark had them (its `whole` mark, the
    head and the bytes apart)."""
    from envoy.data.accesslog.v3 import accesslog_pb2
    from google.protobuf import json_format

    head, body = _response(stream)
    decided = {"request_id": request_id}
    if not marked_end:
        tail = {"n": 1, "1": base64.b64encode(body).decode(),
                "head": base64.b64encode(head).decode()}
        decided["whole"] = "1"
    elif stream:
        tail = {"n": 1, "1": base64.b64encode(body).decode(),
                "end": base64.b64encode(head).decode()}
    else:
        tail = {"end": base64.b64encode(head + body).decode()}
    if stream:
        tail["first_byte"] = str(time.time_ns() // 1000)
    started = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return json_format.ParseDict({
        "common_properties": {
            "start_time": started, "time_to_last_upstream_rx_byte": "0.001s",
            "metadata": {"filter_metadata": {
                "tollgate": decided, "tollgate.tail": tail}}},
        "response": {"response_code": 200, "response_code_details": "via_upstream"}},
        accesslog_pb2.HTTPAccessLogEntry())


def received(template: bytes, request_id: str, stream: bool) -> Any:
    """`end_entry`'s for `request_id`, from its bytes as gRPC hands the access log service
    an entry (parsed), started now: the bench's own work between steps stays small."""
    from envoy.data.accesslog.v3 import accesslog_pb2

    entry = accesslog_pb2.HTTPAccessLogEntry.FromString(template)
    common = entry.common_properties
    common.start_time.GetCurrentTime()
    common.metadata.filter_metadata["tollgate"].fields["request_id"].string_value = request_id
    if stream:
        common.metadata.filter_metadata["tollgate.tail"].fields["first_byte"].string_value = \
            str(time.time_ns() // 1000)
    return entry


def meter_post(request_id: str, stream: bool = False) -> bytes:
    """What a code from before the access log carried responses' ends took instead of
    `end_entry`: the meter filter's one post, the last, with the response's head and
    bytes."""
    head, body = _response(stream)
    first = f"x-tollgate-first-byte: {time.time_ns() // 1000}\r\n" if stream else ""
    payload = head + body
    return (f"POST /meter HTTP/1.1\r\nhost: tollgate\r\nx-tollgate-request: {request_id}\r\n"
            f"x-tollgate-seq: 0\r\nx-tollgate-end: 1\r\n{first}content-length: {len(payload)}"
            f"\r\n\r\n").encode() + payload


def request_id_of(answer: bytes) -> str:
    """The request id a decision's answer gives the filters (its metadata)."""
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b": ")
        if name == b"x-tollgate-meta-request_id":
            return value.decode()
    raise ValueError(f"not a forwarded request's answer: {answer[:200]!r}")


class Evictor:
    """Writes `size` bytes, a MiB at a time, over a buffer of its own."""

    def __init__(self, size: int = EVICTED) -> None:
        self.buffer, self.mib = bytearray(size), bytes(1 << 20)

    def __call__(self) -> None:
        for start in range(0, len(self.buffer), len(self.mib)):
            self.buffer[start:start + len(self.mib)] = self.mib


class Transport:
    """Keeps what the decision service writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, parts: list[bytes]) -> None:
        self.written.append(b"".join(parts))

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def _requests(config: Path, secret: str, n: int, cold: bool, evict: Evictor,
                    stream: bool = False) -> dict[str, list[float]]:
    from bench.latency import BODY
    from bench.quick import STREAM_BODY
    from extproc import proxy_replies
    from extproc.decider import Decider
    from extproc.proxy_replies import ProxyReplies
    from extproc.service import ExternalProcessor
    from tollgate.gateway import Gateway

    body = STREAM_BODY if stream else BODY
    gateway = Gateway.from_path(str(config), watch=False)
    processor, transport = ExternalProcessor(gateway), Transport()
    decider = Decider(processor)
    # The response's end: Envoy's access log, or, for a code from before it, a last post.
    log = ProxyReplies(gateway, processor.ended) if hasattr(ProxyReplies, "take") else None
    template = end_entry("", stream, hasattr(proxy_replies, "END")).SerializeToString()
    decider.connection_made(transport)  # type: ignore[arg-type]
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    clock = time.perf_counter
    try:
        for i in range(WARM_UP + n):
            exchange = decide_request(secret, body)
            if cold:
                evict()
            began = clock()
            decider.data_received(exchange)
            while not transport.written:  # a full decision (the first) takes turns
                await asyncio.sleep(0)
            decided = clock()
            answer = transport.written.pop()
            request_id = request_id_of(answer)
            entry = received(template, request_id, stream) if log \
                else meter_post(request_id, stream)
            if cold:
                evict()
            posted = clock()
            if log:
                log.take(entry)
            else:
                decider.data_received(entry)
            metered = clock()
            await gateway.drain()
            settled = clock()
            transport.written.clear()  # (the post's 204)
            if i >= WARM_UP:
                for step, took in zip(STEPS, (decided - began, metered - posted,
                                              settled - metered), strict=True):
                    times[step].append(took)
    finally:
        await gateway.close()
    return times


def serve(code: Path, config: Path, secret: str, n: int, functions: list[str] | None,
          stream: bool) -> dict[str, Any]:
    """One round of CODE's decision service: cold, then warm (a fresh gateway each);
    `functions`: time bench.timed's list and these too (None: time nothing)."""
    sys.path.insert(0, str(code))
    from extproc import eventloop
    from tollgate import metrics

    timer = None
    if functions is not None:
        from bench.timed import FUNCTIONS, Timer, resolve

        timer = Timer(resolve(name) for name in [*FUNCTIONS, *functions])
        timer.install()
    evict = Evictor()
    out: dict[str, Any] = {
        "cold": eventloop.run(_requests(config, secret, n, True, evict, stream))}
    if timer is not None:
        timer.uninstall()
        out["functions"] = timer.calls
    out["warm"] = eventloop.run(_requests(config, secret, n, False, evict, stream))
    out["precedents"] = metrics.REGISTRY.get_sample_value(
        "tollgate_precedent_decisions_total") or 0
    return out


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def table(label: str, rounds: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each step's p50 (µs) cold and warm for each code: the median of its rounds' p50s; a
    second code's ratio to the first: the median of the two codes' ratios round by round
    (rounds taken in turn meet the same mood of the machine, which a burst of other work can
    change between rounds)."""
    names = list(rounds)
    per_round = {name: {mode: {step: [p50(r[mode][step]) for r in runs] for step in STEPS}
                        for mode in ("cold", "warm")} for name, runs in rounds.items()}
    for by_mode in per_round.values():
        for mode in by_mode.values():
            mode["total"] = [sum(ps) for ps in zip(*(mode[s] for s in STEPS), strict=True)]
    width = 10 * len(names) + (8 if len(names) > 1 else 0)
    head = "".join(f"{n[:9]:>10}" for n in names) + ("   ratio" if len(names) > 1 else "")
    lines = [label, "", f"{'':<8}{'cold':^{width}}  {'warm':^{width}}",
             f"{'step':<8}{head}  {head}", "-" * (8 + 2 * width + 2)]
    spread: dict[str, list[str]] = {"cold": [], "warm": []}
    for step in (*STEPS, "total"):
        cells = []
        for mode in ("cold", "warm"):
            figures = [per_round[n][mode][step] for n in names]
            cell = "".join(f"{statistics.median(f):>10.1f}" for f in figures)
            if len(figures) > 1:
                ratios = [a / b for a, b in zip(*figures[:2], strict=False)]
                cell += f"{statistics.median(ratios):>7.2f}x"
                spread[mode].append(f"{step} {min(ratios):.2f} to {max(ratios):.2f}")
            cells.append(cell)
        lines.append(f"{step:<8}" + "  ".join(cells))
    if len(names) > 1:
        lines += ["", "ratios round by round, lowest to highest:",
                  *(f"  {mode}: {', '.join(steps)}" for mode, steps in spread.items())]
    return lines


def _round(code: Path, config: Path, secret: str, n: int,
           functions: list[str] | None = None, stream: bool = False) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(code),
               str(config), secret, str(n),
               *(["--functions"] if functions is not None else []),
               *(f"--function={name}" for name in functions or []),
               *(["--stream"] if stream else [])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=code, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"a round of {code} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    requests = 2 * (WARM_UP + n - 1)  # every request but the first, cold and warm
    if result["precedents"] < requests:
        raise RuntimeError(f"{code}: {result['precedents']:.0f} of {requests} requests were "
                           "decided from a precedent: not the path this measures")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--against", metavar="REV", help="a commit to measure beside")
    parser.add_argument("--functions", action="store_true",
                        help="this checkout's cold time by function")
    parser.add_argument("--function", action="append", default=[], metavar="NAME",
                        help="module:Class.name to time as well (implies --functions)")
    parser.add_argument("--stream", action="store_true",
                        help="the OpenAI SDK's default stream instead of a JSON answer")
    parser.add_argument("--serve", nargs=4, metavar=("CODE", "CONFIG", "SECRET", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        code, config, secret, n = args.serve
        timed = args.function if args.functions or args.function else None
        print(json.dumps(serve(Path(code), Path(config), secret, int(n), timed,
                               args.stream)))
        return 0

    from contextlib import ExitStack

    from bench.latency import _Url, bench_env, own_state, scratch_dir
    from bench.quick import checkout, governed, revision_of, with_tables_of
    from bench.stages import table as functions_table
    from tests.conftest import make_config

    bench_env()
    workdir = scratch_dir("tollgate-bench-cold-")
    config = make_config(workdir, _Url("http://127.0.0.1:9"), _Url("http://127.0.0.1:9"))
    secret = governed(config)
    with ExitStack() as stack:
        codes = {"now": (ROOT, own_state(config, "now"))}
        if args.against:
            revision = revision_of(args.against)
            if revision is None:
                parser.error(f"--against {args.against}: not a commit of this clone")
            code = stack.enter_context(checkout(revision))
            theirs = own_state(config, "against")
            with_tables_of(theirs, code)
            codes[args.against[:9]] = (code, theirs)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
        order = list(codes)
        for _ in range(args.rounds):  # in alternation: the machine's mood weighs on each
            for name in order:
                code, cfg = codes[name]
                rounds[name].append(_round(code, cfg, secret, args.requests,
                                           stream=args.stream))
            order.reverse()  # and neither always goes first
        functions = _round(ROOT, codes["now"][1], secret, args.requests,
                           functions=args.function, stream=args.stream) \
            if args.functions or args.function else None
    print()
    print("\n".join(table(
        f"{args.requests} requests decided from a precedent "
        f"({'the SDK default stream' if args.stream else 'a JSON answer'}), x {args.rounds} "
        "rounds, "
        "through the decision service's exchange in one process (no Envoy); caches "
        "evicted before each step (cold) and not (warm); µs, p50", rounds)))
    if functions is not None:
        print("\nthis checkout's functions, cold, inclusive, per call\n")
        print("\n".join(functions_table(functions["functions"], args.requests, WARM_UP)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
