"""Rate limits on both hosts: keys and providers, RPM, TPM and RPD, as the official SDKs see
them. Each host runs its own gateway and state here, since provider caps count per store."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.conftest import HOSTS, Gateway, Key, make_config, make_policy, own_gateways
from tests.harness import GatewayProcess, RedisServer, ledger, tollgate, wait_until


def chat(model: str = "gpt-5-mini", max_tokens: int = 50, **extra) -> dict:
    return {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "rate limit test"}], **extra}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, fake_openai, fake_anthropic):
    """One gateway per host, each with its own state. `mp_capped` serves o4-mini with a cap
    of 2 requests a minute; policy `capped` falls back from it to Anthropic."""
    policies: dict[str, str] = {}

    def setup(config: Path) -> None:
        tollgate("model-providers", "create", "--id", "mp_capped", "--type", "openai",
                 "--scope", "ORG:acme", "--base-url", fake_openai.url, "--api-key-env",
                 "FAKE_OPENAI_KEY", "--models", "o4-mini", "--rpm", "2", config=config)
        policies[str(config)] = make_policy(
            config, "capped", "mp_capped", "mp_anthropic",
            extra=("--model-map", "mp_anthropic:o4-mini=claude-haiku-4-5"))

    with own_gateways(tmp_path_factory, fake_openai, fake_anthropic, "ratelimits",
                      setup) as out:
        yield {"gateways": out,
               "policies": {h: policies[str(gw.config)] for h, gw in out.items()}}


WAIT_TEST = "test_sdks_wait_out_retry_after_and_succeed"


@pytest.fixture(scope="module", autouse=True)
def sdk_waits(request, gateways):
    """Both SDKs on both hosts hit a key's rpm 1 and, with their default retries, wait the
    window out. That takes a minute, so it runs beside the module's other tests and the
    last test checks how it went."""
    results: dict[str, float | BaseException] = {}
    if not any(item.name == WAIT_TEST for item in request.session.items):
        yield results
        return

    def run(host: str, sdk: str) -> None:
        gw = gateways["gateways"][host]
        key = gw.create_key("--rpm", "1")
        try:
            if sdk == "openai":
                client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key.secret)
                client.chat.completions.create(**chat())
                started = time.monotonic()
                client.chat.completions.create(**chat())
            else:
                claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret)
                ask = {"model": "claude-haiku-4-5", "max_tokens": 20,
                       "messages": [{"role": "user", "content": "hi"}]}
                claude.messages.create(**ask)
                started = time.monotonic()
                claude.messages.create(**ask)
            results[f"{host}/{sdk}"] = time.monotonic() - started
        except BaseException as e:  # reported by the test
            results[f"{host}/{sdk}"] = e

    threads = [threading.Thread(target=run, args=(h, s), daemon=True) for h in HOSTS
               for s in ("openai", "anthropic")]
    for t in threads:
        t.start()
    results["threads"] = threads  # type: ignore[assignment]
    yield results
    for t in threads:
        t.join(150)


def status(gw: Gateway, *args: str) -> list[dict]:
    return json.loads(gw.cli("rate-limits", "status", *args, "--format", "json").stdout)


def post(gw: Gateway, key: Key, body: dict, path: str = "/v1/chat/completions"
         ) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", json=body, timeout=30,
                      headers={"authorization": f"Bearer {key.secret}"})


@pytest.mark.parametrize("host", HOSTS)
def test_sdks_raise_rate_limit_error_with_the_gateway_message(gateways, host):
    gw = gateways["gateways"][host]
    key = gw.create_key("--rpm", "1")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key.secret, max_retries=0)
    client.chat.completions.create(**chat())
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**chat())
    err = caught.value
    assert err.code == "rate_limited"
    assert f"virtual key {key.id}: rpm (limit 1 requests per minute)" in err.message
    retry = int(err.response.headers["retry-after"])
    assert 55 <= retry <= 60
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"

    # The Anthropic SDK, on the Messages API, with the same key (its minute is used up).
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key.secret, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as caught_a:
        claude.messages.create(model="claude-haiku-4-5", max_tokens=20,
                               messages=[{"role": "user", "content": "hi"}])
    assert f"virtual key {key.id}: rpm" in caught_a.value.message
    assert caught_a.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"


async def _burst(urls: list[str], secret: str, n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as c:
        async def one(i: int) -> int:
            r = await c.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=chat(),
                             headers={"authorization": f"Bearer {secret}"})
            return r.status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.parametrize("host", HOSTS)
def test_200_concurrent_requests_against_rpm_50_serve_exactly_50(gateways, host):
    gw = gateways["gateways"][host]
    key = gw.create_key("--rpm", "50")
    codes = asyncio.run(_burst([gw.url], key.secret, 200))
    assert codes.count(200) == 50 and codes.count(429) == 150, sorted(
        collections.Counter(codes).items())
    assert status(gw, "--vk", key.id)[0]["used"] == 50


def test_two_replicas_sharing_redis_serve_exactly_50_between_them(tmp_path, fake_openai,
                                                                   fake_anthropic):
    redis = RedisServer(tmp_path / "redis").start()
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    config.write_text(config.read_text().replace('state: "sqlite:///.tollgate/state.db"',
                                                 f'state: "{redis.url}"'))
    out = json.loads(tollgate("virtual-keys", "create", "--name", "shared", "--scope",
                              "ORG:acme", "--rpm", "50", "--format", "json",
                              config=config).stdout)
    replicas = [GatewayProcess(host, config, tmp_path) for host in HOSTS]
    try:
        for r in replicas:
            r.start()
        codes = asyncio.run(_burst([r.url for r in replicas], out["secret"], 200))
        assert codes.count(200) == 50 and codes.count(429) == 150, sorted(
            collections.Counter(codes).items())
        # The store goes away: budgets and limits are fail-closed.
        redis.stop()
        r = httpx.post(f"{replicas[0].url}/v1/chat/completions", json=chat(), timeout=30,
                       headers={"authorization": f"Bearer {out['secret']}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "gateway_unavailable"
    finally:
        for r in replicas:
            r.stop()
        redis.stop()


@pytest.mark.parametrize("host", HOSTS)
def test_headers_count_down_in_each_family_format(gateways, host):
    gw = gateways["gateways"][host]
    key = gw.create_key("--rpm", "5", "--tpm", "50000", "--rpd", "1000")
    first, second = post(gw, key, chat()), post(gw, key, chat())
    assert first.status_code == second.status_code == 200
    h1, h2 = first.headers, second.headers
    assert (h1["x-ratelimit-limit-requests"], h1["x-ratelimit-remaining-requests"]) == ("5", "4")
    assert h2["x-ratelimit-remaining-requests"] == "3"
    assert h1["x-ratelimit-reset-requests"] in ("59s", "1m0s")
    assert h1["x-ratelimit-limit-tokens"] == "50000"
    assert int(h2["x-ratelimit-remaining-tokens"]) < int(h1["x-ratelimit-remaining-tokens"]) \
        < 50000
    assert "anthropic-ratelimit-requests-limit" not in h1
    claude = post(gw, key, {"model": "claude-haiku-4-5", "max_tokens": 20,
                            "messages": [{"role": "user", "content": "hi"}]}, "/v1/messages")
    assert claude.status_code == 200
    h3 = claude.headers
    assert (h3["anthropic-ratelimit-requests-limit"],
            h3["anthropic-ratelimit-requests-remaining"]) == ("5", "2")
    assert h3["anthropic-ratelimit-tokens-limit"] == "50000"
    reset = h3["anthropic-ratelimit-requests-reset"]
    assert reset.endswith("Z") and "T" in reset and "x-ratelimit-limit-requests" not in h3
    # A key without limits passes the provider's own headers through untouched.
    plain = post(gw, gw.create_key(), chat())
    assert "x-ratelimit-limit-requests" not in plain.headers


@pytest.mark.parametrize("host", HOSTS)
def test_a_response_of_9000_tokens_makes_the_next_large_request_wait(gateways, host,
                                                                     fake_openai):
    gw = gateways["gateways"][host]
    key = gw.create_key("--tpm", "10000")
    fake_openai.answer_words = 9000
    assert post(gw, key, chat(max_tokens=9500)).status_code == 200
    fake_openai.answer_words = 0
    wait_until(lambda: status(gw, "--vk", key.id)[0]["used"] >= 9000,
               what="the first request to settle")
    row = status(gw, "--vk", key.id)[0]
    assert 9000 < row["used"] < 9100  # what it used, not its 9,500-token estimate
    big = post(gw, key, chat(max_tokens=2000))
    assert big.status_code == 429 and "tpm (limit 10000 tokens per minute)" in big.text
    assert 50 <= int(big.headers["retry-after"]) <= 60
    assert post(gw, key, chat(max_tokens=200)).status_code == 200


@pytest.mark.parametrize("host", HOSTS)
def test_a_stream_the_client_cuts_off_settles_the_tokens_it_used(gateways, host,
                                                                 fake_openai):
    gw = gateways["gateways"][host]
    key = gw.create_key("--tpm", "100000")
    fake_openai.answer_words, fake_openai.chunk_delay = 400, 0.02
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30,
                      json=chat(max_tokens=4000, stream=True,
                                stream_options={"include_usage": True}),
                      headers={"authorization": f"Bearer {key.secret}"}) as r:
        rid = r.headers["x-langwatch-request-id"]
        for i, _ in enumerate(r.iter_raw()):
            if i == 5:
                break
    row = wait_until(lambda: next((x for x in ledger(gw.config) if x.request_id == rid), None),
                     timeout=15, what="the cut stream's ledger row")
    used = row.input_tokens + row.cached_input_tokens + row.output_tokens
    assert 0 < used < 4000
    assert status(gw, "--vk", key.id)[0]["used"] == used


@pytest.mark.parametrize("host", HOSTS)
def test_a_provider_at_its_cap_is_passed_over_for_the_next(gateways, host, fake_openai):
    """Policy [mp_capped (rpm 2), mp_anthropic], fallback on rate_limit: the third request
    is served by Anthropic with Fallback-Count 1; mp_capped never sees it."""
    gw, policy = gateways["gateways"][host], gateways["policies"][host]
    key = gw.create_key("--routing-policy", policy, "--config-json",
                        '{"fallback": {"on": ["rate_limit"]}}')
    served = [post(gw, key, chat("o4-mini")) for _ in range(3)]
    assert [r.status_code for r in served] == [200, 200, 200]
    assert [r.headers["x-langwatch-provider"] for r in served] == \
        ["mp_capped", "mp_capped", "mp_anthropic"]
    assert [r.headers["x-langwatch-fallback-count"] for r in served] == ["0", "0", "1"]
    assert len([q for q in fake_openai.requests if q.json().get("model") == "o4-mini"]) == 2
    rid = served[2].headers["x-langwatch-request-id"]
    row = wait_until(lambda: next((x for x in ledger(gw.config) if x.request_id == rid), None),
                     what="the ledger row")
    assert row.fallback_count == 1 and row.fallbacks == "mp_capped:rate_limit (rpm 2)"
    # A key that does not fall back on rate_limit gets the provider's cap as a 429.
    strict = gw.create_key("--routing-policy", policy)
    refused = post(gw, strict, chat("o4-mini"))
    assert refused.status_code == 429
    assert "provider mp_capped: rpm (limit 2 requests per minute)" in refused.text
    assert len([q for q in fake_openai.requests if q.json().get("model") == "o4-mini"]) == 2
    cap = status(gw, "--provider", "mp_capped")
    assert cap == [{"scope": "model_provider", "id": "mp_capped", "dimension": "rpm",
                    "limit": 2, "used": 2, "remaining": 0, "resets_at": cap[0]["resets_at"]}]


@pytest.mark.parametrize("host", HOSTS)
def test_refused_requests_consume_nothing(gateways, host):
    gw = gateways["gateways"][host]
    key = gw.create_key("--rpm", "1")
    budget = json.loads(gw.cli("gateway-budgets", "create", "--name", "k", "--scope", "vk",
                               "--vk", key.id, "--limit", "10", "--format", "json").stdout)
    gw.wait_for_config()
    assert post(gw, key, chat()).status_code == 200
    assert post(gw, key, chat()).status_code == 429

    def spent() -> dict:
        return json.loads(gw.cli("gateway-budgets", "status", budget["id"], "--format",
                                 "json").stdout)

    wait_until(lambda: spent()["spent_usd"] > 0, what="the served request to settle")
    after = spent()
    assert after["reserved_usd"] == 0  # the refused one holds nothing
    served = [r for r in ledger(gw.config) if r.key_id == key.id and r.route != "models"
              and r.outcome != "refused"]
    assert len(served) == 1 and round(after["spent_usd"] * 1e6) == served[0].cost_micros
    # A budget refusal takes no request from the key's limit.
    poor = gw.create_key("--rpm", "5")
    gw.cli("gateway-budgets", "create", "--name", "poor", "--scope", "vk", "--vk", poor.id,
           "--limit", "0.0000001")
    gw.wait_for_config()
    assert [post(gw, poor, chat()).status_code for _ in range(2)] == [402, 402]
    assert [r["used"] for r in status(gw, "--vk", poor.id)] == [0]


@pytest.mark.parametrize("host", HOSTS)
def test_editing_a_limit_takes_effect_and_keeps_the_count(gateways, host):
    gw = gateways["gateways"][host]
    key = gw.create_key("--rpm", "2")
    assert [post(gw, key, chat()).status_code for _ in range(3)] == [200, 200, 429]
    started = time.monotonic()
    gw.cli("virtual-keys", "update", key.id, "--rpm", "3")
    wait_until(lambda: post(gw, key, chat()).status_code == 200, timeout=2.5,
               what="the raised limit")
    assert time.monotonic() - started < 2.5
    assert post(gw, key, chat()).status_code == 429  # three counted, of three


def test_rate_limit_status_reads_the_state(gateways, tmp_path: Path):
    gw = gateways["gateways"]["mitmproxy"]
    key = gw.create_key("--rpm", "10", "--tpm", "90000", "--rpd", "500")
    assert post(gw, key, chat()).status_code == 200
    rows = {r["dimension"]: r for r in status(gw, "--vk", key.id)}
    assert set(rows) == {"rpm", "tpm", "rpd"}
    assert (rows["rpm"]["used"], rows["rpm"]["remaining"]) == (1, 9)
    assert (rows["rpd"]["used"], rows["rpd"]["remaining"]) == (1, 499)
    assert rows["rpd"]["resets_at"].endswith("T00:00:00+00:00")
    table = gw.cli("rate-limits", "status", "--vk", key.id).stdout
    assert table.splitlines()[0].split() == ["SCOPE", "ID", "DIMENSION", "LIMIT", "USED",
                                             "REMAINING", "RESETS_AT"]
    missing = gw.cli("rate-limits", "status", "--vk", "vk_nope", check=False)
    assert missing.returncode != 0 and "no virtual key" in missing.stderr


def test_sdks_wait_out_retry_after_and_succeed(sdk_waits):
    """(Last in the module: the calls started with it.) Each SDK got a 429 with Retry-After
    of about a minute, waited, and its retry succeeded."""
    for t in sdk_waits.pop("threads"):
        t.join(150)
    assert len(sdk_waits) == 4
    for name, waited in sdk_waits.items():
        assert isinstance(waited, float), f"{name}: {waited!r}"
        assert 50 < waited < 75, f"{name} waited {waited:.1f}s"
