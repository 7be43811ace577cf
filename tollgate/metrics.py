"""Prometheus metrics, with bounded labels: routes, statuses, gateway codes, configured
providers and the models they serve. No per-request or per-key label; team and project
only when `gateway.telemetry.metric_labels` asks for them.

Budget utilisation, circuit-breaker state and config reloads are read when scraped (see
`GatewayCollector`), so they are never stale."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from tollgate import budgets

if TYPE_CHECKING:
    from tollgate.gateway import Gateway
    from tollgate.ledger import LedgerRow

log = logging.getLogger("tollgate.metrics")
REGISTRY = CollectorRegistry(auto_describe=True)

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

REQUESTS = Counter(
    "tollgate_requests", "Requests, refused or served, by route, status, gateway error code "
    "(empty when served), provider and model", ["route", "status", "code", "provider", "model"],
    registry=REGISTRY)
DURATION = Histogram(
    "tollgate_request_duration_seconds", "Time from the request's arrival to its last "
    "response byte", ["route"], buckets=_SLOW, registry=REGISTRY)
OVERHEAD = Histogram(
    "tollgate_gateway_overhead_seconds", "Time the gateway itself spent on a request: its "
    "decision (auth, policy, admission) and its work on the response", ["route"],
    buckets=_FAST, registry=REGISTRY)
UPSTREAM = Histogram(
    "tollgate_upstream_duration_seconds", "Provider time: from dispatch to the response's "
    "end, less the gateway's own work on the response", ["provider"], buckets=_SLOW,
    registry=REGISTRY)
TTFB = Histogram(
    "tollgate_time_to_first_byte_seconds", "Streamed responses: from dispatch to the first "
    "body byte", ["provider", "model"], buckets=_SLOW, registry=REGISTRY)
TOKENS = Counter(
    "tollgate_tokens", "Tokens by provider, model and type (input, cached_input, "
    "cache_write, output)", ["provider", "model", "type", "team", "project"],
    registry=REGISTRY)
COST = Counter(
    "tollgate_cost_usd", "Spend in USD by provider and model", ["provider", "model", "team",
                                                               "project"], registry=REGISTRY)
WEB_SEARCHES = Counter(
    "tollgate_web_searches", "Web searches providers ran for requests, each billed on top "
    "of tokens, by provider and model", ["provider", "model", "team", "project"],
    registry=REGISTRY)
RATE_LIMITED = Counter(
    "tollgate_rate_limit_rejections", "Requests refused by a rate limit, by whose limit "
    "(key or provider) and its dimension", ["scope", "dimension"], registry=REGISTRY)
FALLBACKS = Counter(
    "tollgate_fallbacks", "Providers moved past, by provider and reason", ["provider",
                                                                         "reason"],
    registry=REGISTRY)
SHADOW = Counter(
    "tollgate_shadow_decisions", "Refusals a shadow-mode control would have made (the "
    "request was served), by control and code", ["control", "code"], registry=REGISTRY)
PRECEDENTS = Counter(
    "tollgate_precedent_decisions", "Requests decided from a precedent (the decision of one "
    "like it, forwarded before) instead of in full", registry=REGISTRY)

_TOKEN_TYPES = ("input", "cached_input", "cache_write", "output")
# Each metric's child per label values. prometheus_client's `labels()` checks and converts
# its arguments and takes a lock on every call (six to nine a request); the label sets are
# bounded (see the module's docstring), and so is this.
_CHILDREN: dict[tuple[object, tuple[str, ...]], Any] = {}


def _child(metric: Counter | Histogram, *values: str) -> Any:
    child = _CHILDREN.get((metric, values))
    if child is None:
        child = _CHILDREN[(metric, values)] = metric.labels(*values)
    return child


def shadowed(control: str, code: str, count: int = 1) -> None:
    """Count refusals a shadow control would have made."""
    if count:
        SHADOW.labels(control, code).inc(count)


def decided_from_precedent() -> None:
    PRECEDENTS.inc()


def model_label(model: str | None, known: frozenset[str]) -> str:
    if not model:
        return ""
    return model if model in known else "other"


class _Series:
    """The children of the series one request's labels name, each made when a request
    first needs it (a series appears once it has counted something): one lookup a
    request, not one per metric."""

    __slots__ = (
        "_cost",
        "_labels",
        "_searches",
        "_tokens",
        "_ttfb",
        "_upstream",
        "duration",
        "overhead",
        "requests",
    )

    def __init__(self, route: str, status: str, code: str, provider: str, model: str,
                 team: str, project: str) -> None:
        self._labels = (provider, model, team, project)
        self.requests = _child(REQUESTS, route, status, code, provider, model)
        self.duration = _child(DURATION, route)
        self.overhead = _child(OVERHEAD, route)
        self._upstream = self._ttfb = self._cost = self._searches = None
        self._tokens: list[Any] = [None] * len(_TOKEN_TYPES)

    @property
    def upstream(self) -> Any:
        if self._upstream is None:
            self._upstream = _child(UPSTREAM, self._labels[0])
        return self._upstream

    @property
    def ttfb(self) -> Any:
        if self._ttfb is None:
            self._ttfb = _child(TTFB, *self._labels[:2])
        return self._ttfb

    def tokens(self, i: int) -> Any:
        child = self._tokens[i]
        if child is None:
            provider, model, team, project = self._labels
            child = self._tokens[i] = _child(TOKENS, provider, model, _TOKEN_TYPES[i], team,
                                             project)
        return child

    @property
    def cost(self) -> Any:
        if self._cost is None:
            self._cost = _child(COST, *self._labels)
        return self._cost

    @property
    def searches(self) -> Any:
        if self._searches is None:
            self._searches = _child(WEB_SEARCHES, *self._labels)
        return self._searches


_SERIES: dict[tuple[str, ...], _Series] = {}


def observe(row: LedgerRow, *, decision_seconds: float, response_seconds: float = 0.0,
            upstream_seconds: float | None = None, first_byte_seconds: float | None = None,
            fallbacks: list[str] | None = None, rate_limit: dict[str, str] | None = None,
            labels: Sequence[str] | None = None, known_models: frozenset[str] = frozenset()
            ) -> None:
    """Count one finished request. Its model labels series only if the operator knows the
    name (`known_models`: the config, price table and catalog, its snapshots included),
    else `other`."""
    served = row.provider is not None
    provider, model = (row.provider or "", model_label(row.model, known_models)) if served \
        else ("", "")
    wanted = labels or ()
    team = (row.team or "") if served and "team" in wanted else ""
    project = (row.project or "") if served and "project" in wanted else ""
    key = (row.route, str(row.status or 0), row.code or "", provider, model, team, project)
    series = _SERIES.get(key)
    if series is None:
        series = _SERIES[key] = _Series(*key)
    series.requests.inc()
    own = decision_seconds + response_seconds
    series.duration.observe(own + (upstream_seconds or 0.0))
    series.overhead.observe(own)
    if rate_limit:
        scope = rate_limit.get("scope", "").split(":", 1)[0]
        _child(RATE_LIMITED, scope, rate_limit.get("limit", "")).inc()
    for entry in fallbacks or []:
        who, _, reason = entry.partition(":")
        _child(FALLBACKS, who, re.sub(r"\s*\(.*", "", reason)).inc()
    if not served:
        return
    if upstream_seconds is not None:
        series.upstream.observe(max(upstream_seconds, 0.0))
    if first_byte_seconds is not None:
        series.ttfb.observe(first_byte_seconds)
    counts = (row.input_tokens, row.cached_input_tokens, row.cache_write_tokens,
              row.output_tokens)
    for i, count in enumerate(counts):
        if count:
            series.tokens(i).inc(count)
    if row.cost_micros:
        series.cost.inc(row.cost_micros / 1_000_000)
    if row.web_search_requests:
        series.searches.inc(row.web_search_requests)


class WithSiblings:
    """This process's request metrics summed with those of its sibling ext_proc processes,
    which keep theirs in `directory` (prometheus_client's multiprocess mode): one series per
    label set, as if one process had served everything."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families = {f.name: f for f in REGISTRY.collect()}  # fresh objects on each collect
        for theirs in MultiProcessCollector(None, path=self.directory).collect():
            mine = families.setdefault(theirs.name, theirs)
            if mine is theirs:
                continue
            at = {(s.name, tuple(sorted(s.labels.items()))): i
                  for i, s in enumerate(mine.samples)}
            for sample in theirs.samples:
                i = at.get((sample.name, tuple(sorted(sample.labels.items()))))
                if i is None:
                    mine.samples.append(sample)
                else:
                    mine.samples[i] = mine.samples[i]._replace(
                        value=mine.samples[i].value + sample.value)
        yield from families.values()


class GatewayCollector:
    """What is read from the gateway when scraped: budgets (from the state store), circuit
    breakers and config reloads."""

    def __init__(self, gateway: Gateway, loop: asyncio.AbstractEventLoop | None) -> None:
        self.gateway, self.loop = gateway, loop

    def describe(self) -> list[Metric]:
        return []  # the budget families depend on the config: not fixed at registration

    def collect(self) -> Iterator[Metric]:
        gw = self.gateway
        status = gw.holder.status
        reloads = CounterMetricFamily("tollgate_config_reloads", "Config reloads, by result",
                                      labels=["result"])
        reloads.add_metric(["ok"], status.get("reloads", 0))
        reloads.add_metric(["failed"], status.get("reload_failures", 0))
        yield reloads
        stale = GaugeMetricFamily("tollgate_config_reload_failing", "1 when the last config "
                                  "edit was rejected and an older config is served")
        stale.add_metric([], 1 if gw.holder.last_error else 0)
        yield stale
        in_flight = GaugeMetricFamily("tollgate_requests_in_flight", "Requests forwarded to "
                                      "a provider and not yet settled, in this process: it "
                                      "returns to 0 when traffic stops")
        in_flight.add_metric([], gw.in_flight())
        yield in_flight
        breaker = GaugeMetricFamily("tollgate_circuit_breaker_open", "1 while a provider's "
                                    "circuit is open (it is tried last)", labels=["provider"])
        for provider in gw.holder.current.config.model_providers:
            breaker.add_metric([provider.id], 1 if gw.breakers.is_open(provider.id) else 0)
        yield breaker
        yield from self._budgets()

    def _budgets(self) -> Iterator[Metric]:
        cfg = self.gateway.holder.current.config
        if not cfg.budgets or self.loop is None or not self.loop.is_running():
            return
        now = datetime.now(UTC)
        holds = [budgets.current_hold(b, now) for b in cfg.budgets]
        read = asyncio.run_coroutine_threadsafe(self.gateway.store().counters(holds),
                                                self.loop)
        try:
            counters = read.result(timeout=3)
        except FutureTimeout:
            read.cancel()
            log.warning("budgets left out of /metrics: the state store did not answer in 3 s")
            return
        except Exception as e:
            log.warning("budgets left out of /metrics: %s", e)
            return
        limit = GaugeMetricFamily("tollgate_budget_limit_usd", "Each budget's limit",
                                  labels=["budget", "window"])
        spent = GaugeMetricFamily("tollgate_budget_spent_usd", "Settled spend in the budget's "
                                  "current window", labels=["budget", "window"])
        reserved = GaugeMetricFamily("tollgate_budget_reserved_usd", "Held for requests in "
                                     "flight", labels=["budget", "window"])
        used = GaugeMetricFamily("tollgate_budget_utilization_ratio", "(spent + reserved) / "
                                 "limit in the current window", labels=["budget", "window"])
        for hold, counter in zip(holds, counters, strict=True):
            labels = [hold.budget.id, hold.budget.window]
            limit.add_metric(labels, hold.budget.limit)
            spent.add_metric(labels, counter.spent / budgets.MICROS)
            reserved.add_metric(labels, counter.reserved / budgets.MICROS)
            used.add_metric(labels, counter.committed / hold.limit_micros
                            if hold.limit_micros else 0.0)
        yield from (limit, spent, reserved, used)
