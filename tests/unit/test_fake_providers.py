"""The fake providers answer the vendors' own clients as the real services do: a fake that
accepted anything would prove nothing about the gateway in front of it."""

from __future__ import annotations

import openai
import pytest

from tests.fakes.providers import FakeProvider

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def azure():
    fake = FakeProvider("azure", "azure-key", deployments={"my-dep": "gpt-4o-mini"}).start()
    yield fake
    fake.stop()


def client(fake: FakeProvider, key: str = "azure-key", version: str = "2024-10-21"):
    return openai.AzureOpenAI(azure_endpoint=fake.url, api_key=key, api_version=version,
                              max_retries=0)


def test_the_azure_fake_serves_the_azure_client(azure):
    answer = client(azure).chat.completions.create(model="my-dep", messages=MESSAGES)
    assert answer.model == "gpt-4o-mini" and answer.usage.total_tokens > 0
    sent = azure.requests[-1]
    assert sent.path == "/openai/deployments/my-dep/chat/completions?api-version=2024-10-21"
    assert sent.headers["api-key"] == "azure-key" and "authorization" not in sent.headers
    chunks = list(client(azure).chat.completions.create(
        model="my-dep", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0
    vectors = client(azure).embeddings.create(model="my-dep", input=["a", "b"])
    assert len(vectors.data) == 2


def test_the_azure_fake_refuses_what_azure_refuses(azure):
    with pytest.raises(openai.AuthenticationError):
        client(azure, key="wrong").chat.completions.create(model="my-dep", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client(azure, version="2019-01-01").chat.completions.create(model="my-dep",
                                                                    messages=MESSAGES)
    with pytest.raises(openai.NotFoundError) as missing:
        client(azure).chat.completions.create(model="no-such-dep", messages=MESSAGES)
    assert missing.value.code == "DeploymentNotFound"
