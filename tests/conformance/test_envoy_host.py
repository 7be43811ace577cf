"""What only the Envoy host does: a separate ext_proc, live cluster changes, big bodies,
clean shutdown."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from extproc import envoy_config
from extproc.envoy_view import older_view
from extproc.runner import envoy_binary
from tests.certs import CA
from tests.conftest import ANTHROPIC_KEY, OPENAI_KEY, make_config
from tests.fakes.providers import Behaviour, FakeProvider
from tests.harness import (
    BIN,
    GatewayProcess,
    envoy_validates,
    free_port,
    ledger,
    tollgate,
    wait_until,
)
from tollgate.config.load import load_config

CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def config(tmp_path, fake_openai, fake_anthropic):
    return make_config(tmp_path, fake_openai, fake_anthropic)


def new_key(config, *extra: str) -> str:
    out = tollgate("virtual-keys", "create", "--name", "e", "--scope", "ORG:acme",
                   "--format", "json", *extra, config=config)
    return json.loads(out.stdout)["secret"]


def fallback_key(config) -> str:
    """A key whose 5xx answers fall back from mp_openai to mp_anthropic."""
    out = tollgate("routing-policies", "create", "--scope", "ORG:acme", "--name", "fb",
                   "--model-provider", "mp_openai", "--model-provider", "mp_anthropic",
                   "--model-map", "mp_anthropic:gpt-5-mini=claude-haiku-4-5",
                   "--format", "json", config=config)
    return new_key(config, "--routing-policy", json.loads(out.stdout)["id"],
                   "--config-json", '{"fallback": {"on": ["5xx"]}}')


def start_extproc(config, port: int, decider: int, log, *tls: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "tollgate"), "--config", str(config), "serve",
                             "extproc", "--listen", f"127.0.0.1:{port}", "--decider-listen",
                             f"127.0.0.1:{decider}", *tls], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ,
                                                           "PYTHONFAULTHANDLER": "1"})


def mtls(directory) -> tuple[list[str], list[str]]:
    """(serve extproc's TLS flags, envoy render's): one CA signs both certificates."""
    ca = CA(directory / "pki")
    server, client = ca.issue("extproc", "localhost", True), ca.issue("envoy", "envoy", False)
    return (["--tls-cert", str(server.cert), "--tls-key", str(server.key),
             "--tls-client-ca", str(ca.path)],
            ["--tls-cert", str(client.cert), "--tls-key", str(client.key),
             "--tls-ca", str(ca.path)])


def stop_extproc(proc: subprocess.Popen) -> None:
    """SIGTERM must end it promptly; if not, SIGABRT makes faulthandler show where it hangs."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(5)
        raise


