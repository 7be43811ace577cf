"""Spend no key holder can erase: on both hosts, the ledger rows and budget charges of a
request cannot be touched by another request, whatever ids and headers a client sends."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import HOSTS, OPENAI_KEY, own_gateways
from tests.harness import ROOT, ledger, wait_until
from tollgate.pricing import cost_micros, load_prices
from tollgate.usage import Usage

CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, fake_openai, fake_anthropic):
    with own_gateways(tmp_path_factory, fake_openai, fake_anthropic, "integrity",
                      lambda config: None) as gws:
        yield gws


@pytest.fixture(params=HOSTS)
def gw(request, gateways):
    return gateways[request.param]


def budget_spent(gw, budget_id: str) -> float:
    out = gw.cli("gateway-budgets", "status", budget_id, "--format", "json")
    return json.loads(out.stdout)["spent_usd"]


def over_the_cap(cap: int = 8 * 1024 * 1024):
    """A chunked body larger than the gateway accepts (no content-length to refuse it by):
    the proxy itself refuses it, before any decision."""
    yield b'{"model": "gpt-5-mini", "messages": [], "pad": "'
    for _ in range(cap // 65536 + 4):
        yield b"x" * 65536
    yield b'"}'


def test_a_refused_request_naming_a_stream_in_flight_erases_none_of_its_cost(gw,
                                                                              fake_openai):
    """A client reads its running stream's id and sends a request the proxy refuses with
    `x-request-id: <that id>`: the refusal gets an id of its own, the stream is charged all
    it used, and the ledger has both rows."""
    key = gw.create_key()
    budget = json.loads(gw.cli("gateway-budgets", "create", "--name", "mine", "--scope", "vk",
                               "--vk", key.id, "--limit", "100", "--on-breach", "block",
                               "--format", "json").stdout)["id"]
    gw.wait_for_config()
    fake_openai.answer_words, fake_openai.chunk_delay = 40, 0.05
    auth = {"authorization": f"Bearer {key.secret}"}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=60, headers=auth,
                      json={**CHAT, "stream": True}) as stream:
        assert stream.status_code == 200
        stream_id = stream.headers["x-langwatch-request-id"]
        chunks = stream.iter_bytes()
        first = next(chunks)  # the provider is streaming: the request is in flight
        refused = httpx.post(f"{gw.url}/v1/chat/completions", content=over_the_cap(),
                             timeout=30, headers={**auth, "content-type": "application/json",
                                                  "x-request-id": stream_id})
        assert refused.status_code == 413, refused.text[:300]
        body = first + b"".join(chunks)
    assert body.rstrip().endswith(b"data: [DONE]")
    refused_id = refused.headers["x-langwatch-request-id"]
    assert refused_id and refused_id != stream_id

    def rows() -> dict[str, list]:
        found = {"stream": [], "refused": []}
        for r in ledger(gw.config):
            if r.request_id == stream_id:
                found["stream"].append(r)
            elif r.request_id == refused_id:
                found["refused"].append(r)
        return found if found["stream"] and found["refused"] else {}

    found = wait_until(rows, timeout=10, what="both ledger rows")
    (served,), (refusal,) = found["stream"], found["refused"]
    assert (served.outcome, served.status, served.output_tokens) == ("completed", 200, 40)
    assert served.cost_micros > 0
    assert (refusal.outcome, refusal.code, refusal.cost_micros) == \
        ("refused", "payload_too_large", 0)
    wait_until(lambda: budget_spent(gw, budget) == served.cost_micros / 1_000_000, timeout=5,
               what="the stream's cost in its budget")


def test_an_unreachable_provider_answers_in_the_clients_family_and_leaves_its_row(
        gw, fake_openai):
    """Envoy's and mitmproxy's own reply to a provider that cannot be reached: the client's
    family envelope, the gateway's headers naming the request's row, and that row's status
    and code."""
    from tests.harness import free_port

    gw.cli("model-providers", "create", "--id", "mp_gone", "--type", "openai",
           "--scope", "ORG:acme", "--base-url", f"http://127.0.0.1:{free_port()}",
           "--api-key-env", "FAKE_OPENAI_KEY", "--models", "o4-mini",
           "--fallback-priority", "0", check=False)  # once per module's gateway
    key = gw.create_key()
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "o4-mini"},
                   timeout=30, headers={"authorization": f"Bearer {key.secret}",
                                        "x-request-id": "client-chosen-id"})
    assert r.status_code == 502 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["error"]["code"] == "provider_unreachable" and "type" in doc["error"]
    request_id = r.headers["x-langwatch-request-id"]
    assert request_id != "client-chosen-id"
    (row,) = wait_until(lambda: [x for x in ledger(gw.config) if x.request_id == request_id],
                        timeout=10, what="the 502's ledger row")
    assert (row.status, row.code, row.provider, row.cost_micros) == \
        (502, "provider_unreachable", "mp_gone", 0)
    assert row.outcome == "error"


def test_a_clients_gateway_headers_pick_nothing(gw, fake_openai):
    """`x-tollgate-*` headers are the gateway's own: a client's never pick a route (a
    provider's cluster, a retry policy, a per-chunk rewrite) nor reach a provider."""
    key = gw.create_key()
    auth = {"authorization": f"Bearer {key.secret}"}
    forged = {**auth, "x-tollgate-cluster": "provider_mp_anthropic", "x-tollgate-rewrite": "1",
              "x-tollgate-fallback": "1", "x-tollgate-anything": "x"}

    def served(headers) -> tuple[httpx.Response, int]:
        before = gw.extproc_streams() if gw.host == "envoy" else 0
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=headers,
                       timeout=30)
        wait_until(lambda: [x for x in ledger(gw.config)
                            if x.request_id == r.headers["x-langwatch-request-id"]],
                   timeout=10, what="its row")
        return r, (gw.extproc_streams() - before if gw.host == "envoy" else 0)

    plain, plain_streams = served(auth)
    r, streams = served(forged)
    assert r.status_code == 200 and r.headers["x-langwatch-provider"] == "mp_openai"
    assert r.json()["choices"] == plain.json()["choices"]
    assert not [h for h in fake_openai.requests[-1].headers if h.lower().startswith("x-tollgate")]
    assert streams == plain_streams  # no rewrite or attempt stream was forced


