"""A gateway started on an address another one holds fails at start, naming the address, in
one line: never two gateways sharing a port (and its traffic), never a traceback."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from extproc.runner import envoy_binary
from tests.conftest import HOSTS, make_config
from tests.harness import BIN, GatewayProcess, free_port, tollgate


@pytest.fixture(scope="module")
def running(tmp_path_factory, fake_openai, fake_anthropic):
    """One gateway per host, holding its addresses."""
    out = {}
    try:
        for host in HOSTS:
            directory = tmp_path_factory.mktemp(f"addresses-{host}")
            config = make_config(directory, fake_openai, fake_anthropic)
            out[host] = GatewayProcess(host, config, directory).start()
        yield out
    finally:
        for gw in out.values():
            gw.stop()


def second(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "tollgate"), "--config", str(gw.config), "serve",
                           gw.host, *args], capture_output=True, text=True, timeout=60)


def refused(result: subprocess.CompletedProcess[str], address: str, option: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert f"{option} {address} is already in use" in out, out
    assert "Traceback" not in out
    assert len(result.stderr.strip().splitlines()) == 1, out  # one line, on stderr


def envoy_admin(gw: GatewayProcess) -> list[str]:
    return ["--envoy-admin", f"127.0.0.1:{free_port()}"] if gw.host == "envoy" else []


@pytest.mark.parametrize("host", HOSTS)
def test_a_second_gateway_on_a_port_in_use_fails_naming_it(running, host):
    gw = running[host]
    result = second(gw, "--listen", f"127.0.0.1:{gw.port}", "--admin",
                    f"127.0.0.1:{free_port()}", *envoy_admin(gw))
    refused(result, f"127.0.0.1:{gw.port}", "--listen")
    # The first still serves, alone.
    assert httpx.get(f"{gw.url}/v1/models").status_code == 401


@pytest.mark.parametrize("host", HOSTS)
def test_an_admin_address_in_use_is_named(running, host):
    gw = running[host]
    admin = gw.admin_url.removeprefix("http://")
    result = second(gw, "--listen", f"127.0.0.1:{free_port()}", "--admin", admin,
                    *envoy_admin(gw))
    refused(result, admin, "--admin")


def test_envoys_admin_address_in_use_is_named(running):
    gw = running["envoy"]
    taken = gw.extra[gw.extra.index("--envoy-admin") + 1]
    result = second(gw, "--listen", f"127.0.0.1:{free_port()}", "--admin",
                    f"127.0.0.1:{free_port()}", "--envoy-admin", taken)
    refused(result, taken, "--envoy-admin")


def test_a_second_extproc_on_a_socket_in_use_fails_naming_it(tmp_path, fake_openai,
                                                              fake_anthropic):
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    socket = f"unix:{tmp_path / 'x' / 'extproc.sock'}"
    first = subprocess.Popen([str(BIN / "tollgate"), "--config", str(config), "serve",
                              "extproc", "--listen", socket], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        from extproc.listen import accepts
        from tests.harness import wait_until
        wait_until(lambda: accepts(tmp_path / "x" / "extproc.sock"), timeout=20,
                   what="the first ext_proc's socket")
        result = subprocess.run([str(BIN / "tollgate"), "--config", str(config), "serve",
                                 "extproc", "--listen", socket], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode != 0
        assert f"{socket}: another ext_proc already serves" in result.stderr
        assert "Traceback" not in result.stderr
        assert first.poll() is None and (tmp_path / "x" / "extproc.sock").exists()
    finally:
        first.terminate()
        first.wait(10)


def test_an_envoy_you_run_does_not_share_its_port_with_another(tmp_path, fake_openai,
                                                               fake_anthropic):
    """The rendered listener turns Envoy's SO_REUSEPORT off: a second Envoy on the same
    address fails to start instead of taking half the connections."""
    config = make_config(tmp_path, fake_openai, fake_anthropic)
    listen = f"127.0.0.1:{free_port()}"
    envoys = []
    try:
        for i in range(2):
            path = tmp_path / f"envoy-{i}.yaml"
            path.write_text(tollgate("envoy", "render", "--listen", listen, "--envoy-admin",
                                     f"127.0.0.1:{free_port()}", config=config).stdout)
            envoys.append(subprocess.Popen(
                [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--base-id",
                 str(free_port()), "--log-level", "error"], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True))
            if i == 0:
                from tests.harness import wait_until
                wait_until(lambda: _listening(listen), timeout=20, what="the first Envoy")
        out, _ = envoys[1].communicate(timeout=30)
        assert envoys[1].returncode != 0
        assert "Address already in use" in out or "cannot bind" in out, out
        assert envoys[0].poll() is None
    finally:
        for envoy in envoys:
            if envoy.poll() is None:
                envoy.terminate()
                envoy.wait(10)


def _listening(address: str) -> bool:
    import socket

    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0