def test_user_run_envoy_with_separate_extproc(config, tmp_path, fake_openai, fake_anthropic):
    """`tollgate envoy render` + `tollgate serve extproc` over TCP with mutual TLS: ext_proc
    down is a clear 503, and traffic resumes when it is back, with no Envoy restart. The
    rendered config falls back."""
    secret = new_key(config)
    fallback_secret = fallback_key(config)
    extproc_port, listen_port, admin_port = free_port(), free_port(), free_port()
    decider_port = free_port()
    server_tls, client_tls = mtls(tmp_path)
    rendered = tollgate("envoy", "render", "--listen", f"127.0.0.1:{listen_port}",
                        "--extproc", f"127.0.0.1:{extproc_port}", "--decider",
                        f"127.0.0.1:{decider_port}", *client_tls,
                        "--envoy-admin", f"127.0.0.1:{admin_port}", config=config).stdout
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(rendered)
    log = open(tmp_path / "procs.log", "wb")  # noqa: SIM115
    extproc = start_extproc(config, extproc_port, decider_port, log, *server_tls)
    envoy = subprocess.Popen([envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart",
                              "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{listen_port}/v1/chat/completions"
    headers = {"authorization": f"Bearer {secret}"}
    try:
        ok = wait_until(lambda: httpx.post(url, json=CHAT, headers=headers).status_code == 200,
                        timeout=20, what="envoy + ext_proc")
        assert ok

        stop_extproc(extproc)
        fake_openai.reset()
        down = httpx.post(url, json=CHAT, headers=headers)
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "gateway_unavailable"
        assert fake_openai.requests == []  # never an unchecked pass-through
        anthropic_down = httpx.post(f"http://127.0.0.1:{listen_port}/v1/messages",
                                    json=CHAT, headers=headers)
        assert anthropic_down.json()["error"]["type"] == "overloaded_error"

        extproc = start_extproc(config, extproc_port, decider_port, log, *server_tls)
        wait_until(lambda: httpx.post(url, json=CHAT, headers=headers).status_code == 200,
                   timeout=20, what="traffic to resume")
        assert envoy.poll() is None  # the same Envoy throughout
        assert fake_openai.requests[-1].headers["authorization"] == f"Bearer {OPENAI_KEY}"

        fake_openai.enqueue(Behaviour("fail", status=503))
        served = httpx.post(url, json=CHAT, headers={"authorization": f"Bearer {fallback_secret}"})
        assert served.status_code == 200
        assert served.headers["x-langwatch-provider"] == "mp_anthropic"
        assert served.headers["x-langwatch-fallback-count"] == "1"
        assert fake_anthropic.requests[-1].headers["x-api-key"] == ANTHROPIC_KEY

        # An Envoy that runs the filters another tollgate rendered (not rendered again after
        # an upgrade): its decisions are refused, loudly, and nothing is forwarded.
        other_listen, other_admin = free_port(), free_port()
        ours = f'local FILTERS = "{envoy_config.FILTERS_VERSION}"'
        other = tollgate("envoy", "render", "--listen", f"127.0.0.1:{other_listen}",
                         "--extproc", f"127.0.0.1:{extproc_port}", "--decider",
                         f"127.0.0.1:{decider_port}", *client_tls,
                         "--envoy-admin", f"127.0.0.1:{other_admin}", config=config).stdout
        assert ours in other
        (tmp_path / "other.yaml").write_text(
            other.replace(ours, 'local FILTERS = "0123456789ab"'))
        skewed = subprocess.Popen([envoy_binary(), "-c", str(tmp_path / "other.yaml"),
                                   "--disable-hot-restart", "--log-level",
                                   "warn"], stdout=log, stderr=subprocess.STDOUT)
        try:
            forwarded = len(fake_openai.requests)
            refused = wait_until(lambda: (r := httpx.post(
                f"http://127.0.0.1:{other_listen}/v1/chat/completions", json=CHAT,
                headers=headers)).status_code == 500 and r, timeout=20, what="the other envoy")
            assert refused.json()["error"]["code"] == "gateway_error"
            assert len(fake_openai.requests) == forwarded
            # Their ledger rows, from Envoy's reports of the replies it made itself.
            rows = wait_until(lambda: [r for r in ledger(config) if r.status == 500],
                              what="the refused requests' ledger rows")
            assert {(r.code, r.provider, r.outcome, r.key_id is not None) for r in rows} == {
                ("gateway_error", None, "refused", True)}
            # `tollgate status` reads each Envoy's filters from its admin.
            cfg = load_config(config).config
            assert older_view(f"127.0.0.1:{admin_port}", cfg) == []
            assert older_view(f"127.0.0.1:{other_admin}", cfg) == [
                "it runs tollgate filters of version 0123456789ab, which this tollgate's "
                f"decision service refuses (its own: {envoy_config.FILTERS_VERSION})"]
        finally:
            skewed.terminate()
            skewed.wait(10)
        said = (tmp_path / "procs.log").read_text()
        assert "tollgate filters of another version (0123456789ab; this service's are " \
               f"{envoy_config.FILTERS_VERSION})" in said
        # The same extproc goes on deciding for the Envoy of its own version.
        assert httpx.post(url, json=CHAT, headers=headers).status_code == 200

        # A provider added after the render: Envoy has no cluster for it, and says how to fix.
        tollgate("model-providers", "create", "--id", "mp_late", "--type", "openai", "--scope",
                 "ORG:acme", "--base-url", fake_openai.url, "--api-key-env", "FAKE_OPENAI_KEY",
                 "--fallback-priority", "0", config=config)
        stale = wait_until(lambda: (r := httpx.post(url, json=CHAT, headers=headers))
                           .status_code == 500 and r, what="ext_proc to pick up mp_late")
        assert stale.json()["error"]["code"] == "gateway_error"
        assert "tollgate envoy render" in stale.json()["error"]["message"]
    finally:
        stop_extproc(extproc)
        envoy.terminate()
        envoy.wait(10)
        log.close()


def test_envoy_errors_answer_in_the_clients_family_after_translation(tmp_path, fake_openai,
                                                                    fake_anthropic):
    """An OpenAI client whose request went to an (unreachable) Anthropic provider gets
    Envoy's error in OpenAI's shape, though the upstream path was Anthropic's."""
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    tollgate("model-providers", "create", "--id", "mp_gone", "--type", "anthropic", "--scope",
             "ORG:acme", "--base-url", f"http://127.0.0.1:{free_port()}", "--api-key-env",
             "FAKE_ANTHROPIC_KEY", config=config)
    out = tollgate("routing-policies", "create", "--scope", "ORG:acme", "--name", "gone",
                   "--model-provider", "mp_gone", "--model-map",
                   "mp_gone:gpt-5-mini=claude-haiku-4-5", "--format", "json", config=config)
    secret = new_key(config, "--routing-policy", json.loads(out.stdout)["id"])
    gw = GatewayProcess("envoy", config, tmp_path).start()
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
        with pytest.raises(openai.InternalServerError) as exc:
            client.chat.completions.create(**CHAT)
        assert exc.value.status_code == 502
        assert exc.value.body["code"] == "provider_unreachable"
        assert exc.value.body["type"] == "server_error"
    finally:
        gw.stop()


def test_envoy_errors_answer_an_anthropic_client_in_its_family_by_its_path(tmp_path,
                                                                          fake_openai,
                                                                          fake_anthropic):
    """An Anthropic client whose request went, untranslated, to an unreachable Anthropic
    provider gets Envoy's error in Anthropic's shape: the path tells its family (the
    decision leaves it out of the metadata)."""
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    tollgate("model-providers", "create", "--id", "mp_gone", "--type", "anthropic", "--scope",
             "ORG:acme", "--base-url", f"http://127.0.0.1:{free_port()}", "--api-key-env",
             "FAKE_ANTHROPIC_KEY", config=config)
    out = tollgate("routing-policies", "create", "--scope", "ORG:acme", "--name", "gone",
                   "--model-provider", "mp_gone", "--format", "json", config=config)
    secret = new_key(config, "--routing-policy", json.loads(out.stdout)["id"])
    gw = GatewayProcess("envoy", config, tmp_path).start()
    try:
        client = anthropic.Anthropic(base_url=gw.url, api_key=secret, max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as exc:
            client.messages.create(model="claude-haiku-4-5", max_tokens=16,
                                   messages=[{"role": "user", "content": "hi"}])
        assert exc.value.status_code == 502
        assert exc.value.body["type"] == "error"
        assert exc.value.body["error"]["type"] == "api_error"
    finally:
        gw.stop()


def test_the_gateway_span_is_named_on_every_forwarded_response_under_the_configs_prefix(
        tmp_path, fake_openai, fake_anthropic):
    """The meter names the gateway's span on each forwarded request's response, a provider's
    answer or Envoy's own reply (a provider unreachable), under the config's header prefix:
    the ids of the traceparent the provider received, and of the request's access-log line."""
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    config.write_text(config.read_text().replace(
        'header_prefix: "X-LangWatch-"', 'header_prefix: "X-Gate-"', 1).replace(
        "  max_body_bytes:", "  telemetry:\n    access_log: access.log\n  max_body_bytes:", 1))
    tollgate("model-providers", "create", "--id", "mp_gone", "--type", "openai", "--scope",
             "ORG:acme", "--base-url", f"http://127.0.0.1:{free_port()}", "--api-key-env",
             "FAKE_OPENAI_KEY", "--models", "o4-mini", "--fallback-priority", "0",
             config=config)
    secret = new_key(config)
    gw = GatewayProcess("envoy", config, tmp_path).start()
    try:
        seen = []
        for model in ("gpt-5-mini", "o4-mini"):  # answered, then unreachable
            r = httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": model},
                           headers={"authorization": f"Bearer {secret}"}, timeout=30)
            assert r.status_code == (200 if model == "gpt-5-mini" else 502)
            assert not [h for h in r.headers if h.startswith("x-langwatch-")]
            trace_id, span_id = r.headers["x-gate-trace-id"], r.headers["x-gate-span-id"]
            assert re.fullmatch("[0-9a-f]{32}", trace_id)
            assert re.fullmatch("[0-9a-f]{16}", span_id)
            seen.append((r.headers["x-gate-request-id"], trace_id, span_id))
        assert fake_openai.requests[-1].headers["traceparent"] == \
            f"00-{seen[0][1]}-{seen[0][2]}-00"
        log = tmp_path / "access.log"

        def logged() -> dict[str, dict]:  # (the start's probe leaves a line too)
            by_id = {x["request_id"]: x for x in map(json.loads, log.read_text().splitlines())}
            return by_id if all(i in by_id for i, _, _ in seen) else {}

        by_id = wait_until(logged, timeout=10, what="both requests' access-log lines")
        assert [(i, by_id[i]["trace_id"], by_id[i]["span_id"]) for i, _, _ in seen] == seen
        assert [by_id[i]["status"] for i, _, _ in seen] == [200, 502]
    finally:
        gw.stop()


@pytest.mark.parametrize("processes", ["1", "2"])
def test_rendered_bootstrap_passes_envoy_validation(config, tmp_path, processes):
    fallback_key(config)  # so a fallback chain is rendered too
    rendered = tollgate("envoy", "render", "--extproc-processes", processes,
                        config=config).stdout
    assert "chain_mp_openai_then_mp_anthropic" in rendered
    path = tmp_path / "envoy.yaml"
    path.write_text(rendered)
    assert "OK" in envoy_validates(path)


def test_new_provider_gets_a_cluster_without_restart(config, tmp_path):
    secret = new_key(config)
    gw = GatewayProcess("envoy", config, tmp_path, env={"SECOND_KEY": "sk-second"}).start()
    second = FakeProvider("openai", "sk-second").start()
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
        assert client.chat.completions.create(**CHAT).choices
        envoy_pid = int(re.search(r"envoy (\d+) listening", gw.log()).group(1))
        tollgate("model-providers", "create", "--id", "mp_second", "--type", "openai",
                 "--scope", "ORG:acme", "--base-url", second.url, "--api-key-env",
                 "SECOND_KEY", "--fallback-priority", "0", config=config,
                 env={"SECOND_KEY": "sk-second"})

        def served_by_second() -> bool:
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT,
                           headers={"authorization": f"Bearer {secret}"})
            return r.status_code == 200 and r.headers["x-langwatch-provider"] == "mp_second"

        wait_until(served_by_second, timeout=5, what="the new provider's cluster")
        assert second.requests[-1].headers["authorization"] == "Bearer sk-second"
        assert alive(envoy_pid)  # same Envoy: the cluster came in through CDS
    finally:
        gw.stop()
        second.stop()


@pytest.fixture
def big_body_config(config):
    text = config.read_text().replace("max_body_bytes: 8388608", "max_body_bytes: 16777216")
    config.write_text(text)
    return config


def test_ten_megabyte_body_passes_intact_under_raised_cap(big_body_config, tmp_path,
                                                          fake_openai):
    secret = new_key(big_body_config)
    gw = GatewayProcess("envoy", big_body_config, tmp_path).start()
    try:
        filler = ("0123456789abcdef" * (10 * 1024 * 1024 // 16))
        body = json.dumps({"model": "gpt-5-mini",
                           "messages": [{"role": "user", "content": filler}]}).encode()
        assert len(body) > 10 * 1024 * 1024
        r = httpx.post(f"{gw.url}/v1/chat/completions", content=body, timeout=60,
                       headers={"authorization": f"Bearer {secret}",
                                "content-type": "application/json"})
        assert r.status_code == 200, r.text[:300]
        assert fake_openai.requests[-1].body == body
        too_big = b'{"model": "gpt-5-mini", "messages": [], "pad": "' + b"x" * (17 << 20) + b'"}'
        r = httpx.post(f"{gw.url}/v1/chat/completions", content=too_big, timeout=60,
                       headers={"authorization": f"Bearer {secret}"})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"
    finally:
        gw.stop()


def test_sigterm_stops_extproc_and_envoy(config, tmp_path):
    gw = GatewayProcess("envoy", config, tmp_path).start()
    envoy_pid = int(re.search(r"envoy (\d+) listening", gw.log()).group(1))
    assert alive(envoy_pid)
    assert gw.stop(signal.SIGTERM) == 0
    wait_until(lambda: not alive(envoy_pid), timeout=5, what="envoy to exit")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gw.url}/v1/models")


def test_envoy_exiting_stops_the_gateway_with_a_failure(config, tmp_path):
    """An Envoy that dies takes `serve envoy` down with a non-zero status and says so, so a
    supervisor (Kubernetes, systemd) sees the failure and restarts the pair."""
    gw = GatewayProcess("envoy", config, tmp_path).start()
    envoy_pid = int(re.search(r"envoy (\d+) listening", gw.log()).group(1))
    os.kill(envoy_pid, signal.SIGKILL)
    status = gw.proc.wait(timeout=20)
    assert status not in (0, None)
    assert re.search(r"envoy exited with status -?\d+", gw.log())


def health(channel) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(
        service="envoy.service.ext_proc.v3.ExternalProcessor"), timeout=2)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def decision_request(secret: str) -> dict[str, Any]:
    """What Envoy's decide filter sends the decision service: a chat completion's head and
    body, with a valid key (httpx's arguments)."""
    head = f":method: POST\n:path: /v1/chat/completions\nauthorization: Bearer {secret}"
    return {"content": json.dumps(CHAT).encode(), "headers": {
        "x-tollgate-body": "whole", "x-tollgate-head": base64.b64encode(head.encode()).decode(),
        "x-tollgate-filters": envoy_config.FILTERS_VERSION}}


def test_tcp_extproc_hands_no_credentials_to_a_plain_client(config, tmp_path):
    """A sidecar shares localhost with the app: a plain client on the TCP ports must not get
    the provider key that the decision service puts in its answers (nor reach ext_proc)."""
    import ssl

    import grpc

    secret = new_key(config)
    port, decider = free_port(), free_port()
    refused = tollgate("serve", "extproc", "--listen", f"127.0.0.1:{port}", config=config,
                       check=False)
    assert refused.returncode == 2 and "--insecure-tcp" in refused.stderr
    server_tls, client_tls = mtls(tmp_path)
    log = open(tmp_path / "extproc.log", "wb")  # noqa: SIM115
    proc = start_extproc(config, port, decider, log, *server_tls)
    client_cert, client_key, ca = client_tls[1::2]
    url = f"https://127.0.0.1:{decider}/decide"
    ask = decision_request(secret)
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(*(
                Path(p).read_bytes() for p in (ca, client_key, client_cert)))) as good:
            assert wait_until(lambda: health(good), timeout=15, what="mTLS health")
        def client_side(certificate: bool) -> ssl.SSLContext:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(cafile=ca)
            context.check_hostname = False  # the server certificate names `localhost`
            if certificate:
                context.load_cert_chain(client_cert, client_key)
            return context

        answer = httpx.post(url, verify=client_side(True), **ask)
        # Envoy's view: the provider's credential among the changes.
        assert answer.headers["x-tollgate-set-authorization"] == f"Bearer {OPENAI_KEY}"
        no_certificate = client_side(False)
        for scheme, client in (("https", httpx.Client(verify=no_certificate)),
                               ("http", httpx.Client())):
            with client, pytest.raises(httpx.HTTPError):
                client.post(url.replace("https:", f"{scheme}:"), **ask).raise_for_status()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain, \
                pytest.raises(grpc.RpcError) as failed:
            health(plain)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_extproc(proc)
        log.close()
    assert OPENAI_KEY not in (tmp_path / "extproc.log").read_text()


