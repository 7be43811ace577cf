"""Envoy configuration rendered from the gateway config.

Filters in front of the router:
- `tollgate.decide` (Lua, decide.lua): the request's headers and whole body go to the
  decision service (`extproc.decider`, in each ext_proc process, cluster `tollgate_decider`)
  in one HTTP exchange; the filter applies the answer: header changes (credentials,
  :authority, :path, the provider's cluster, content-length), the body to send, the
  metadata the filters after it read, or the gateway's own reply. A body whose
  content-length is over `gateway.max_body_bytes` is refused unread; one that grows past it
  meets the listener's buffer limit (Envoy's 413, recorded through the access log).
- `tollgate.meter` (Lua, meter.lua): copies each forwarded request's response, as the
  provider sent it, to the process that decided it, without holding a byte back: its end
  (the bytes since a long stream's last post, or the whole of most answers) through the
  gRPC access log (`response_end_logs`), after the client has had it; a long stream in a
  few fire-and-forget posts to the decision service as it goes. A response that does not
  end there (a reset, a reply Envoy made in the provider's place) goes through the same
  log, without the mark that it is whole.
  It also keeps a usage chunk the gateway asked for out of a stream it does not otherwise
  edit (usage_cut.lua), once it has copied the chunk.
- `tollgate.rewrite` (ext_proc) edits the responses the gateway reshapes (translations): a
  composite filter that creates its filter only for the requests whose decision set its
  header: an idle ext_proc filter still cost Envoy a few percent of its work on every request.

The gateway's response headers come from dynamic metadata that the decision filter sets, so no
round trip is spent on the response path. One cluster per model provider; the decision picks
it through the `x-tollgate-cluster` header. Requests with a fallback plan go to an aggregate
cluster instead and are retried by Envoy (see `extproc.fallback`); its upstream filter
`tollgate.attempt` (Lua, attempt.lua) asks the decision service for each attempt's changes.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi

from extproc import fallback
from extproc.listen import Listener
from tollgate import headers as header_rules
from tollgate import ratelimit
from tollgate.config.schema import Config, ModelProvider
from tollgate.errors import GatewayError
from tollgate.keys import KEY_PREFIX_CHARS
from tollgate.request import MAX_HEADER_BYTES

CLUSTER_HEADER = "x-tollgate-cluster"
# Set by the decision on requests with a fallback plan: their route retries.
FALLBACK_HEADER = "x-tollgate-fallback"
# Set by the decision on requests whose response the gateway reshapes (a translation between
# API families, reframed events, errors in the client's family): the `tollgate.rewrite`
# filter is created for them, and for nothing else. A usage chunk the gateway asked for in a
# stream it does not reshape is cut by the meter instead (usage_cut.lua).
REWRITE_HEADER = "x-tollgate-rewrite"
# Set by the decision on requests whose response carries one of the gateway's less common
# headers (EXTRA_KEYS: a budget warning, an output cap, a shadow rule's, the key's rate
# limits): their route adds those from the metadata. Each such header costs Envoy about
# 1,000 instructions a response even when its metadata is absent.
EXTRAS_HEADER = "x-tollgate-extras"
EXTPROC_CLUSTER = "tollgate_extproc"
# The decision service of every ext_proc process, which the decide filter calls.
DECIDER_CLUSTER = "tollgate_decider"
# Set by the decision when ext_proc runs as several processes: the index of the process that
# holds the request, whose own clusters its meter posts, attempts, rewrite stream and
# access log entry are sent to. Decisions are spread over all of them.
EXTPROC_PROCESS_HEADER = "x-tollgate-extproc"
# Put on every response that came from a provider (an upstream filter, so never on Envoy's
# own replies); the meter filter reads it and takes it off.
UPSTREAM_HEADER = "x-tollgate-upstream"
# Put on each attempt of a fallback plan (an upstream filter): the provider of the endpoint
# Envoy chose for it; the attempt filter reads it and takes it off.
ATTEMPT_PROVIDER_HEADER = "x-tollgate-attempt-provider"
# gRPC metadata on each ext_proc stream: the filter that opened it.
FILTER_ROLE_HEADER = "x-tollgate-filter"
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"  # its gRPC health name
EXTPROC_MAX_STREAMS = 100_000
METADATA_NS = "tollgate"
# Metadata keys the decision filter sets -> response header suffixes (an absent key adds no
# header; Fallback-Count is 0 when absent: see _routes). The Provider header names the
# provider of the endpoint that answered (its endpoint's metadata, PROVIDER), which no
# decision or attempt need say.
METADATA_HEADERS = {
    "request_id": "Request-Id",
    "fallback_count": "Fallback-Count",
}
# ... and those the meter sets on each forwarded request's response, from the traceparent the
# decision sent upstream (see meter.lua).
SPAN_HEADERS = ("Trace-Id", "Span-Id")
PROVIDER = f"%UPSTREAM_METADATA({METADATA_NS}:provider)%"
# ... and those of the requests marked EXTRAS_HEADER, with the key's rate-limit headers,
# which go by their own names.
EXTRA_HEADERS = {
    "budget_warning": "Budget-Warning",
    "max_tokens": "Max-Tokens",
    "shadow": "Shadow",
}
EXTRA_KEYS = frozenset([*EXTRA_HEADERS, *ratelimit.HEADER_NAMES])
# Request headers every route sets, which a decision need not (each header a decision sets
# costs Envoy about 5,000 instructions): identity encoding upstream, so the meter reads
# usage from plain bytes.
ROUTE_SETS = {"accept-encoding": "identity"}
_BUFFER_SLACK = 64 * 1024  # headers and framing on top of the largest accepted body

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." \
      "HttpConnectionManager"
EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3." \
                  "HeaderMutation"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP_OPTIONS_NAME = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS = f"type.googleapis.com/{HTTP_OPTIONS_NAME}"
AGGREGATE = "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig"
UPSTREAM_CODEC = "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3." \
                 "UpstreamCodec"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def cluster_name(provider_id: str) -> str:
    return f"provider_{provider_id}"


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def extproc_address(target: str) -> dict[str, Any]:
    """`unix:/path` or `host:port` as an Envoy address."""
    if target.startswith("unix:"):
        return {"pipe": {"path": target.removeprefix("unix:")}}
    host, _, port = target.rpartition(":")
    return _socket_address(host.strip("[]") or "127.0.0.1", int(port))


def provider_cluster(provider: ModelProvider, buffer_limit: int, ca_file: str | None = None
                     ) -> dict[str, Any]:
    """`ca_file`: the CA bundle Envoy checks providers' certificates against, as a path where
    Envoy runs [default: certifi's, for an Envoy on this machine]."""
    url = urlsplit(provider.base_url)
    host = url.hostname or ""
    tls = url.scheme == "https"
    port = url.port or (443 if tls else 80)
    try:
        ipaddress.ip_address(host)
        discovery = "STATIC"
    except ValueError:
        discovery = "LOGICAL_DNS"  # one resolved address at a time, as an HTTP client would
    cluster: dict[str, Any] = {
        "name": cluster_name(provider.id),
        "type": discovery,
        "connect_timeout": f"{provider.connect_timeout}s",
        "dns_lookup_family": "V4_PREFERRED",
        "per_connection_buffer_limit_bytes": buffer_limit,
        "load_assignment": {
            "cluster_name": cluster_name(provider.id),
            "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": _socket_address(host, port), "hostname": host},
                # Tells the attempt filter which provider an attempt reached.
                "metadata": {"filter_metadata": {METADATA_NS: {"provider": provider.id}}},
            }]}],
        },
        "circuit_breakers": RETRY_HEADROOM,
    }
    if tls:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": TLS,
            "sni": host,
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"filename": ca_file or certifi.where()},
                "match_typed_subject_alt_names": [
                    {"san_type": "DNS", "matcher": {"exact": host}}],
            }},
        }}
    return cluster


