"""What the transport between Envoy and a Python service costs per request, with no work done.

    python -m bench.transport [--seconds 8] [--connections 32]

The same POST goes through four Envoys in front of a compiled provider (an Envoy answering
by itself), under `wrk` (apt-get install wrk):

- plain Envoy: a route to the provider;
- Lua + HTTP: a Lua filter sends the request's head and body to a bare Python HTTP service
  on a Unix socket and applies its answer (two headers, a route), then posts the response
  body back asynchronously (the shape of tollgate's `tollgate.decide`, plus a metering
  post);
- ext_proc decide + tap: a bare Python gRPC servicer in tollgate's former shape (request
  headers and body FULL_DUPLEX_STREAMED, answered with headers and body; a tap in
  observability mode);
- ext_proc decide: the same without the tap.

Prints requests per second and the CPU Envoy and the Python service spent per request. The
Python services do nothing but parse and answer: the figures are the transport's floor,
which tollgate's own work adds to.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.scaling import (
    cluster,
    compiled_provider,
    envoy,
    plain_envoy,
    ready_for_wrk,
    spent,
    tree_cpu,
    wrk,
)
from extproc.envoy_config import EXT_PROC, LUA

LUA_SOURCE = """
function envoy_on_request(handle)
  local buffered = handle:body()
  local body = buffered and buffered:getBytes(0, buffered:length()) or ""
  local lines = {}
  for name, value in pairs(handle:headers()) do lines[#lines + 1] = name .. ": " .. value end
  local answer = handle:httpCall("service", {[":method"] = "POST", [":path"] = "/decide",
    [":authority"] = "bench"}, table.concat(lines, "\\n") .. "\\n\\n" .. body, 5000)
  local headers = handle:headers()
  headers:replace("authorization", answer["x-set-authorization"])
  headers:replace("x-cluster", answer["x-cluster"])
  handle:clearRouteCache()
end

function envoy_on_response(handle)
  local parts = {}
  for chunk in handle:bodyChunks() do parts[#parts + 1] = chunk:getBytes(0, chunk:length()) end
  handle:httpCall("service", {[":method"] = "POST", [":path"] = "/meter",
    [":authority"] = "bench"}, table.concat(parts), 5000, true)
end
"""

DECIDED = (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-set-authorization: Bearer provider\r\n"
           b"x-cluster: provider\r\n\r\n")
METERED = b"HTTP/1.1 204 No Content\r\n\r\n"


def _answering(decided: bytes) -> Any:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A bare decision service: read each request, answer at once."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lowered = head.lower()
                at = lowered.find(b"content-length:")
                length = int(lowered[at + 15:lowered.find(b"\r\n", at)]) if at >= 0 else 0
                await reader.readexactly(length)
                writer.write(decided if head.startswith(b"POST /decide") else METERED)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
    return serve


async def serve_http(path: str, decided: bytes = DECIDED) -> None:
    """`decided`: the whole HTTP answer to every decision (a meter post gets a 204)."""
    server = await asyncio.start_unix_server(_answering(decided), path, backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()


async def serve_grpc(path: str) -> None:
    """A bare ext_proc servicer: decide answers headers and body once the body has ended;
    the tap reads until the response ends."""
    os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_listener")
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    header = [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v))
              for k, v in (("authorization", b"Bearer provider"), ("x-cluster", b"provider"))]

    class Bare(pb_grpc.ExternalProcessorServicer):
        async def Process(self, requests: Any, context: Any) -> Any:
            role = dict(context.invocation_metadata()).get("role")
            async for msg in requests:
                kind = msg.WhichOneof("request")
                if role == "tap":
                    if (kind == "response_body" and msg.response_body.end_of_stream) or \
                            (kind == "response_headers" and msg.response_headers.end_of_stream):
                        return
                elif kind == "request_body" and msg.request_body.end_of_stream:
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse(
                        response=pb.CommonResponse(clear_route_cache=True,
                                                   header_mutation=pb.HeaderMutation(
                                                       set_headers=header))))
                    yield pb.ProcessingResponse(request_body=pb.BodyResponse(
                        response=pb.CommonResponse(body_mutation=pb.BodyMutation(
                            streamed_response=pb.StreamedBodyResponse(
                                body=msg.request_body.body, end_of_stream=True)))))

    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

    class Sink(als_pb2_grpc.AccessLogServiceServicer):
        """Envoy's access log (tollgate's requests' ends), read and let go."""

        async def StreamAccessLogs(self, requests: Any, context: Any
                                   ) -> als_pb2.StreamAccessLogsResponse:
            async for _ in requests:
                pass
            return als_pb2.StreamAccessLogsResponse()

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalProcessorServicer_to_server(Bare(), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(Sink(), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def _ext_proc(role: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"name": role, "typed_config": {
        "@type": EXT_PROC, "failure_mode_allow": False,
        "grpc_service": {"envoy_grpc": {"cluster_name": "service"}, "timeout": "5s",
                         "initial_metadata": [{"key": "role", "value": role}]}, **extra}}


DECIDE = _ext_proc("decide", {
    "processing_mode": {"request_header_mode": "SEND",
                        "request_body_mode": "FULL_DUPLEX_STREAMED",
                        "response_header_mode": "SKIP", "response_body_mode": "NONE",
                        "request_trailer_mode": "SEND", "response_trailer_mode": "SKIP"},
    "allow_content_length_header": True, "mutation_rules": {"allow_all_routing": True}})
TAP = _ext_proc("tap", {
    "observability_mode": True, "deferred_close_timeout": "5s",
    "processing_mode": {"request_header_mode": "SEND", "request_body_mode": "NONE",
                        "response_header_mode": "SEND", "response_body_mode": "STREAMED",
                        "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}})


def bare_service(kind: str, path: Path, decided: Path | None = None) -> subprocess.Popen[str]:
    """A bare `http` or `grpc` service in its own process; `decided`: a file holding the
    answer an `http` one gives every decision."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.transport", "--serve", kind,
                             str(path), *(["--decided", str(decided)] if decided else [])],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "SOCKET"), help=argparse.SUPPRESS)
    parser.add_argument("--decided", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, path = args.serve
        asyncio.run(serve_http(path, args.decided.read_bytes() if args.decided else DECIDED)
                    if kind == "http" else serve_grpc(path))
        return 0
    if not ready_for_wrk():
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-bench-transport-"))
    procs: list[subprocess.Popen[Any]] = []
    try:
        # A request whose body the bare ext_proc decide streams back (full duplex) does not
        # end upstream, so the provider answers on its headers, for every path alike: each
        # pays a connection to it per request, as bench.scaling's did before it read the
        # whole request.
        provider, provider_url = compiled_provider(workdir, whole_request=False)
        procs.append(provider)
        host, port = provider_url.removeprefix("http://").split(":")
        upstream = cluster("provider", {"socket_address": {"address": host,
                                                            "port_value": int(port)}})
        plain, plain_url = plain_envoy(workdir, provider_url)
        http_service = bare_service("http", workdir / "http.sock")
        grpc_service = bare_service("grpc", workdir / "grpc.sock")
        procs += [plain, http_service, grpc_service]
        lua_filter = {"name": "decide", "typed_config": {
            "@type": LUA, "default_source_code": {"inline_string": LUA_SOURCE}}}
        paths: list[tuple[str, str, list[int]]] = [("plain Envoy", plain_url, [plain.pid])]
        for name, filters, service in (
                ("Lua + HTTP", [lua_filter], cluster(
                    "service", {"pipe": {"path": str(workdir / "http.sock")}})),
                ("ext_proc decide + tap", [DECIDE, TAP], cluster(
                    "service", {"pipe": {"path": str(workdir / "grpc.sock")}}, h2=True)),
                ("ext_proc decide", [DECIDE], cluster(
                    "service", {"pipe": {"path": str(workdir / "grpc.sock")}}, h2=True))):
            front, port = envoy(workdir, name.replace(" ", "-"), {
                "match": {"prefix": "/"}, "route": {"cluster_header": "x-cluster"}},
                [upstream, service], tuple(filters))
            url = f"http://127.0.0.1:{port}"
            procs.append(front)
            python = http_service if "Lua" in name else grpc_service
            paths.append((name, url, [front.pid, python.pid]))
        time.sleep(1)
        print(f"\n{args.connections} in flight for {args.seconds} s (wrk); {os.cpu_count()} "
              f"cores; the Python services do no work\n")
        header = f"{'path':<24}{'req/s':>7}{'CPU/req ms':>12}{'Envoy':>8}{'Python':>8}"
        print(header + "\n" + "-" * len(header))
        for name, url, pids in paths:
            url += "/v1/chat/completions"
            status = httpx.post(url, content=b"{}", headers={"authorization": "x"}).status_code
            assert status == 200, f"{name}: {status}"
            wrk(url, {"authorization": "Bearer x"}, 2, args.connections, workdir)
            before = [tree_cpu(p) for p in pids]
            rate, done, bad = wrk(url, {"authorization": "Bearer x"}, args.seconds,
                                  args.connections, workdir)
            assert bad == 0, f"{name}: {bad} answers were not 2xx"
            each = [sum(spent(b, tree_cpu(p), done).values()) for b, p in zip(
                before, pids, strict=True)]
            python = f"{each[1]:>8.3f}" if len(each) > 1 else f"{'':>8}"
            print(f"{name:<24}{rate:>7.0f}{sum(each):>12.3f}{each[0]:>8.3f}{python}")
    finally:
        for proc in procs:
            proc.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