def test_oversized_body_is_refused_from_its_content_length(config, tmp_path, fake_openai):
    """The client announces 64 MiB and sends a byte: Envoy answers from the headers alone (a
    gateway waiting for the body would hang until the client gives up)."""
    secret = new_key(config)
    gw = GatewayProcess("envoy", config, tmp_path).start()
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                      b"authorization: Bearer " + secret.encode() + b"\r\n"
                      b"content-type: application/json\r\ncontent-length: 67108864\r\n\r\n{")
            head = s.recv(65536)
    finally:
        gw.stop()
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"payload_too_large" in head
    assert fake_openai.requests == []


def test_extproc_killed_mid_request_fails_closed_and_loses_no_row(config, tmp_path,
                                                                  fake_openai):
    """SIGKILL ext_proc while a request is at the provider: Envoy refuses new requests
    (never passes them unchecked), traffic returns when ext_proc is back, the request that
    was in flight has its ledger row, once, and so has each request Envoy refused while
    ext_proc was down (from its outage log, which holds no secret)."""
    import threading

    from tests.harness import ledger

    secret, in_flight = new_key(config), new_key(config, "--principal", "in-flight@acme.com")
    refused = new_key(config, "--principal", "refused@acme.com")
    listen, admin = free_port(), free_port()
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(tollgate("envoy", "render", "--listen", f"127.0.0.1:{listen}",
                                  "--envoy-admin", f"127.0.0.1:{admin}", config=config).stdout)
    log = open(tmp_path / "procs.log", "wb")  # noqa: SIM115

    def start() -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "tollgate"), "--config", str(config), "serve",
                                 "extproc"], stdout=log, stderr=subprocess.STDOUT)

    extproc = start()
    envoy = subprocess.Popen([envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart",
                              "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{listen}/v1/chat/completions"

    def post(key: str, timeout: float = 10) -> httpx.Response:
        return httpx.post(url, json=CHAT, headers={"authorization": f"Bearer {key}"},
                          timeout=timeout)

    try:
        wait_until(lambda: post(secret).status_code == 200, timeout=20, what="traffic")
        fake_openai.response_delay = 1.5
        outcome: list[object] = []
        worker = threading.Thread(target=lambda: outcome.append(
            _try(lambda: post(in_flight).status_code)))
        worker.start()
        wait_until(lambda: len(fake_openai.requests) >= 2, timeout=5, what="the provider")
        extproc.kill()
        extproc.wait(5)
        down = httpx.post(f"{url}?key=in-the-query", json=CHAT, timeout=10,
                          headers={"authorization": f"Bearer {refused}"})
        assert down.status_code == 503 and down.json()["error"]["code"] == "gateway_unavailable"
        down_id = down.headers["x-langwatch-request-id"]
        worker.join(10)
        fake_openai.response_delay = 0
        extproc = start()
        wait_until(lambda: post(secret).status_code == 200, timeout=20, what="recovery")
        assert envoy.poll() is None  # the same Envoy throughout
        wait_until(lambda: any(r.request_id == down_id for r in ledger(config)), timeout=10,
                   what="the refusal's row, from the outage log")
    finally:
        extproc.terminate()
        extproc.wait(10)
        envoy.terminate()
        envoy.wait(10)
        log.close()
    rows = [r for r in ledger(config) if r.principal == "in-flight@acme.com"
            and r.route == "chat_completions"]
    assert len(rows) == 1, (rows, outcome)
    assert rows[0].outcome == "interrupted"
    (row,) = [r for r in ledger(config) if r.request_id == down_id]
    assert (row.principal, row.status, row.code, row.cost_micros, row.route) == (
        "refused@acme.com", 503, "gateway_unavailable", 0, "chat_completions")
    outage = (config.parent / ".tollgate" / "envoy-outage.log").read_text()
    assert down_id in outage and refused[:12] in outage
    assert refused not in outage and secret not in outage and refused[:13] not in outage
    assert "in-the-query" not in outage


def _try(fn):
    try:
        return fn()
    except httpx.HTTPError as e:
        return e


class _Recorder(socketserver.StreamRequestHandler):
    """A decision service that records what the decide filter asks and answers each
    request itself (418), on one keep-alive connection after another."""

    asked: list[dict[str, str]]

    def handle(self) -> None:
        while line := self.rfile.readline():
            fields = {}
            while (line := self.rfile.readline().rstrip(b"\r\n")):
                name, _, value = line.decode().partition(":")
                fields[name.lower()] = value.strip()
            self.rfile.read(int(fields.get("content-length", "0")))
            self.asked.append(fields)
            self.wfile.write(b"HTTP/1.1 200 OK\r\nx-tollgate-reply: 418\r\n"
                             b"x-tollgate-meta-answered: 1\r\ncontent-length: 0\r\n\r\n")


def test_the_decide_filter_sends_an_apps_requests_the_same_head(config, tmp_path):
    """What differs on every request and the decision does not read stays out of the
    client's head the decide filter sends (Envoy's request id; the value of a whole body's
    length: that the client declared one stays), so an app's requests send the same head,
    which the decision service decodes once. A body left unread is refused by its length,
    which its head keeps."""
    import threading

    listen = free_port()
    sock = tmp_path / "decide.sock"
    asked: list[dict[str, str]] = []
    server = socketserver.ThreadingUnixStreamServer(
        str(sock), type("Recording", (_Recorder,), {"asked": asked}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(tollgate(
        "envoy", "render", "--listen", f"127.0.0.1:{listen}", "--envoy-admin",
        f"127.0.0.1:{free_port()}", "--decider", f"unix:{sock}", config=config).stdout)
    log = open(tmp_path / "envoy.log", "wb")  # noqa: SIM115
    envoy = subprocess.Popen([envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart",
                              "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{listen}/v1/chat/completions"
    headers = {"authorization": "Bearer tg-app", "x-request-id": "the-apps-own"}
    try:
        wait_until(lambda: httpx.post(url, json=CHAT, headers=headers).status_code == 418,
                   timeout=20, what="envoy")
        asked.clear()
        for words in ("hi", "a longer question " * 20):
            answered = httpx.post(url, headers=headers, json={
                **CHAT, "messages": [{"role": "user", "content": words}]})
            assert answered.status_code == 418
        huge = httpx.post(url, headers=headers, content=b"x" * (8 * 1024 * 1024 + 1))
        assert huge.status_code == 418
    finally:
        envoy.terminate()
        envoy.wait(10)
        log.close()
        server.shutdown()
        server.server_close()
    heads = [base64.b64decode(a["x-tollgate-head"]).decode().split("\n") for a in asked]
    assert [a["x-tollgate-body"] for a in asked] == ["whole", "whole", "unread"]
    # The version of the filters Envoy runs, which the decision service checks.
    assert [a["x-tollgate-filters"] for a in asked] == [envoy_config.FILTERS_VERSION] * 3
    assert asked[0]["x-tollgate-head"] == asked[1]["x-tollgate-head"]
    names = [line.partition(": ")[0] for line in heads[0]]
    assert {":method", ":path", "authorization", "x-client-request-id"} <= set(names)
    # A whole body's length is said to be declared, without its value.
    assert "x-request-id" not in names and "content-length: " in heads[0]
    assert "content-length: 8388609" in heads[2]
    assert not any(line.startswith("x-request-id:") for line in heads[2])
