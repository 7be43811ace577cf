"""`tollgate explain`: the decision the config would take for a request, sent nowhere.

The request goes through `Gateway.handle`, the hosts' own path, with `dry_run` and a store
that answers reservations from the counters as they stand without taking anything. What the
decision was made of is then read back: the key, the model after aliases, every policy rule
group with its candidates, the plan (providers in order, those skipped and why), the price
and worst case held, each budget and rate limit and whether it admits, shadow decisions, and
the headers that would go upstream (credentials masked).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tollgate import body as bodies
from tollgate import budgets, candidates, policy, ratelimit, routes
from tollgate.config.schema import VirtualKey
from tollgate.config.watch import ConfigHolder
from tollgate.gateway import Gateway
from tollgate.ledger import LedgerRow
from tollgate.request import Forward, Request
from tollgate.scopes import lineage
from tollgate.secrets import CREDENTIAL_HEADERS, mask
from tollgate.store import Store, open_store
from tollgate.store.base import Counter, LimitSettlement, Reservation
from tollgate.store.base import Window as LimitWindow


class ReadOnly(Store):
    """A state store as `explain` sees it: reservations answered from the counters as they
    stand, as the store would answer them, and nothing written."""

    def __init__(self, store: Store):
        self.inner = store

    async def reserve(self, request_id: str, holds: list[budgets.Hold], amount: int,
                      limits: list[ratelimit.Limit] | None = None, tokens: int = 0,
                      now: float | None = None) -> Reservation:
        limits = limits or []
        counters = await self.inner.counters(holds)
        windows = await self.inner.windows(limits, now)
        refused_by = next((i for i, (h, c) in enumerate(zip(holds, counters, strict=True))
                           if not h.admits(c.committed, amount)), None)
        over = [j for j, (lim, w) in enumerate(zip(limits, windows, strict=True))
                if w.used + lim.amount(tokens) > lim.enforced]
        if refused_by is not None or over:
            windows = [LimitWindow(w.used, w.reset_after, w.reset_after) for w in windows]
            return Reservation(False, counters, refused_by, windows, over, time.time())
        return Reservation(True, [Counter(c.spent, c.reserved + amount) for c in counters],
                           None, [LimitWindow(w.used + lim.amount(tokens), w.reset_after)
                                  for lim, w in zip(limits, windows, strict=True)],
                           [], time.time())

    async def finish(self, counters: list[str], reserved: int, row: LedgerRow,
                     limits: LimitSettlement | None = None,
                     released: list[str] | None = None) -> None:
        return None

    async def windows(self, limits: list[ratelimit.Limit],
                      now: float | None = None) -> list[LimitWindow]:
        return await self.inner.windows(limits, now)

    async def counters(self, holds: list[budgets.Hold]) -> list[Counter]:
        return await self.inner.counters(holds)

    async def rows(self, since: datetime | None = None,
                   until: datetime | None = None) -> list[LedgerRow]:
        return []

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


def _rules(key: VirtualKey, model: str | None, tools: list[str],
           found: candidates.Candidates) -> list[dict[str, Any]]:
    """Each rule group with each of its candidates and the rule that refuses it (if any)."""
    groups = key.config.policy_rules
    by_group = {"models": [model] if model else [], "tools": tools,
                "mcp": [c for s in found.mcp for c in s.candidates()], "urls": found.urls}
    out = []
    for name, values in by_group.items():
        rules = getattr(groups, name)
        out.append({"group": f"policy_rules.{name}", "mode": rules.mode, "deny": rules.deny,
                    "allow": rules.allow,
                    "candidates": [{"candidate": v, "refused_by": policy.verdict(rules, v)}
                                   for v in values]})
    return out


def _budgets(provider: str, counters: list[Counter], holds: list[budgets.Hold],
             amount: int) -> list[dict[str, Any]]:
    out = []
    for h, c in zip(holds, counters, strict=True):
        out.append({"id": h.budget.id, "name": h.budget.name, "scope":
                    f"{h.budget.scope}:{h.budget.target}", "window": h.window_key,
                    "on_breach": h.budget.on_breach, "mode": h.budget.mode,
                    "limit_usd": h.limit_micros / budgets.MICROS,
                    "spent_usd": c.spent / budgets.MICROS,
                    "held_by_requests_in_flight_usd": c.reserved / budgets.MICROS,
                    "this_request_usd": amount / budgets.MICROS,
                    "admits": h.admits(c.committed, amount),
                    "provider": provider})
    return out


async def explain(config: Path, method: str, path: str, body: bytes, *,
                  key_id: str | None = None, secret: str | None = None) -> dict[str, Any]:
    holder = ConfigHolder(config)
    loaded = holder.current
    settings = loaded.config.gateway
    store = ReadOnly(open_store(settings.state, loaded.path, settings.spool, owner=False))
    gateway = Gateway(holder, store, dry_run=True)
    as_key = None
    if key_id is not None:
        as_key = next((k for k in loaded.config.virtual_keys if k.id == key_id), None)
        if as_key is None:
            raise LookupError(f"no virtual key with id {key_id!r}")
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    if secret is not None:
        headers["authorization"] = f"Bearer {secret}"
    req = Request(method, path, headers, body)
    try:
        decided = await gateway.handle(req, as_key=as_key)
        report = await _report(gateway, req, decided, as_key)
    finally:
        await store.close()
    return report


async def _report(gateway: Gateway, req: Request, decided: Any,
                  as_key: VirtualKey | None) -> dict[str, Any]:
    loaded = gateway.holder.current
    cfg = loaded.config
    report: dict[str, Any] = {"request": {"method": req.method, "path": req.path}}
    if isinstance(decided, Forward):
        exchange = decided.exchange
        key = exchange.key
        report["decision"] = {"action": "forward", "status": None, "code": None}
    else:
        decision = decided.decision
        report["decision"] = {"action": "refuse" if decided.status >= 400 else "answer",
                              "status": decided.status, "code": decision.get("code"),
                              "message": decision.get("message"),
                              "rule": decision.get("rule")}
        key = as_key or next((k for k in cfg.virtual_keys if k.id == decision.get("key")),
                             None)
        exchange = None
    if key is None:
        return report
    lin = lineage(cfg, key.scope)
    report["key"] = {"id": key.id, "name": key.name, "status": key.status,
                     "scope": key.scope, "principal": key.principal,
                     "lineage": {"org": lin.org, "team": lin.team, "project": lin.project},
                     "routing_policy": key.routing_policy}
    try:
        route = routes.match(req.path)
        parsed = bodies.parse(route, req.body) if route and route.forwarded else None
    except Exception:  # the refusal above already says what is wrong with the body
        parsed = None
    if parsed is not None:
        model = key.config.model_aliases.get(parsed.model, parsed.model) \
            if parsed.model else None
        report["model"] = {"requested": parsed.model, "resolved": model,
                           "alias": model != parsed.model}
        found = candidates.of(parsed.doc, req.body, key.config.policy_rules.urls.anywhere)
        report["policy"] = _rules(key, model, parsed.tools, found)
    if exchange is None:
        return report
    billing = exchange.billing
    report["plan"] = [{"provider": a.provider_id, "model": a.model, "url": a.url,
                       "translated": a.translated,
                       "headers": {k: mask(v) if k.lower() in CREDENTIAL_HEADERS else v
                                   for k, v in a.set_headers.items()},
                       "removed_headers": a.remove_headers}
                      for a in exchange.cursor.attempts]
    report["skipped"] = list(exchange.cursor.unserved)
    price = billing.price
    report["price"] = None if price is None else {
        "model": exchange.cursor.attempts[0].model, "input_usd_per_1m": float(price.input),
        "output_usd_per_1m": float(price.output),
        **({"web_search_usd_per_1k": float(price.web_search)}
           if price.web_search is not None else {})}
    report["worst_case_usd"] = billing.worst_case / budgets.MICROS
    report["output_cap"] = billing.output_cap
    now = datetime.now(UTC)
    provider = exchange.cursor.attempts[0].provider_id
    holds = budgets.holds_for(cfg, key, billing.lineage, provider, now)
    counters = await gateway.store().counters(holds)
    # As found before this request (the reservation answered above did not take it).
    report["budgets"] = _budgets(provider, counters, holds, billing.worst_case)
    limits = [lim for lim, _ in billing.limits]
    windows = await gateway.store().windows(limits)
    report["rate_limits"] = [
        {"limit": f"{lim.label} {lim.dimension}", "mode": "shadow" if lim.shadow else "enforce",
         "limit_value": lim.limit, "used": w.used,
         "this_request": lim.amount(billing.reserved_tokens),
         "admits": lim.shadow or w.used + lim.amount(billing.reserved_tokens) <= lim.limit}
        for lim, w in zip(limits, windows, strict=True)]
    if loaded.config.gateway.state.startswith("sqlite:") and limits:
        report["note"] = ("rate limits on a SQLite state are counted in the gateway's memory: "
                          "this shows none of its windows")
    report["shadow"] = list(billing.shadow)
    report["budget_warning"] = billing.warning
    return report


def as_text(report: dict[str, Any]) -> str:
    """The report for a terminal."""
    lines: list[str] = []
    d = report["decision"]
    req = report["request"]
    verdict = "FORWARD" if d["action"] == "forward" else \
        f"{d['action'].upper()} {d['status']} {d['code'] or ''}".strip()
    lines.append(f"{req['method']} {req['path']}: {verdict}")
    if d.get("message"):
        lines.append(f"  {d['message']}")
    if "key" in report:
        k = report["key"]
        lines.append(f"key        {k['id']} ({k['name']}, {k['status']}), scope {k['scope']}, "
                     f"principal {k['principal'] or '-'}")
    if "model" in report:
        m = report["model"]
        lines.append(f"model      {m['resolved']}" + (f" (alias of {m['requested']})"
                                                      if m["alias"] else ""))
    for group in report.get("policy", []):
        if not (group["deny"] or group["allow"] is not None):
            continue
        shown = ", ".join(f"{c['candidate']}: {c['refused_by'] or 'passes'}"
                          for c in group["candidates"]) or "no candidates"
        lines.append(f"rule       {group['group']} ({group['mode']}): {shown}")
    for i, a in enumerate(report.get("plan", [])):
        lines.append(f"{'plan' if i == 0 else '':<10} {i + 1}. {a['provider']} {a['model']} "
                     f"{a['url']}" + (" (translated)" if a["translated"] else ""))
        for name, value in a["headers"].items():
            lines.append(f"{'':<14}{name}: {value}")
    for s in report.get("skipped", []):
        lines.append(f"skipped    {s}")
    if report.get("price"):
        p = report["price"]
        searches = f", ${p['web_search_usd_per_1k']}/1K web searches" \
            if "web_search_usd_per_1k" in p else ""
        lines.append(f"price      {p['model']}: ${p['input_usd_per_1m']}/1M in, "
                     f"${p['output_usd_per_1m']}/1M out{searches}; worst case held "
                     f"${report['worst_case_usd']:.6f} (its most, with every output token "
                     "and every search it allows)")
    for b in report.get("budgets", []):
        lines.append(f"budget     {b['id']} {b['name']} ({b['mode']}, {b['on_breach']}) "
                     f"{b['window']}: ${b['spent_usd']:.6f} spent + "
                     f"${b['held_by_requests_in_flight_usd']:.6f} held of "
                     f"${b['limit_usd']:.2f}: {'admits' if b['admits'] else 'REFUSES'}")
    for r in report.get("rate_limits", []):
        lines.append(f"rate limit {r['limit']} ({r['mode']}): {r['used']} of "
                     f"{r['limit_value']}: {'admits' if r['admits'] else 'REFUSES'}")
    for s in report.get("shadow", []):
        lines.append(f"shadow     {s}")
    if report.get("note"):
        lines.append(f"note       {report['note']}")
    return "\n".join(lines)