# Envoy allows three concurrent retries per cluster by default; fallback needs more.
RETRY_HEADROOM = {"thresholds": [{"max_retries": 100000}]}


def chain_cluster(provider_ids: tuple[str, ...]) -> dict[str, Any]:
    """An aggregate cluster: the providers of a fallback plan, one priority each, in order.
    Its upstream filters, in place of the router's, give each attempt its own changes: the
    attempt filters are only on the attempts of fallback plans."""
    return {
        "name": fallback.chain_name(provider_ids),
        "connect_timeout": "10s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {"name": "envoy.clusters.aggregate", "typed_config": {
            "@type": AGGREGATE, "clusters": [cluster_name(p) for p in provider_ids]}},
        "circuit_breakers": RETRY_HEADROOM,
        "typed_extension_protocol_options": {HTTP_OPTIONS_NAME: {
            # HTTP/1.1, as its providers' clusters speak it.
            "@type": HTTP_OPTIONS, "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": [*attempt_filters(), *UPSTREAM_FILTERS]}},
    }


def clusters(cfg: Config, ca_file: str | None = None) -> list[dict[str, Any]]:
    limit = cfg.gateway.max_body_bytes + _BUFFER_SLACK
    return [*(provider_cluster(p, limit, ca_file) for p in cfg.model_providers),
            *(chain_cluster(c) for c in fallback.chains(cfg))]


def _status(code: int) -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": code, "runtime_key": "tollgate.unused"}}}}


# Replies Envoy makes itself (not the gateway's, which carry `answered` metadata) get the
# gateway's error envelopes, so clients never see Envoy's plain-text errors.
# (code, status, condition, message) in match order.
_ENVOY_REPLIES: list[tuple[str, int, dict[str, Any], str]] = [
    ("gateway_error", 500, {"response_flag_filter": {"flags": ["NC"]}},
     "Envoy has no cluster for this request's provider or fallback chain: its config is "
     "older than the gateway's. Render it again (`tollgate envoy render`)."),
    ("payload_too_large", 413, _status(413),
     "Request body is larger than this gateway accepts (gateway.max_body_bytes)."),
    ("provider_timeout", 504, {"response_flag_filter": {"flags": ["UT"]}},
     "The model provider did not answer in time."),
    ("provider_unreachable", 502, {"response_flag_filter": {"flags": [
        "UF", "UH", "URX", "UO", "UC", "UMSDR"]}},
     "The model provider could not be reached; nothing was served."),
    # The decide filter answers 503 when the decision service cannot be reached or does not
    # answer in time, 500 when its answer is unusable.
    *(("gateway_unavailable", 503, _status(code),
       "The tollgate decision service (ext_proc) is unavailable, so the request was not "
       "forwarded. Check that it is running.") for code in (503, 504)),
    ("gateway_error", 500, _status(500),
     "The gateway could not apply its decision to this request; see the Envoy and ext_proc "
     "logs."),
    # Refused by Envoy's HTTP codec before any filter ran (control characters, framing).
    ("invalid_request", 400, _status(400),
     "The request is not valid HTTP (a header or its framing); nothing was forwarded."),
    ("invalid_request", 431, _status(431),
     "The request's headers are larger than this gateway accepts."),
]


