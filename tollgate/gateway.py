"""The request's path through the core, in one place.

request id & trace -> route -> size cap -> key auth -> parse body -> model resolution
(aliases, allowlist) -> tool policy -> routing plan -> first attempt.
Each step is a small module; this file only orders them and shapes the answer.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from tollgate import body as bodies
from tollgate import policy, routes, routing, telemetry
from tollgate.config.load import LoadedConfig
from tollgate.config.schema import VirtualKey
from tollgate.config.watch import ConfigHolder
from tollgate.errors import GatewayError
from tollgate.exchange import Exchange
from tollgate.keys import KeyIndex, authenticate, load_pepper
from tollgate.request import Forward, Reply, Request

log = logging.getLogger("tollgate")


class Gateway:
    def __init__(self, holder: ConfigHolder):
        self.holder = holder
        self._index_for: tuple[LoadedConfig, KeyIndex] | None = None

    @classmethod
    def from_path(cls, path: str, watch: bool = True) -> Gateway:
        holder = ConfigHolder(path)
        if watch:
            holder.start()
        return cls(holder)

    @property
    def max_body_bytes(self) -> int:
        return self.holder.current.config.gateway.max_body_bytes

    def _keys(self, loaded: LoadedConfig) -> KeyIndex:
        cached = self._index_for
        if cached is None or cached[0] is not loaded:
            pepper = load_pepper(loaded.config.gateway.pepper_env, loaded.path)
            cached = (loaded, KeyIndex(loaded.config.virtual_keys, pepper))
            self._index_for = cached
        return cached[1]

    async def handle(self, req: Request) -> Reply | Forward:
        loaded = self.holder.current
        trace = telemetry.start(req.method, req.path, req.headers)
        family = routes.family_for_path(req.path, dict(req.headers))
        key: VirtualKey | None = None
        try:
            route = routes.match(req.path)
            if route is None:
                raise GatewayError("not_found", f"tollgate does not serve {req.method} "
                                   f"{req.path.split('?')[0]}; routes: {', '.join(routes.ROUTES)}.")
            if req.method != route.method:
                raise GatewayError("method_not_allowed",
                                   f"{route.name} takes {route.method}, not {req.method}.")
            settings = loaded.config.gateway
            if req.body_size > settings.max_body_bytes:
                raise GatewayError("payload_too_large",
                                   f"Request body is {req.body_size} bytes; this gateway accepts "
                                   f"at most {settings.max_body_bytes} (gateway.max_body_bytes).")
            key = authenticate(self._keys(loaded), dict(req.headers))
            if not route.forwarded:
                return self._reply(trace, loaded, 200, self._models(loaded, key, family), key)
            body = bodies.parse(route, req.body)
            model = policy.resolve_model(key, body.model) if body.model else None
            policy.check_tools(key, body.tools)
            targets = routing.targets(loaded.config, key, route.family, model or "")
            first = targets[0]
            strip = [h for h in req.headers if h.startswith(settings.header_prefix.lower())]
            attempt = routing.build_attempt(first, req.path, dict(req.headers), strip)
            if first.model != body.model:
                attempt.body = bodies.replace_top_level(req.body, "model", first.model)
            attempt.set_headers["traceparent"] = trace.traceparent
            # Identity encoding upstream so the tap reads usage from plain bytes; the client's
            # SDK decodes either way.
            attempt.set_headers["accept-encoding"] = "identity"
            exchange = Exchange(trace=trace, prefix=settings.header_prefix, route=route, key=key,
                                requested_model=body.model, model=first.model, attempt=attempt,
                                stream=body.stream)
            return Forward(exchange, attempt)
        except GatewayError as e:
            return self._error(trace, loaded, family, e, key)
        except Exception:
            log.exception("request %s failed inside the gateway", trace.request_id)
            err = GatewayError("gateway_error", "The gateway failed to handle this request "
                               f"(request id {trace.request_id}); see the gateway log.")
            return self._error(trace, loaded, family, err, key)

    def _reply(self, trace: telemetry.RequestTrace, loaded: LoadedConfig, status: int,
               doc: Any, key: VirtualKey | None, decision: dict[str, Any] | None = None
               ) -> Reply:
        headers = {"content-type": "application/json",
                   **trace.headers(loaded.config.gateway.header_prefix, "tollgate", 0)}
        decision = {"request_id": trace.request_id, "key": key.id if key else None,
                    "principal": key.principal if key else None, **(decision or {})}
        trace.span.set_attribute("http.response.status_code", status)
        trace.span.end()
        telemetry.log_access({**decision, "status": status})
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        return Reply(status, headers, body, decision)

    def _error(self, trace: telemetry.RequestTrace, loaded: LoadedConfig, family: str,
               err: GatewayError, key: VirtualKey | None) -> Reply:
        reply = self._reply(trace, loaded, err.status, err.body(family), key,
                            {"action": "reject", "code": err.code, **err.context,
                             "message": err.message})
        reply.headers.update(err.headers)
        return reply

    def _models(self, loaded: LoadedConfig, key: VirtualKey, family: str) -> dict[str, Any]:
        """GET /v1/models: what this key may call, in the client's API shape."""
        cfg = loaded.config
        scopes = routing.visible_scopes(cfg, key.scope)
        names: dict[str, str] = {}
        for p in cfg.model_providers:
            if p.scope not in scopes:
                continue
            for m in loaded.prices.matching(p.serves()) + [
                    m for m in p.serves() if not any(c in m for c in "*?[")]:
                if policy.model_allowed(key, m):
                    names.setdefault(m, p.type)
        for alias, target in key.config.model_aliases.items():
            if target in names:
                names.setdefault(alias, names[target])
        if family == "anthropic":
            now = datetime.now(UTC).isoformat()
            data = [{"type": "model", "id": m, "display_name": m, "created_at": now}
                    for m in sorted(names)]
            return {"data": data, "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None}
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": names[m]}
            for m in sorted(names)]}
