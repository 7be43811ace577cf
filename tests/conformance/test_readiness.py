"""`/readyz` and `config validate` on providers whose credential comes from the environment's
own chain (Bedrock's AWS chain, Vertex's Application Default Credentials): one that finds none
keeps the replica out of rotation, as a missing API key does."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import HOSTS, make_config
from tests.harness import GatewayProcess, tollgate, wait_until

# An environment with neither chain: no AWS variables or files, no instance role, no ADC.
NO_CHAINS = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
             "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
             "AWS_EC2_METADATA_DISABLED": "true", "GOOGLE_APPLICATION_CREDENTIALS": "",
             "CLOUDSDK_CONFIG": "/nonexistent", "NO_GCE_CHECK": "True"}


@pytest.fixture(scope="module")
def config(tmp_path_factory, fake_openai, fake_anthropic, fake_bedrock, fake_vertex):
    config = make_config(tmp_path_factory.mktemp("readiness"), fake_openai, fake_anthropic)
    tollgate("model-providers", "create", "--id", "mp_bedrock", "--type", "bedrock", "--scope",
             "ORG:acme", "--base-url", fake_bedrock.url, "--provider-config",
             '{"region": "us-east-1"}', config=config)
    tollgate("model-providers", "create", "--id", "mp_vertex", "--type", "vertex", "--scope",
             "ORG:acme", "--base-url", fake_vertex.url, "--provider-config",
             '{"project": "p", "location": "us-east5"}', config=config)
    return config


@pytest.mark.parametrize("host", HOSTS)
def test_readyz_is_503_when_a_provider_finds_no_credentials_in_its_chain(config, tmp_path,
                                                                         host):
    gw = GatewayProcess(host, config, tmp_path, env=NO_CHAINS).start()
    try:
        r = wait_until(lambda: (r := httpx.get(f"{gw.admin_url}/readyz", timeout=10))
                       .status_code == 503 and r, timeout=15, what="readyz")
        problems = " ".join(r.json()["problems"])
        assert "mp_bedrock: no AWS credentials" in problems
        assert "mp_vertex: no Google Application Default Credentials" in problems
    finally:
        gw.stop()
    # With the AWS chain in its environment (the test run's), Bedrock is no problem.
    gw = GatewayProcess(host, config, tmp_path,
                        env={"GOOGLE_APPLICATION_CREDENTIALS": "", "NO_GCE_CHECK": "True",
                             "CLOUDSDK_CONFIG": "/nonexistent"}).start()
    try:
        problems = " ".join(httpx.get(f"{gw.admin_url}/readyz", timeout=10).json()["problems"])
        assert "mp_vertex" in problems and "mp_bedrock" not in problems
    finally:
        gw.stop()


def test_config_validate_says_the_same_and_where_it_looked(config):
    result = tollgate("config", "validate", config=config, env=NO_CHAINS)
    assert "mp_bedrock: no AWS credentials" in result.stderr
    assert "mp_vertex: no Google Application Default Credentials" in result.stderr
    assert "this shell's environment" in result.stderr  # not necessarily the gateway's
    assert result.returncode == 0  # a warning: the gateway's machine may have them