def _metadata_is(key: str, value: str | None) -> dict[str, Any]:
    """A filter on the decision's metadata: `key` equals `value`, or is absent (None).

    Access-log metadata filters ignore a matcher's `invert`, so absence is spelled as "a
    null value, or no key": the gateway's values are never null."""
    match = {"null_match": {}} if value is None else {"string_match": {"exact": value}}
    return {"metadata_filter": {
        "matcher": {"filter": METADATA_NS, "path": [{"key": key}], "value": match},
        "match_if_key_not_found": value is None}}


# The path of Anthropic's API, which only its clients and its providers are sent.
ANTHROPIC_PATH = "/v1/messages"


def _client_family(family: str) -> dict[str, Any]:
    """The client spoke `family`: as the decision recorded it (where the path it set for the
    provider would say another: see `service.metadata`), else as the path says."""
    path = {"header_filter": {"header": {
        "name": ":path", "string_match": {"prefix": ANTHROPIC_PATH},
        "invert_match": family != "anthropic"}}}
    return {"or_filter": {"filters": [
        _metadata_is("family", family),
        {"and_filter": {"filters": [_metadata_is("family", None), path]}}]}}


# Request headers the access log of proxy replies carries: the key (to attribute the
# refusal) and what tells the client's API family.
LOGGED_HEADERS = ["authorization", "x-api-key", "anthropic-version", "content-type"]


def _undecided(extproc_failed: bool) -> dict[str, Any]:
    """Requests Envoy answered without the gateway's decision (none of its metadata), split
    by whether the decision service failed them (the decide filter says so in metadata)."""
    return {"and_filter": {"filters": [
        _metadata_is("answered", None), _metadata_is("request_id", None),
        _metadata_is("decider", "unavailable" if extproc_failed else None)]}}


def _grpc_access_log(name: str, condition: dict[str, Any], cluster: str,
                     flush: str = "0.2s", **extra: Any) -> dict[str, Any]:
    """An access log of the requests that meet `condition`, sent to ext_proc's gRPC access
    log service on `cluster`, batched for `flush` at most (a batch of `ACCESS_LOG_BUFFER`
    goes sooner)."""
    return {
        "name": name,
        "filter": condition,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
                     "HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": name,
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
                "buffer_flush_interval": flush,
                "buffer_size_bytes": ACCESS_LOG_BUFFER,
            },
            **extra,
        },
    }


def proxy_replies_log() -> dict[str, Any]:
    """Requests Envoy answered before the decision (none of its metadata) while ext_proc was
    there to hear of them go to its gRPC access log service, which writes their ledger rows."""
    return _grpc_access_log("tollgate.proxy_replies", _undecided(extproc_failed=False),
                            EXTPROC_CLUSTER, additional_request_headers_to_log=LOGGED_HEADERS)


def _metadata_present(key: str) -> dict[str, Any]:
    return {"metadata_filter": {
        "matcher": {"filter": METADATA_NS, "path": [{"key": key}],
                    "value": {"present_match": True}},
        "match_if_key_not_found": False}}


# An access log's batch goes at this size (or at its interval), and while ext_proc reads
# behind, Envoy holds this much before it drops entries (access_logs.grpc_access_log.
# logs_dropped), each a request's end: at 16 KiB (Envoy's default) a saturated process
# lost some in each second of load, at 1 MiB none.
ACCESS_LOG_BUFFER = 1 << 20
# How long a response's end may wait in Envoy before it is sent to be settled: until
# then, its budgets hold its worst case, not its cost. Each batch is a gRPC message that
# ext_proc reads in Python: at 0.05 s, traffic of a request every few tens of ms cost 6% to
# 14% more CPU per request than the meter's posts had; at 0.1 s, none more.
RESPONSE_END_FLUSH = 0.1  # seconds


def response_end_logs(processes: int = 1) -> list[dict[str, Any]]:
    """The end of every forwarded request's response (see meter.lua) goes to the gRPC access
    log of the process that decided it, which settles it (`ExternalProcessor.ended`): whole
    (metered to its end), or cut short (reset by the client or the provider, or answered by
    Envoy in the provider's place). Sent after the client had its response, in batches."""
    def log_to(process: int | None) -> dict[str, Any]:
        conditions = [_metadata_present("request_id"), _metadata_is("answered", None)]
        if process is not None:
            conditions.append(_metadata_is("process", str(process)))
        return _grpc_access_log(
            "tollgate.response_end", {"and_filter": {"filters": conditions}},
            EXTPROC_CLUSTER if process is None else process_cluster(process),
            flush=f"{RESPONSE_END_FLUSH}s")

    return [log_to(None)] if processes == 1 else [log_to(i) for i in range(processes)]


