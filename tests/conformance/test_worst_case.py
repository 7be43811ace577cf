"""What is reserved is what can be spent: requests that set no output cap reserve their
model's real ceiling, so together they never spend past a blocking budget; a refusal says
which cap would fit, and a budget with `on_breach: cap` serves a request with a lower one."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from tests.conftest import HOSTS, own_gateways
from tests.harness import ledger, wait_until

CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "write at length"}]}
LONG = 120_000  # words the fake writes when no cap stops it: $0.24 of gpt-5-mini output


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, fake_openai, fake_anthropic):
    with own_gateways(tmp_path_factory, fake_openai, fake_anthropic, "worst",
                      lambda config: None) as gws:
        yield gws


@pytest.fixture(params=HOSTS)
def gw(request, gateways):
    return gateways[request.param]


def key_with_budget(gw, limit: float, on_breach: str):
    key = gw.create_key()
    budget = json.loads(gw.cli("gateway-budgets", "create", "--name", "cap-test", "--scope",
                               "vk", "--vk", key.id, "--limit", str(limit), "--on-breach",
                               on_breach, "--format", "json").stdout)["id"]
    gw.wait_for_config()
    return key, budget


async def _burst(url: str, secret: str, n: int, body: dict | None = None
                 ) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(c.post(url, json=body or CHAT, headers={
            "authorization": f"Bearer {secret}"}) for _ in range(n)))


def fitting_cap(response: httpx.Response) -> int:
    error = response.json()["error"]
    assert error["code"] == "budget_exceeded" and error["param"] == "max_completion_tokens"
    found = re.search(r"Send max_completion_tokens <= ([\d,]+)", error["message"])
    assert found, error["message"]
    return int(found.group(1).replace(",", ""))


def test_requests_without_max_tokens_never_spend_past_a_blocking_budget(gw, fake_openai):
    """20 concurrent "write at length" requests with no max_tokens against $1: each reserves
    gpt-5-mini's 128,000-token ceiling, so only those the budget can pay for in full are
    served, and what they spend stays within the limit. A refusal names the output cap that
    fits, and a request with that cap is then served."""
    key, budget = key_with_budget(gw, 1.0, "block")
    fake_openai.uncapped_words = LONG
    url = f"{gw.url}/v1/chat/completions"
    responses = asyncio.run(_burst(url, key.secret, 20))
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert served and refused and {r.status_code for r in refused} == {402}
    message = refused[0].json()["error"]["message"]
    assert "128,000 output tokens of gpt-5-mini" in message and "exhausted" not in message
    assert f"tollgate gateway-budgets update {budget} --limit" in message

    def rows():
        mine = [r for r in ledger(gw.config)
                if r.key_id == key.id and r.route == "chat_completions"]
        return mine if len(mine) == 20 else None

    rows_now = wait_until(rows, timeout=15, what="a row for each of the 20 requests")
    spent = sum(r.cost_micros for r in rows_now)
    assert 0 < spent <= 1_000_000
    assert sum(r.outcome == "completed" for r in rows_now) == len(served)
    # Once they settled, what is left is served until the next worst case does not fit;
    # then the cap the refusal names is.
    for _ in range(5):
        again = httpx.post(url, json=CHAT, timeout=60, headers={
            "authorization": f"Bearer {key.secret}"})
        if again.status_code != 200:
            break
    assert again.status_code == 402
    cap = fitting_cap(again)
    ok = httpx.post(url, json={**CHAT, "max_completion_tokens": cap}, timeout=60,
                    headers={"authorization": f"Bearer {key.secret}"})
    assert ok.status_code == 200, ok.text[:300]
    assert ok.json()["usage"]["completion_tokens"] == min(cap, LONG)
    status = json.loads(gw.cli("gateway-budgets", "status", budget, "--format",
                               "json").stdout)
    assert 0.9 < status["spent_usd"] <= 1.0


def test_a_cap_budget_serves_a_lone_request_with_the_output_it_can_pay_for(gw, fake_openai):
    """With $0.001 left, `on_breach: cap` sets the request's output cap to what that pays
    for (in the family's own field), says so in X-LangWatch-Max-Tokens and the ledger row,
    and the request stays within the budget."""
    key, budget = key_with_budget(gw, 0.001, "cap")
    fake_openai.uncapped_words = LONG
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=60,
                   headers={"authorization": f"Bearer {key.secret}"})
    assert r.status_code == 200, r.text[:300]
    cap = int(r.headers["x-langwatch-max-tokens"])
    assert 256 <= cap < 500  # $0.001 of gpt-5-mini output, less the input
    sent = fake_openai.requests[-1].json()
    assert sent["max_completion_tokens"] == cap and sent["messages"] == CHAT["messages"]
    assert r.json()["usage"]["completion_tokens"] == cap
    request_id = r.headers["x-langwatch-request-id"]
    (row,) = wait_until(lambda: [x for x in ledger(gw.config) if x.request_id == request_id],
                        timeout=10, what="its row")
    assert row.output_cap == cap and 0 < row.cost_micros <= 1000
    # A limit raised with the command the refusals name: the next request is not capped.
    gw.cli("gateway-budgets", "update", budget, "--limit", "5")
    gw.wait_for_config()
    free = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=60,
                      headers={"authorization": f"Bearer {key.secret}"})
    assert free.status_code == 200 and "x-langwatch-max-tokens" not in free.headers


def test_requests_asking_for_several_choices_reserve_each_ones_output(gw, fake_openai):
    """Chat's `n` asks for that many completions, each up to the output cap, all billed: 20
    concurrent requests for 4 choices of 2,000 tokens each hold $0.016 of gpt-5-mini output,
    not a quarter of it, so what the served ones spend stays within $0.10."""
    key, budget = key_with_budget(gw, 0.10, "block")
    fake_openai.uncapped_words = LONG  # every choice writes its whole cap
    body = {**CHAT, "n": 4, "max_completion_tokens": 2_000}
    responses = asyncio.run(_burst(f"{gw.url}/v1/chat/completions", key.secret, 20, body))
    served = [r for r in responses if r.status_code == 200]
    assert served and {r.status_code for r in responses} == {200, 402}
    assert all(r.json()["usage"]["completion_tokens"] == 8_000 for r in served)
    assert "8,000 output tokens of gpt-5-mini (4 choices of 2,000)" in next(
        r for r in responses if r.status_code == 402).json()["error"]["message"]
    rows = wait_until(lambda: (mine := [r for r in ledger(gw.config) if r.key_id == key.id
                                        and r.route == "chat_completions"])
                      and len(mine) == 20 and mine, timeout=15, what="20 rows")
    assert 0 < sum(r.cost_micros for r in rows) <= 100_000
    status = json.loads(gw.cli("gateway-budgets", "status", budget, "--format",
                               "json").stdout)
    assert status["spent_usd"] <= 0.10 and status["reserved_usd"] == 0


def test_a_cap_budget_lowers_each_choices_cap_so_all_of_them_fit(gw, fake_openai):
    """$0.004 left under `on_breach: cap`, for 4 choices: each is capped at what a quarter of
    it pays for, and the request stays within the budget."""
    key, _ = key_with_budget(gw, 0.004, "cap")
    fake_openai.uncapped_words = LONG
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "n": 4}, timeout=60,
                   headers={"authorization": f"Bearer {key.secret}"})
    assert r.status_code == 200, r.text[:300]
    cap = int(r.headers["x-langwatch-max-tokens"])
    assert 400 < cap < 500  # $0.004 of gpt-5-mini output over 4 choices, less the input
    assert r.json()["usage"]["completion_tokens"] == 4 * cap
    request_id = r.headers["x-langwatch-request-id"]
    (row,) = wait_until(lambda: [x for x in ledger(gw.config) if x.request_id == request_id],
                        timeout=10, what="its row")
    assert 0 < row.cost_micros <= 4000


def test_cap_mode_lowers_the_cap_to_what_the_keys_tpm_has_room_for(gw, fake_openai):
    """A key's TPM cannot hold gpt-5-mini's 128,000-token ceiling: under an `on_breach: cap`
    budget the request is served with the output cap its TPM has room for; under a blocking
    one it is refused with 429, as before."""
    def key_under(on_breach: str):
        key = gw.create_key("--tpm", "20000")
        gw.cli("gateway-budgets", "create", "--name", "tpm-cap", "--scope", "vk", "--vk",
               key.id, "--limit", "100", "--on-breach", on_breach)
        gw.wait_for_config()
        return key

    capped = key_under("cap")
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=60,
                   headers={"authorization": f"Bearer {capped.secret}"})
    assert r.status_code == 200, r.text[:300]
    cap = int(r.headers["x-langwatch-max-tokens"])
    assert 19_000 < cap < 20_000  # the minute's 20,000 tokens, less the input's estimate
    assert fake_openai.requests[-1].json()["max_completion_tokens"] == cap
    request_id = r.headers["x-langwatch-request-id"]
    (row,) = wait_until(lambda: [x for x in ledger(gw.config) if x.request_id == request_id],
                        timeout=10, what="its row")
    assert row.output_cap == cap

    blocked = key_under("block")
    refused = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=60,
                         headers={"authorization": f"Bearer {blocked.secret}"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"


def test_a_request_is_held_at_the_price_of_the_tier_that_may_serve_it(gw):
    """Priority costs more: a request that asks for it holds its price, and so does one that
    names no tier once the provider's account serves priority by default."""
    key, _ = key_with_budget(gw, 0.30, "block")
    url = f"{gw.url}/v1/chat/completions"
    capped = {**CHAT, "max_completion_tokens": 100_000}  # $0.20 at standard, $0.36 priority

    def send(**extra) -> httpx.Response:
        return httpx.post(url, json={**capped, **extra}, timeout=60,
                          headers={"authorization": f"Bearer {key.secret}"})

    refused = send(service_tier="priority")
    assert refused.status_code == 402, refused.text[:300]
    assert "at the priority price" in refused.json()["error"]["message"]
    assert send(service_tier="default").status_code == 200
    assert send().status_code == 200
    gw.cli("model-providers", "update", "mp_openai", "--default-service-tier", "priority")
    try:
        gw.wait_for_config()
        assert send().status_code == 402
        assert send(service_tier="default").status_code == 200
    finally:
        gw.cli("model-providers", "update", "mp_openai", "--default-service-tier", "default")
        gw.wait_for_config()
