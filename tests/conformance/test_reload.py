"""Config hot reload as a running gateway sees it."""

from __future__ import annotations

import json

import openai

from tests.harness import wait_until

CHAT = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}


def test_broken_edit_keeps_last_good_config_and_is_reported(gateway):
    key = gateway.create_key()
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret, max_retries=0)
    good = gateway.config.read_text()
    broken = good.replace("max_body_bytes:", "max_body_byte:", 1)
    try:
        gateway.config.write_text(broken)
        line = next(i for i, text in enumerate(broken.splitlines(), 1)
                    if "max_body_byte:" in text)
        expected = f"{gateway.config}:{line}: gateway.max_body_byte: unknown field"
        wait_until(lambda: expected in gateway.process.log(), timeout=3,
                   what="the rejected reload to be logged")
        assert client.chat.completions.create(**CHAT).choices  # still serving
    finally:
        gateway.config.write_text(good)
    # A later good edit is picked up again.
    gateway.cli("virtual-keys", "disable", key.id)
    gateway.wait_for_key(key, lambda status: status == 403)


def test_bad_bytes_do_not_stop_reloads_and_status_says_why(gateway):
    """An edit that is not UTF-8 used to kill the watcher: every later revoke was ignored."""
    key = gateway.create_key()
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=key.secret, max_retries=0)
    good = gateway.config.read_bytes()
    pid = gateway.process.proc.pid

    def mine() -> dict:
        out = gateway.cli("status", "--format", "json", check=False)
        return next(g for g in json.loads(out.stdout)["gateways"] if g["pid"] == pid)

    assert mine()["stale"] is False
    try:
        gateway.config.write_bytes(good + b"# \xff\xfe\n")
        wait_until(lambda: mine()["stale"] and "not valid UTF-8" in mine()["last_error"],
                   timeout=3, what="status to report the rejected reload")
        assert client.chat.completions.create(**CHAT).choices  # still serving
    finally:
        gateway.config.write_bytes(good)
    wait_until(lambda: not mine()["stale"], timeout=3, what="the good file to be reloaded")
    gateway.cli("virtual-keys", "revoke", key.id, "--yes")
    gateway.wait_for_key(key, lambda status: status == 403)