# What the outage log keeps of a request. Never a whole key: only as much of it as
# `virtual-keys list` shows (`tg-<env>-` and four characters, after "Bearer "), which is
# enough to tell whose requests were refused.
OUTAGE_FIELDS = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "start_time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%",
    "method": "%REQ(:METHOD)%",
    "path": "%PATH(NQ)%",  # no query string: some clients put keys there
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "authorization": f"%REQ(AUTHORIZATION):{len('Bearer ') + KEY_PREFIX_CHARS}%",
    "x-api-key": f"%REQ(X-API-KEY):{KEY_PREFIX_CHARS}%",
    "anthropic-version": "%REQ(ANTHROPIC-VERSION):32%",
    "peer": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "bytes_received": "%BYTES_RECEIVED%",
}


def outage_log(path: str) -> dict[str, Any]:
    """Requests Envoy refused because ext_proc failed them: the gRPC access log would go to
    that same ext_proc, so they are written to a file it reads into the ledger once it is
    back (`extproc.proxy_replies.OutageLog`)."""
    return {
        "name": "tollgate.outage",
        "filter": _undecided(extproc_failed=True),
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                     "FileAccessLog",
            "path": path,
            "log_format": {"json_format": OUTAGE_FIELDS},
        },
    }


def local_reply_config(prefix: str) -> dict[str, Any]:
    not_ours = _metadata_is("answered", None)  # the gateway's own answers stay as they are
    mappers = []
    for code, status, condition, message in _ENVOY_REPLIES:
        # The last: no path to tell the family by (a request the codec refused).
        for family, spoke in (("anthropic", _client_family("anthropic")),
                              ("openai", _client_family("openai")), ("openai", None)):
            body = GatewayError(code, message).body(family).decode()
            mappers.append({
                "filter": {"and_filter": {"filters": [
                    not_ours, *([spoke] if spoke else []), condition]}},
                "status_code": status,
                "body_format_override": {"text_format_source": {"inline_string": body},
                                         "content_type": "application/json"},
                "headers_to_add": [
                    {"header": {"key": f"{prefix}{name}", "value": value},
                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                    for name, value in (("Request-Id", "%REQ(X-REQUEST-ID)%"),
                                        ("Provider", "tollgate"), ("Fallback-Count", "0"))],
            })
    return {"mappers": mappers}


def _grpc_service(filter_name: str, cluster: str = EXTPROC_CLUSTER) -> dict[str, Any]:
    """ext_proc as a filter reaches it; its streams tell ext_proc which filter opened them
    (their `x-tollgate-filter` gRPC metadata: `rewrite`)."""
    role = filter_name.removeprefix("tollgate.")
    return {"envoy_grpc": {"cluster_name": cluster}, "timeout": "5s",
            "initial_metadata": [{"key": FILTER_ROLE_HEADER, "value": role}]}


def _ext_proc(name: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "typed_config": {
        "@type": EXT_PROC,
        "grpc_service": _grpc_service(name),
        "failure_mode_allow": False,
        **extra,
    }}


DECIDE = Path(__file__).with_name("decide.lua")
ATTEMPT = Path(__file__).with_name("attempt.lua")
ANSWER = Path(__file__).with_name("answer.lua")  # how both apply the service's answer


def _asking(script: Path, **values: str) -> str:
    """A Lua filter's source that asks the decision service: `script` after answer.lua,
    with its `@NAME@` placeholders filled in."""
    source = script.read_text()
    for name, value in values.items():
        source = source.replace(f"@{name}@", value)
    return f"{ANSWER.read_text()}\n{source}"


def decide_filter(max_body: int) -> dict[str, Any]:
    """`tollgate.decide`: one HTTP exchange with the decision service per request (see
    decide.lua and `extproc.decider`)."""
    source = _asking(DECIDE, CLUSTER=DECIDER_CLUSTER, MAX_BODY=str(max_body),
                     FILTERS=FILTERS_VERSION)
    return {"name": "tollgate.decide", "typed_config": {
        "@type": LUA, "default_source_code": {"inline_string": source}}}


def attempt_filters() -> list[dict[str, Any]]:
    """`tollgate.attempt`, run once per attempt of a fallback plan (upstream filters of the
    plan's chain cluster, so no other request has them): the provider of the endpoint Envoy
    chose, from its metadata, into a header; then one HTTP exchange with the decision
    service that gives the attempt that provider's changes (see attempt.lua)."""
    provider = {
        "name": "tollgate.attempt_provider",
        "typed_config": {
            "@type": HEADER_MUTATION,
            "mutations": {"request_mutations": [{"append": {
                "header": {"key": ATTEMPT_PROVIDER_HEADER, "value": PROVIDER},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]},
        },
    }
    source = _asking(ATTEMPT, CLUSTER=DECIDER_CLUSTER, PROVIDER=ATTEMPT_PROVIDER_HEADER)
    return [provider, {"name": "tollgate.attempt", "typed_config": {
        "@type": LUA, "default_source_code": {"inline_string": source}}}]


METER = Path(__file__).with_name("meter.lua")
USAGE_CUT = Path(__file__).with_name("usage_cut.lua")  # the usage cut the meter runs


SCRIPTS = (ANSWER, DECIDE, ATTEMPT, METER, USAGE_CUT)  # every script Envoy runs


# What the decision service relies on the rendered routes for, beside the scripts: its
# decisions leave out what the routes supply. A new entry here is a new version of the
# filters.
ROUTES_SUPPLY = (b"Fallback-Count 0 where no metadata says\0"
                 b"the extra response headers where marked\0accept-encoding identity\0"
                 b"the client's family by the path where no metadata says\0"
                 b"Provider from the endpoint's metadata\0")


def filters_version(scripts: Iterable[Path] = SCRIPTS) -> str:
    """The version of tollgate's filters: of their scripts, which speak the decision
    service's exchange and leave the metadata its access log reads, and of what its routes
    supply (ROUTES_SUPPLY)."""
    digest = hashlib.sha256(ROUTES_SUPPLY)
    for script in scripts:
        digest.update(script.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


# The decide filter names it on every decision, and the decision service refuses another
# (extproc/decider.py): filters another tollgate rendered, which would meter and settle by
# other rules, fail loudly instead.
FILTERS_VERSION = filters_version()


def meter_filter(header_prefix: str = "X-LangWatch-") -> dict[str, Any]:
    """`tollgate.meter`: the response, as the provider sent it, to the process that decided
    the request (see meter.lua), and a usage chunk the gateway asked for kept from the
    client (see usage_cut.lua); with the gateway's span headers (`header_prefix`)."""
    trace_id, span_id = (f"{header_prefix}{suffix}".lower() for suffix in SPAN_HEADERS)
    source = METER.read_text().replace("@CLUSTER@", DECIDER_CLUSTER) \
        .replace("@UPSTREAM@", UPSTREAM_HEADER).replace("@TRACE_ID@", trace_id) \
        .replace("@SPAN_ID@", span_id)
    source = f"{USAGE_CUT.read_text()}\n{source}"
    return {"name": "tollgate.meter", "typed_config": {
        "@type": LUA, "default_source_code": {"inline_string": source}}}


# An upstream filter: marks the responses that came from a provider, which is how the meter
# tells them from Envoy's own replies (a provider unreachable, a timeout).
UPSTREAM_MARK = {
    "name": "tollgate.upstream_mark",
    "typed_config": {
        "@type": HEADER_MUTATION,
        "mutations": {"response_mutations": [{"append": {
            "header": {"key": UPSTREAM_HEADER, "value": "1"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]},
    },
}


COMPOSITE = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"


def _header_is(name: str, value: str) -> dict[str, Any]:
    return {"single_predicate": {
        "input": {"name": name, "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": name}},
        "value_match": {"exact": value}}}


def _only_when(name: str, delegates: list[tuple[list[dict[str, Any]], dict[str, Any]]]
               ) -> dict[str, Any]:
    """Filter `name`, created for a request only when one of `delegates`' predicates on its
    headers (as the decision left them) holds: that delegate's filter config. For every other
    request it is a composite filter that matched nothing, a fraction of the idle filter's
    cost."""
    matchers = []
    for predicates, typed_config in delegates:
        predicate = predicates[0] if len(predicates) == 1 else \
            {"and_matcher": {"predicate": predicates}}
        matchers.append({"predicate": predicate, "on_match": {"action": {
            "name": name, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3."
                         "ExecuteFilterAction",
                "typed_config": {"name": name, "typed_config": typed_config}}}}})
    return {"name": name, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.common.matching.v3."
                 "ExtensionWithMatcher",
        "extension_config": {"name": f"{name}.composite",
                             "typed_config": {"@type": COMPOSITE}},
        "xds_matcher": {"matcher_list": {"matchers": matchers}}}}


def rewrite_filter(processes: int = 1) -> dict[str, Any]:
    """`tollgate.rewrite`: an ext_proc stream per response the gateway reshapes, to the
    process that decided the request (the only one that knows it)."""
    def rewrite(process: int | None) -> dict[str, Any]:
        config = _ext_proc("tollgate.rewrite", {
            "processing_mode": REWRITE_MODE,
            "message_timeout": "5s",
            "metadata_options": {"forwarding_namespaces": {"untyped": [METADATA_NS]}},
            # Tells the provider's responses (`via_upstream`) from Envoy's own replies, which
            # are already in the client's shape.
            "response_attributes": ["response.code_details"],
            # A JSON answer translated whole is taken BUFFERED, so a body that cannot be
            # translated can still change its status (a 502) before any byte leaves.
            "allow_mode_override": True,
        })["typed_config"]
        if process is not None:
            config["grpc_service"] = _grpc_service("tollgate.rewrite", process_cluster(process))
        return config

    reshaped = _header_is(REWRITE_HEADER, "1")
    if processes == 1:
        return _only_when("tollgate.rewrite", [([reshaped], rewrite(None))])
    return _only_when("tollgate.rewrite", [
        ([reshaped, _header_is(EXTPROC_PROCESS_HEADER, str(i))], rewrite(i))
        for i in range(processes)])


# Every attempt's upstream filters, after a fallback chain's attempt filters.
UPSTREAM_FILTERS = [UPSTREAM_MARK, {"name": "envoy.filters.http.upstream_codec",
                                    "typed_config": {"@type": UPSTREAM_CODEC}}]


def http_filters(max_body: int, processes: int = 1, header_prefix: str = "X-LangWatch-"
                 ) -> list[dict[str, Any]]:
    decide = decide_filter(max_body)
    # Encoders run in reverse: the meter sees the provider's bytes, the rewrite edits after it.
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": ROUTER, "suppress_envoy_headers": True,
        "upstream_http_filters": UPSTREAM_FILTERS}}
    return [decide, rewrite_filter(processes), meter_filter(header_prefix), router]


REWRITE_MODE = {
    "request_header_mode": "SKIP", "request_body_mode": "NONE",
    "response_header_mode": "SEND", "response_body_mode": "STREAMED",
    "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP",
}


def process_cluster(process: int) -> str:
    return f"{EXTPROC_CLUSTER}_{process}"


def _routes(cfg: Config, process: int | None) -> list[dict[str, Any]]:
    """The routes a decision picks between by the headers it sets: a fallback plan's, retried
    by Envoy (each attempt asks the process that decided the request for its changes: see
    attempt.lua), or a single provider's. With ext_proc in several processes there is a pair
    per process (`process`), for the requests it decided."""
    action = {
        "cluster_header": CLUSTER_HEADER,
        # LLM calls run for minutes; only silence ends them.
        "timeout": "0s",
        "idle_timeout": "300s",
    }
    with_fallback = {**action, "retry_policy": fallback.retry_policy()}
    # Most requests are served by their first provider, which no metadata need say (each
    # key costs Envoy some 10,000 instructions a request): the virtual host's header from
    # the metadata replaces this one when a request has a fallback count.
    prefix = cfg.gateway.header_prefix
    first_served = [_header(f"{prefix}Fallback-Count", "0")]
    extras = first_served + [_header(f"{prefix}{suffix}", _metadata(key))
                             for key, suffix in EXTRA_HEADERS.items()] + [
        # The key's rate-limit headers, in place of the provider's own when it has limits.
        _header(name, _metadata(name)) for name in ratelimit.HEADER_NAMES]
    pinned = [] if process is None else [
        {"name": EXTPROC_PROCESS_HEADER, "string_match": {"exact": str(process)}}]

    def when(*headers: str) -> dict[str, Any]:
        matchers = [*pinned, *({"name": h, "present_match": True} for h in headers)]
        return {"prefix": "/", **({"headers": matchers} if matchers else {})}

    return [
        {"match": when(FALLBACK_HEADER, EXTRAS_HEADER), "route": with_fallback,
         "response_headers_to_add": extras},
        {"match": when(FALLBACK_HEADER), "route": with_fallback,
         "response_headers_to_add": first_served},
        {"match": when(EXTRAS_HEADER), "route": action, "response_headers_to_add": extras},
        {"match": when(), "route": action, "response_headers_to_add": first_served},
    ]


def _header(name: str, value: str) -> dict[str, Any]:
    """A header set in place of any the response or request has (a formatter's empty
    value, from absent metadata, sets nothing)."""
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _metadata(key: str) -> str:
    return f"%DYNAMIC_METADATA({METADATA_NS}:{key})%"


def route_config(cfg: Config, processes: int = 1) -> dict[str, Any]:
    """`processes`: how many ext_proc processes serve this Envoy. With more than one, every
    forwarded request names its process, whose rewrite stream it gets, and there is no route
    for a request that names none (a request without a decision never reaches the router)."""
    prefix = cfg.gateway.header_prefix
    routes = _routes(cfg, None) if processes == 1 else \
        [r for i in range(processes) for r in _routes(cfg, i)]
    return {
        "name": "tollgate",
        "request_headers_to_remove": [CLUSTER_HEADER, REWRITE_HEADER, FALLBACK_HEADER,
                                      EXTPROC_PROCESS_HEADER, EXTRAS_HEADER],
        "request_headers_to_add": [_header(name, value) for name, value in ROUTE_SETS.items()],
        "virtual_hosts": [{
            "name": "gateway",
            "domains": ["*"],
            "routes": routes,
            # What belongs to the gateway's provider account (its cookies, its ids).
            "response_headers_to_remove": sorted(header_rules.PROVIDER_ACCOUNT),
            "response_headers_to_add": [_header(f"{prefix}{suffix}", _metadata(key))
                                        for key, suffix in METADATA_HEADERS.items()]
            + [_header(f"{prefix}Provider", PROVIDER)],
        }],
    }


def listener(cfg: Config, host: str, port: int, outage: str, processes: int = 1
             ) -> dict[str, Any]:
    return {
        "name": "tollgate",
        "address": _socket_address(host, port),
        # A second gateway on this address fails to bind rather than take half its traffic.
        "enable_reuse_port": False,
        "per_connection_buffer_limit_bytes": cfg.gateway.max_body_bytes + _BUFFER_SLACK,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM,
                "stat_prefix": "tollgate",
                "codec_type": "AUTO",
                # Request ids name ledger rows, so a client never chooses one: its own
                # x-request-id is kept as x-client-request-id (correlation only) and removed
                # before Envoy mints the request's id; the decision then sets the row's id.
                "early_header_mutation_extensions": [EARLY_MUTATIONS],
                "preserve_external_request_id": False,
                "stream_idle_timeout": "300s",
                # Slow clients: all headers within 10 s, the whole request (body and the
                # decision) within 60 s; the response may take as long as it streams.
                "request_headers_timeout": "10s",
                "request_timeout": "60s",
                "max_request_headers_kb": MAX_HEADER_BYTES // 1024,
                "common_http_protocol_options": {"max_headers_count": 200},
                "http2_protocol_options": {"max_concurrent_streams": 256},
                "route_config": route_config(cfg, processes),
                "local_reply_config": local_reply_config(cfg.gateway.header_prefix),
                "access_log": [proxy_replies_log(), outage_log(outage),
                               *response_end_logs(processes)],
                "http_filters": http_filters(cfg.gateway.max_body_bytes, processes,
                                             cfg.gateway.header_prefix),
            },
        }]}],
    }


