"""Requests Envoy answered before the gateway decided on them (its codec refusing bad HTTP,
a body over the buffer, a client too slow): Envoy's gRPC access log sends them here, on the
ext_proc socket, and each leaves its ledger row.

Envoy logs only requests without the decision's metadata (see `envoy_config.access_log`),
so a request the gateway decided is never counted twice."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from tollgate.gateway import Gateway
from tollgate.request import Request

log = logging.getLogger("tollgate.extproc")


def request_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> Request:
    r = entry.request
    method = base_pb2.RequestMethod.Name(r.request_method) \
        if r.request_method else "UNKNOWN"
    return Request(method=method, path=r.path or "/", headers=dict(r.request_headers),
                   body=b"", peer=entry.common_properties.downstream_remote_address
                   .socket_address.address, declared_length=r.request_body_bytes or None)


class ProxyReplies(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def StreamAccessLogs(self, requests: AsyncIterator[als_pb2.StreamAccessLogsMessage],
                               context: grpc.aio.ServicerContext
                               ) -> als_pb2.StreamAccessLogsResponse:
        async for message in requests:
            for entry in message.http_logs.log_entry:
                status = entry.response.response_code.value
                if not status:
                    continue  # no answer at all: the client left before it was complete
                try:
                    self.gateway.record_proxy_reply(request_of(entry), status,
                                                    entry.response.response_code_details)
                except Exception:
                    log.exception("could not record a request Envoy answered itself")
        return als_pb2.StreamAccessLogsResponse()
