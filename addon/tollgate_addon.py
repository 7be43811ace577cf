"""tollgate as a mitmproxy addon.

    mitmdump --mode reverse:http://127.0.0.1:1 --set connection_strategy=lazy \
        -s addon/tollgate_addon.py --set tollgate_config=config/gateway.yaml

Run in reverse mode with a placeholder upstream: the addon routes every request itself.
Each flow carries the gateway's decision as its comment (and a mark when rejected), so
mitmweb shows who called what, which rule fired and which provider served.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions, http

from tollgate.config.problems import ConfigError
from tollgate.exchange import Exchange
from tollgate.gateway import Gateway
from tollgate.request import Forward, Reply, Request, lower_headers

log = logging.getLogger("tollgate.mitmproxy")
_META = "tollgate"


def _comment(decision: dict) -> str:
    if decision.get("action") == "reject":
        head = f"tollgate: REJECT {decision['code']}"
    else:
        head = f"tollgate: {decision.get('action', 'answer')}"
    parts = [f"{k}={v}" for k, v in decision.items()
             if k not in ("action", "code", "message") and v is not None]
    text = " ".join([head, *parts])
    return f"{text}\n{decision['message']}" if "message" in decision else text


class TollgateAddon:
    def __init__(self) -> None:
        self.gateway: Gateway | None = None

    def load(self, loader) -> None:
        loader.add_option("tollgate_config", str, "",
                          "Path to the tollgate gateway.yaml (default: $TOLLGATE_CONFIG, "
                          "then config/gateway.yaml).")

    def configure(self, updated: set[str]) -> None:
        if "tollgate_config" in updated or self.gateway is None:
            from tollgate.config.load import default_config_path

            path = ctx.options.tollgate_config or str(default_config_path())
            try:
                gateway = Gateway.from_path(path)
            except ConfigError as e:
                raise exceptions.OptionsError(f"tollgate config is invalid:\n{e}") from None
            if self.gateway is not None:
                self.gateway.holder.stop()  # in-flight exchanges keep the old gateway's store
            self.gateway = gateway

    async def request(self, flow: http.HTTPFlow) -> None:
        assert self.gateway is not None
        req = flow.request
        result = await self.gateway.handle(Request(
            method=req.method,
            path=req.path,
            headers=lower_headers(req.headers.items(multi=True)),
            body=req.raw_content or b"",
            peer=f"{flow.client_conn.peername[0]}" if flow.client_conn.peername else "",
        ))
        if isinstance(result, Reply):
            flow.response = http.Response.make(result.status, result.body, result.headers)
            flow.comment = _comment(result.decision)
            if result.status >= 400:
                flow.marked = ":no_entry:"
            return
        self._dispatch(flow, result)

    def _dispatch(self, flow: http.HTTPFlow, fwd: Forward) -> None:
        attempt, req = fwd.attempt, flow.request
        req.scheme, req.host, req.port = attempt.scheme, attempt.host, attempt.port
        req.path = attempt.path
        req.host_header = attempt.authority
        for name in attempt.remove_headers:
            req.headers.pop(name, None)
        for name, value in attempt.set_headers.items():
            req.headers[name] = value
        if attempt.body is not None:
            req.raw_content = attempt.body
            req.headers["content-length"] = str(len(attempt.body))
        flow.metadata[_META] = fwd.exchange
        flow.comment = _comment(fwd.exchange.decision())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange: Exchange | None = flow.metadata.get(_META)
        if exchange is None or flow.response is None:
            return
        resp = flow.response
        for name, value in exchange.on_response_headers(resp.status_code,
                                                        dict(resp.headers)).items():
            resp.headers[name] = value
        if exchange.is_sse:
            # Stream through the tap: bytes go to the client as they arrive, never buffered.
            def relay(data: bytes) -> list[bytes]:
                out = exchange.relay(data)
                return [out] if out else []  # an empty chunk would end an HTTP/1 body

            resp.stream = relay

    def response(self, flow: http.HTTPFlow) -> None:
        exchange: Exchange | None = flow.metadata.get(_META)
        if exchange is None or flow.response is None:
            return
        if not exchange.is_sse:
            body = exchange.relay(flow.response.raw_content or b"")
            if exchange.rewriter is not None:
                flow.response.content = body + exchange.relay(b"")
        exchange.finish("completed")

    def error(self, flow: http.HTTPFlow) -> None:
        exchange: Exchange | None = flow.metadata.get(_META)
        if exchange is not None:
            exchange.finish("error", flow.error.msg if flow.error else None)

    async def done(self) -> None:
        if self.gateway is not None:
            await self.gateway.close()  # every finished request is recorded before exit


addons = [TollgateAddon()]