CLIENT_REQUEST_ID_HEADER = "x-client-request-id"
# Run before Envoy mints the request id and before any route is matched.
EARLY_MUTATIONS = {
    "name": "envoy.http.early_header_mutation.header_mutation",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation."
                 "header_mutation.v3.HeaderMutation",
        "mutations": [
            {"append": {"header": {"key": CLIENT_REQUEST_ID_HEADER,
                                   "value": "%REQ(X-REQUEST-ID)%"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
            {"remove": "x-request-id"},
            # The gateway's own routing headers are the decision's to set: a client's would
            # pick a route (a provider's cluster, a retry policy, a per-chunk rewrite).
            {"remove_on_match": {"key_matcher": {"prefix": header_rules.GATEWAY_PREFIX}}},
        ],
    },
}


@dataclass(frozen=True)
class ClientTLS:
    """Envoy's side of mTLS to a TCP ext_proc: its client certificate, and the CA that
    signed ext_proc's server certificate (file paths, read by Envoy)."""

    cert: str
    key: str
    ca: str


def process_targets(target: str, processes: int) -> list[str]:
    """Where each of `processes` ext_proc processes listens, the first at `target`: Unix
    sockets beside it (`extproc.sock`, `extproc-1.sock`, ...), or the ports after its own."""
    if target.startswith("unix:"):
        path = Path(target.removeprefix("unix:"))
        return [target, *(f"unix:{path.with_name(f'{path.stem}-{i}{path.suffix}')}"
                          for i in range(1, processes))]
    host, _, port = target.rpartition(":")
    return [f"{host}:{int(port) + i}" for i in range(processes)]


def process_listeners(where: Listener, processes: int, decider: str | None = None
                      ) -> list[Listener]:
    """Each process's listener: its ext_proc address and its decision service's."""
    targets = process_targets(where.target, processes)
    return [replace(where, target=t, decider=d)
            for t, d in zip(targets, decider_targets(targets, decider), strict=True)]


def decider_targets(targets: list[str], first: str | None = None) -> list[str]:
    """Where each ext_proc process's decision service listens: beside `first` as processes
    are beside the first (see `process_targets`); by default a Unix socket beside each
    process's own (`extproc.decide.sock`), or the ports after all of theirs."""
    if first is not None:
        return process_targets(first, len(targets))
    if targets[0].startswith("unix:"):
        paths = [Path(t.removeprefix("unix:")) for t in targets]
        return [f"unix:{p.with_name(f'{p.stem}.decide{p.suffix}')}" for p in paths]
    return [f"{host}:{int(port) + len(targets)}"
            for host, _, port in (t.rpartition(":") for t in targets)]


def extproc_clusters(targets: list[str], tls: ClientTLS | None = None,
                     decider: str | None = None) -> list[dict[str, Any]]:
    """`tollgate_decider`, every process's decision service, which decisions are spread
    over; `tollgate_extproc`, every process (the access log goes to any). With several
    processes, also one cluster per process, where the streams that follow a decision go
    (see `route_config`)."""
    deciders = decider_targets(targets, decider)
    clusters = [_decider_cluster(DECIDER_CLUSTER, deciders, tls),
                _extproc_cluster(EXTPROC_CLUSTER, targets, tls)]
    if len(targets) > 1:
        clusters += [c for i, (t, d) in enumerate(zip(targets, deciders, strict=True))
                     for c in (_extproc_cluster(process_cluster(i), [t], tls),
                               _decider_cluster(f"{DECIDER_CLUSTER}_{i}", [d], tls))]
    return clusters


def _decider_cluster(name: str, targets: list[str], tls: ClientTLS | None) -> dict[str, Any]:
    # HTTP/1.1: one request at a time per connection, so as many connections as decisions
    # and meter posts in flight.
    return _process_cluster(name, targets, tls, EXTPROC_MAX_STREAMS, grpc=False)


def _extproc_cluster(name: str, targets: list[str], tls: ClientTLS | None) -> dict[str, Any]:
    return _process_cluster(name, targets, tls, 1024, grpc=True)


def _process_cluster(name: str, targets: list[str], tls: ClientTLS | None,
                     connections: int, grpc: bool) -> dict[str, Any]:
    """ext_proc's processes, as their gRPC service (`grpc`: HTTP/2, health-checked) or their
    decision service."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        # A request holds a gRPC stream (rewrite), a decision or an attempt, and a meter post:
        # the default cap of 1,024 would refuse a few hundred concurrent requests with 503.
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT", "max_requests": EXTPROC_MAX_STREAMS,
            "max_pending_requests": EXTPROC_MAX_STREAMS, "max_connections": connections}]},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": extproc_address(t)}} for t in targets]}]},
    }
    if grpc:
        cluster["typed_extension_protocol_options"] = {
            HTTP_OPTIONS_NAME: {
                "@type": HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        }
        # gRPC health checks: Envoy's stats (cluster.tollgate_extproc.health_check.*) say
        # whether ext_proc answers. With its only host down Envoy still tries it (panic
        # routing).
        cluster["health_checks"] = [{
            "timeout": "1s", "interval": "5s", "no_traffic_interval": "5s",
            "unhealthy_threshold": 2, "healthy_threshold": 1,
            "grpc_health_check": {"service_name": EXTPROC_SERVICE},
        }]
    if tls is not None:
        cluster["transport_socket"] = _client_tls(targets[0], tls, alpn="h2" if grpc else None)
    return cluster


def _client_tls(target: str, tls: ClientTLS, alpn: str | None) -> dict[str, Any]:
    """Envoy's side of the mutual TLS ext_proc listens with."""
    context: dict[str, Any] = {
        "tls_certificates": [{"certificate_chain": {"filename": tls.cert},
                              "private_key": {"filename": tls.key}}],
        "validation_context": {"trusted_ca": {"filename": tls.ca}},
    }
    if alpn is not None:
        context["alpn_protocols"] = [alpn]
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS, "sni": target.rpartition(":")[0].strip("[]"),
        "common_tls_context": context}}