def test_made_up_model_names_grow_no_metric_series(gw, fake_openai):
    """200 requests, each with a model name of its own that passes a `gpt-4o*` allowlist
    (dated like a snapshot): none is priced, so none is forwarded, and the metrics gain no
    series for them. A snapshot the catalog names is served at its model's price."""
    key = gw.create_key("--models-allowed", "gpt-4o*")

    def series() -> set[str]:
        text = httpx.get(f"{gw.process.admin_url}/metrics", timeout=5).text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines()
                if line.startswith("tollgate_") and not line.startswith("#")
                and 'model="' in line}

    def ask(model: str) -> httpx.Response:
        return client.post(f"{gw.url}/v1/chat/completions",
                           json={**CHAT, "model": model, "max_completion_tokens": 5},
                           headers={"authorization": f"Bearer {key.secret}"})

    # One client for all: each of httpx's module-level calls builds its own TLS context.
    with httpx.Client(timeout=30) as client:
        served = [ask("gpt-4o")]
        assert served[0].status_code == 200
        snapshot = ask("gpt-4o-2024-08-06")
        assert snapshot.status_code == 200, snapshot.text[:200]
        assert ask("gpt-4o-2099-01-01").status_code == 400  # a refusal's own series
        # The answers' series once they are settled (Envoy reports an answer's end after it).
        ids = {r.headers["x-langwatch-request-id"] for r in (*served, snapshot)}
        wait_until(lambda: ids <= {r.request_id for r in ledger(gw.config)}, what="settled")
        before, sent = series(), len(fake_openai.requests)
        for i in range(200):
            r = ask(f"gpt-4o-2{i:07d}")
            assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_priced"
        assert series() == before and len(fake_openai.requests) == sent
        assert any('model="gpt-4o"' in s for s in before)
        row = next(r for r in ledger(gw.config)
                   if r.request_id == snapshot.headers["x-langwatch-request-id"])
        gpt4o = load_prices(ROOT / "config" / "prices.yaml").lookup("gpt-4o")
        assert row.cost_micros == cost_micros(Usage(input_tokens=row.input_tokens,
                                                    output_tokens=row.output_tokens), gpt4o) > 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_account_headers_cross_in_neither_direction(gw, fake_openai, stream):
    """A client cannot choose which provider account is billed (`openai-organization`,
    `openai-project`, `x-goog-user-project` never reach the provider), and the provider
    account's cookies and ids never reach the client; the rest of the answer does."""
    key = gw.create_key()
    r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30,
                   json={**CHAT, "stream": stream},
                   headers={"authorization": f"Bearer {key.secret}",
                            "openai-organization": "org-someone-else",
                            "openai-project": "proj_someone_else",
                            "x-goog-user-project": "their-project",
                            "openai-beta": "assistants=v2"})
    assert r.status_code == 200
    sent = fake_openai.requests[-1].headers
    assert not {"openai-organization", "openai-project", "x-goog-user-project"} & set(sent)
    assert sent["openai-beta"] == "assistants=v2"
    assert sent["authorization"] == f"Bearer {OPENAI_KEY}"
    assert not {"set-cookie", "openai-organization", "openai-project"} & set(r.headers)
    assert r.headers["content-type"].startswith(
        "text/event-stream" if stream else "application/json")
