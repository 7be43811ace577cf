"""The gateway config: one YAML file, validated by these models.

Unknown keys are errors (a typo must never silently turn a control off). Cross-references
(scopes, provider ids, routing policies) are checked by `check_references`, which reports
the exact field so the loader can point at the line.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from tollgate.pricing import ModelPrice
from tollgate.providers import ADAPTERS, TYPES
from tollgate.rules import RuleError, compiled
from tollgate.usage import service_tier

ScopeKind = Literal["ORG", "TEAM", "PROJECT"]
_SCOPE_RE = re.compile(r"^(ORG|TEAM|PROJECT):([A-Za-z0-9_.\-]+)$")

FALLBACK_CONDITIONS = ("5xx", "timeout", "rate_limit", "network_error")

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_scope(value: str) -> tuple[str, str]:
    m = _SCOPE_RE.match(value)
    if not m:
        raise ValueError(f"scope {value!r} must look like ORG:<id>, TEAM:<id> or PROJECT:<id>")
    return m.group(1), m.group(2)


def _valid_scope(value: str) -> str:
    parse_scope(value)
    return value


Scope = Annotated[str, AfterValidator(_valid_scope),
                  Field(description="ORG:<id> | TEAM:<id> | PROJECT:<id>")]


# shadow: a control that counts and records what it would refuse, and refuses nothing.
Mode = Literal["enforce", "shadow"]
MODES: tuple[str, ...] = get_args(Mode)


class RateLimit(Strict):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    rpd: int | None = Field(default=None, ge=1)
    # shadow: counted in counters of their own, never refusing; a request over them is
    # served and recorded (see PolicyRules.mode).
    mode: Mode = "enforce"

    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.rpd))


class CircuitBreaker(Strict):
    failures: int = Field(default=3, ge=1)
    cooldown_seconds: float = Field(default=30.0, gt=0)


class Telemetry(Strict):
    """Traces, metrics labels and the access log. Every field applies on reload."""

    # Where spans go over OTLP. Unset: the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT /
    # OTEL_EXPORTER_OTLP_ENDPOINT variables; with neither, no span is recorded at all.
    otlp_endpoint: str | None = None
    # Unset: $OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / $OTEL_EXPORTER_OTLP_PROTOCOL, else
    # http/protobuf (the OTLP default).
    otlp_protocol: Literal["grpc", "http/protobuf"] | None = None
    # Unset: $OTEL_SERVICE_NAME, else "tollgate".
    service_name: str | None = None
    # Prompts in span attributes and the access log. Off: they are never written.
    capture_content: bool = False
    # Extra labels on the token and cost metrics (bounded by the org's teams and projects).
    metric_labels: list[Literal["team", "project"]] = []
    # One JSON line per request: "-" for stdout, a file (relative to this file), or null.
    access_log: str | None = "-"

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError("otlp_endpoint must be http(s)://host:port[/path]")
        return v


class GatewaySettings(Strict):
    header_prefix: str = "X-LangWatch-"
    state: str = "sqlite:///.tollgate/state.db"
    prices: str = "prices.yaml"
    # The model catalog, for fallback across vendors (relative to this file; the shipped
    # catalog when there is no file there).
    models: str = "models.yaml"
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # When the state store cannot be reached: refuse (503) or serve and settle later.
    fail_closed: bool = True
    # Where finished requests wait while a shared store is down (relative to this file;
    # by default spool.db in the state dir, see tollgate/statedir.py).
    spool: str | None = None
    # A requested model with no price: refuse it, or serve it and record $0 (flagged).
    unpriced: Literal["block", "allow"] = "block"
    # A request without an output cap reserves its model's ceiling (models.yaml); this is
    # assumed only for a model the catalog has no ceiling for (served unpriced).
    default_max_output_tokens: int = Field(default=4096, ge=1)
    # A provider failing this many times in a row is passed over for cooldown_seconds.
    circuit_breaker: CircuitBreaker = Field(default_factory=lambda: CircuitBreaker())
    # Budget holds in a shared store (Redis) are leases: a running gateway renews them, and
    # those of a replica that died come back after this long.
    hold_lease_seconds: int = Field(default=900, ge=30)
    # A Redis state keeps about this many ledger rows (the newest); SQLite keeps them all.
    ledger_max_rows: int = Field(default=1_000_000, ge=1000)
    # How often a request still running has its written-ahead ledger row brought up to date
    # with the output streamed so far (what a gateway that dies leaves charged).
    checkpoint_seconds: float = Field(default=5.0, ge=1.0)
    # Environment variable holding the pepper for virtual-key HMACs.
    pepper_env: str = "TOLLGATE_KEY_PEPPER"
    # A one-way fingerprint of the pepper the keys were made with (written by the CLI when it
    # makes a key): a gateway whose pepper differs refuses to start instead of refusing
    # every key.
    pepper_fingerprint: str | None = None
    # Tell clients what shadow controls would have refused (`<prefix>Shadow`): off by
    # default, since it shows policy to the key holder.
    shadow_headers: bool = False
    # Decide a request like one forwarded before from that decision (tollgate/precedent.py):
    # the same outcome for a fraction of the work. Off: every request is decided in full.
    precedents: bool = True
    telemetry: Telemetry = Field(default_factory=lambda: Telemetry())

    @field_validator("state")
    @classmethod
    def _state(cls, v: str) -> str:
        if not v.startswith(("sqlite:///", "redis://", "rediss://", "unix://")):
            raise ValueError("state must be sqlite:///path or redis://host:port[/db]")
        return v

    @field_validator("header_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9\-]*", v):
            raise ValueError("header_prefix may hold only letters, digits and '-'")
        return v


class Team(Strict):
    id: str
    projects: list[str] = []


class Org(Strict):
    id: str
    teams: list[Team] = []


class ModelProvider(Strict):
    id: str
    name: str | None = None
    type: str = Field(description=f"One of: {', '.join(TYPES)}")
    scope: Scope
    base_url: str
    api_key_env: str | None = None
    # A file holding the key (a mounted secret), re-read when it changes: rotation needs no
    # restart. Relative to the config file.
    api_key_file: str | None = None
    models: list[str] | None = None
    rate_limit: RateLimit | None = None
    fallback_priority: int = 100
    provider_config: dict[str, Any] = {}
    # This provider's own prices (a contract price), USD per 1M tokens; they win over
    # prices.yaml for requests it serves.
    prices: dict[str, ModelPrice] = {}
    # The service tier this account serves a request that names none at (an OpenAI
    # project's default, Anthropic Priority Tier capacity): budgets hold its price.
    default_service_tier: str | None = None
    # Seconds to connect, and to the first response byte, before fallback counts a timeout.
    connect_timeout: float = Field(default=10.0, gt=0)
    first_byte_timeout: float = Field(default=120.0, gt=0)
    created_at: datetime | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError("base_url must be http(s)://host[:port][/prefix]")
        return v.rstrip("/")

    @field_validator("default_service_tier")
    @classmethod
    def _default_service_tier(cls, v: str | None) -> str | None:
        return service_tier(v)  # `default`, `standard`: the model's own price

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v not in ADAPTERS:
            raise ValueError(f"unknown provider type {v!r}; one of: {', '.join(TYPES)}")
        return v

    @model_validator(mode="after")
    def _provider_config(self) -> ModelProvider:
        ADAPTERS[self.type].check_config(self.provider_config)
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self

    @property
    def family(self) -> str:
        """API family spoken by this provider."""
        return ADAPTERS[self.type].wire

    def serves(self) -> list[str]:
        if self.models is not None:
            return self.models
        return list(ADAPTERS[self.type].default_models)


class RoutingTarget(Strict):
    model_provider: str
    # Model this provider should serve instead of the requested one.
    model_map: dict[str, str] = {}
    weight: int = Field(default=1, ge=0)


class RoutingPolicy(Strict):
    id: str
    name: str
    scope: Scope
    strategy: Literal["ordered", "weighted"] = "ordered"
    model_providers: list[str | RoutingTarget]

    def targets(self) -> list[RoutingTarget]:
        return [
            RoutingTarget(model_provider=t) if isinstance(t, str) else t
            for t in self.model_providers
        ]


class Rules(Strict):
    """One group of policy rules: RE2 patterns (see tollgate/rules.py); deny wins, and a
    non-null allow list must match every candidate."""

    deny: list[str] = []
    allow: list[str] | None = None
    # shadow: the request is served, and the refusal it would have met is recorded (the
    # ledger row's `shadow`, the access log, the span, tollgate_shadow_decisions_total).
    mode: Mode = "enforce"

    @field_validator("deny", "allow")
    @classmethod
    def _regexes(cls, v: list[str] | None) -> list[str] | None:
        for pattern in v or []:
            try:
                compiled(pattern)
            except RuleError as e:
                raise ValueError(str(e)) from None
        return v


ToolRules = Rules


class UrlRules(Rules):
    # Also every http(s):// text anywhere in the body (the seed's rule), not only the URLs
    # the provider would fetch.
    anywhere: bool = False


class PolicyRules(Strict):
    # Tool names; `server/tool` and the servers themselves (label and URL) for MCP; the URLs
    # the provider would fetch; the model, after aliases (with the key's models_allowed).
    tools: Rules = Field(default_factory=Rules)
    mcp: Rules = Field(default_factory=Rules)
    urls: UrlRules = Field(default_factory=UrlRules)
    models: Rules = Field(default_factory=Rules)


class Fallback(Strict):
    on: list[Literal["5xx", "timeout", "rate_limit", "network_error"]] = []
    max_attempts: int = Field(default=3, ge=1, le=10)


class KeyConfig(Strict):
    model_aliases: dict[str, str] = {}
    fallback: Fallback = Field(default_factory=Fallback)
    policy_rules: PolicyRules = Field(default_factory=PolicyRules)
    rate_limits: RateLimit | None = None


class PreviousSecret(Strict):
    secret_hash: str
    expires_at: datetime


class VirtualKey(Strict):
    id: str
    name: str
    env: Literal["live", "test"] = "live"
    scope: Scope
    principal: str | None = None
    secret_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    # The first characters of the secret, so people can tell keys apart.
    secret_prefix: str | None = None
    status: Literal["active", "revoked", "disabled"] = "active"
    created_at: datetime | None = None
    expires_at: datetime | None = None
    routing_policy: str | None = None
    models_allowed: list[str] | None = None
    config: KeyConfig = Field(default_factory=KeyConfig)
    previous_secrets: list[PreviousSecret] = []


class Budget(Strict):
    id: str
    name: str
    scope: Literal["org", "team", "project", "virtual_key", "principal"]
    org: str | None = None
    team: str | None = None
    project: str | None = None
    virtual_key: str | None = None
    principal: str | None = None
    window: Literal["minute", "hour", "day", "week", "month", "total"] = "month"
    limit: float = Field(gt=0, description="USD")
    # block: refuse what could pass the limit; warn: only count and flag; cap: lower (or
    # set) a request's output cap to what remains, refusing below `min_output_tokens`.
    on_breach: Literal["block", "warn", "cap"] = "block"
    # shadow: counts in its own counter and refuses, caps or warns nothing; a request it
    # would have refused is served and recorded (see PolicyRules.mode).
    mode: Mode = "enforce"
    warn_at: float = Field(default=0.8, gt=0, le=1)
    model_provider: str | None = None
    min_output_tokens: int = Field(default=256, ge=1)  # on_breach cap: the floor
    # Input the gateway cannot see (a Responses previous_response_id or conversation, file
    # ids, image and file URLs the provider fetches) can cost any amount: a blocking budget
    # reserves this many more input tokens for such a request, or refuses it ("refuse").
    unseen_input: int | Literal["refuse"] = Field(default=0)

    @field_validator("unseen_input")
    @classmethod
    def _allowance(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("unseen_input is a number of tokens (>= 0) or \"refuse\"")
        return value

    @model_validator(mode="after")
    def _target(self) -> Budget:
        if getattr(self, self.scope) is None:
            raise ValueError(f"a budget with scope {self.scope} needs `{self.scope}` set")
        return self

    @property
    def target(self) -> str:
        return getattr(self, self.scope)


class Config(Strict):
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    orgs: list[Org] = []
    model_providers: list[ModelProvider] = []
    routing_policies: list[RoutingPolicy] = []
    virtual_keys: list[VirtualKey] = []
    budgets: list[Budget] = []


def check_references(cfg: Config) -> list[tuple[tuple[Any, ...], str]]:
    """Cross-object checks pydantic cannot express: each problem as (location, message)."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    orgs = {o.id for o in cfg.orgs}
    teams = {t.id for o in cfg.orgs for t in o.teams}
    projects = {p for o in cfg.orgs for t in o.teams for p in t.projects}
    known = {"ORG": orgs, "TEAM": teams, "PROJECT": projects}

    def dupes(items: list[Any], section: str) -> None:
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.id in seen:
                problems.append(((section, i, "id"), f"duplicate id {item.id!r}"))
            seen.add(item.id)

    def scope_ok(loc: tuple[Any, ...], scope: str) -> None:
        kind, ident = parse_scope(scope)
        if ident not in known[kind]:
            problems.append((loc, f"{kind.lower()} {ident!r} is not declared under `orgs`"))

    for section in ("model_providers", "routing_policies", "virtual_keys", "budgets"):
        dupes(getattr(cfg, section), section)
    providers = {p.id for p in cfg.model_providers}
    policies = {p.id for p in cfg.routing_policies}
    for i, mp in enumerate(cfg.model_providers):
        scope_ok(("model_providers", i, "scope"), mp.scope)
    for i, rp in enumerate(cfg.routing_policies):
        scope_ok(("routing_policies", i, "scope"), rp.scope)
        for j, target in enumerate(rp.targets()):
            if target.model_provider not in providers:
                problems.append((
                    ("routing_policies", i, "model_providers", j),
                    f"unknown model provider {target.model_provider!r}",
                ))
    for i, vk in enumerate(cfg.virtual_keys):
        scope_ok(("virtual_keys", i, "scope"), vk.scope)
        if vk.routing_policy and vk.routing_policy not in policies:
            problems.append((
                ("virtual_keys", i, "routing_policy"),
                f"unknown routing policy {vk.routing_policy!r}",
            ))
    hashes: set[str] = set()
    for i, vk in enumerate(cfg.virtual_keys):
        if vk.secret_hash in hashes:
            problems.append((("virtual_keys", i, "secret_hash"), "two keys share one secret"))
        hashes.add(vk.secret_hash)
    by_scope = {"org": orgs, "team": teams, "project": projects,
                "virtual_key": {vk.id for vk in cfg.virtual_keys}}
    for i, b in enumerate(cfg.budgets):
        if b.scope in by_scope and b.target not in by_scope[b.scope]:
            problems.append(((("budgets", i, b.scope)), f"unknown {b.scope} {b.target!r}"))
        if b.model_provider and b.model_provider not in providers:
            problems.append((("budgets", i, "model_provider"),
                             f"unknown model provider {b.model_provider!r}"))
    return problems