# Envoy warns at start without a cap; sidecars see far fewer connections than this.
OVERLOAD = {"resource_monitors": [{
    "name": "envoy.resource_monitors.global_downstream_max_connections",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                 "downstream_connections.v3.DownstreamConnectionsConfig",
        "max_active_downstream_connections": 50000,
    },
}]}


def _admin(admin: str) -> dict[str, Any]:
    host, _, port = admin.rpartition(":")
    return {"address": _socket_address(host or "127.0.0.1", int(port))}


def static_bootstrap(cfg: Config, listen: tuple[str, int], extproc: list[str], outage: str,
                     admin: str = "127.0.0.1:9901", tls: ClientTLS | None = None,
                     ca_file: str | None = None, decider: str | None = None
                     ) -> dict[str, Any]:
    """Everything inline: for an Envoy you run yourself (`tollgate envoy render`).
    `extproc`: where each ext_proc process listens (see `process_targets`); `decider`:
    where the first one's decision service does, when not beside it."""
    return {
        "node": {"id": "tollgate", "cluster": "tollgate"},
        "admin": _admin(admin),
        "overload_manager": OVERLOAD,
        "static_resources": {
            "listeners": [listener(cfg, *listen, outage, len(extproc))],
            "clusters": [*extproc_clusters(extproc, tls, decider), *clusters(cfg, ca_file)],
        },
    }


