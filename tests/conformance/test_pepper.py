"""A config copied to a new place (a replica, a ConfigMap) without its pepper: the gateway
refuses to start and says where the pepper comes from, instead of refusing every key."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from tests.conftest import HOSTS, PEPPER, make_config
from tests.harness import GatewayProcess, tollgate
from tollgate.config.load import load_config
from tollgate.keys import pepper_fingerprint


@pytest.fixture(scope="module")
def original(tmp_path_factory, fake_openai, fake_anthropic):
    """A config whose key was made with the test run's pepper ($TOLLGATE_KEY_PEPPER)."""
    config = make_config(tmp_path_factory.mktemp("pepper"), fake_openai, fake_anthropic)
    tollgate("virtual-keys", "create", "--name", "k", "--scope", "ORG:acme", config=config)
    return config


def copy(config, to):
    to.mkdir()
    for name in ("gateway.yaml", "prices.yaml", "models.yaml"):
        shutil.copyfile(config.parent / name, to / name)
    return to / "gateway.yaml"


def test_making_a_key_records_the_peppers_fingerprint(original):
    settings = load_config(original).config.gateway
    assert settings.pepper_fingerprint == pepper_fingerprint(PEPPER.encode())
    assert PEPPER not in original.read_text()


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("pepper", ["", "another-pepper"])
def test_a_gateway_without_the_keys_pepper_refuses_to_start(original, tmp_path, host, pepper):
    config = copy(original, tmp_path / "replica")
    gw = GatewayProcess(host, config, tmp_path, env={"TOLLGATE_KEY_PEPPER": pepper})
    with pytest.raises(RuntimeError) as e:
        gw.start()
    said = str(e.value)
    assert "gateway.pepper_fingerprint" in said and "$TOLLGATE_KEY_PEPPER" in said
    assert str(tmp_path / "replica" / ".tollgate" / "pepper") in said
    assert not (tmp_path / "replica" / ".tollgate" / "pepper").exists()  # none made up


@pytest.mark.parametrize("host", HOSTS)
def test_with_the_pepper_carried_the_copy_serves_the_keys(original, tmp_path, host):
    config = copy(original, tmp_path / "replica")
    secret = tollgate("virtual-keys", "create", "--name", "k2", "--scope", "ORG:acme",
                      "--format", "json", config=config).stdout
    gw = GatewayProcess(host, config, tmp_path).start()  # the run's $TOLLGATE_KEY_PEPPER
    try:
        r = httpx.get(f"{gw.url}/v1/models",
                      headers={"authorization": f"Bearer {json.loads(secret)['secret']}"})
        assert r.status_code == 200
    finally:
        gw.stop()


def test_the_cli_makes_no_key_with_another_pepper(original, tmp_path):
    config = copy(original, tmp_path / "replica")
    result = tollgate("virtual-keys", "create", "--name", "k3", "--scope", "ORG:acme",
                      config=config, env={"TOLLGATE_KEY_PEPPER": "another-pepper"}, check=False)
    assert result.returncode != 0 and "pepper_fingerprint" not in result.stdout
    assert "made with the pepper whose fingerprint" in result.stderr
    assert "k3" not in config.read_text()