LISTENERS_FILE = "listeners.json"
CLUSTERS_FILE = "clusters.json"


def dynamic_bootstrap(resources: str, extproc: list[str], admin: str,
                      tls: ClientTLS | None = None, decider: str | None = None
                      ) -> dict[str, Any]:
    """The listener and provider clusters from files in `resources` that ext_proc rewrites
    and Envoy watches: provider edits apply without a restart."""
    def source(name: str) -> dict[str, Any]:
        return {"resource_api_version": "V3",
                "path_config_source": {"path": f"{resources}/{name}",
                                       "watched_directory": {"path": resources}}}

    return {
        "node": {"id": "tollgate", "cluster": "tollgate"},
        "admin": _admin(admin),
        "overload_manager": OVERLOAD,
        "dynamic_resources": {"lds_config": source(LISTENERS_FILE),
                              "cds_config": source(CLUSTERS_FILE)},
        "static_resources": {"clusters": extproc_clusters(extproc, tls, decider)},
    }


def listener_resources(cfg: Config, listen: tuple[str, int], outage: str,
                       processes: int = 1) -> dict[str, Any]:
    return {"resources": [{"@type": LISTENER, **listener(cfg, *listen, outage, processes)}]}


def cluster_resources(cfg: Config, ca_file: str | None = None) -> dict[str, Any]:
    return {"resources": [{"@type": CLUSTER, **c} for c in clusters(cfg, ca_file)]}
