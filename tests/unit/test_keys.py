"""The key index (tollgate/keys.py): a secret's HMAC finds its key; one found before is
found again by a digest of this process's own, which keeps nothing but digests of secrets
that matched, and checks what may have changed (a rotated secret's grace) each time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tollgate import keys
from tollgate.config.schema import PreviousSecret, VirtualKey
from tollgate.keys import KeyIndex, hash_secret

PEPPER = b"index-pepper"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def key(secret: str, *previous: tuple[str, datetime]) -> VirtualKey:
    return VirtualKey(id="vk_1", name="k", scope="ORG:acme",
                      secret_hash=hash_secret(secret, PEPPER),
                      previous_secrets=[PreviousSecret(secret_hash=hash_secret(s, PEPPER),
                                                       expires_at=at) for s, at in previous])


@pytest.fixture
def hmacs(monkeypatch) -> list[str]:
    """The secrets the index computes an HMAC of, in order."""
    made: list[str] = []
    real = keys.hash_secret
    monkeypatch.setattr(keys, "hash_secret", lambda s, p: made.append(s) or real(s, p))
    return made


def test_a_secret_found_before_is_found_again_without_its_hmac(hmacs):
    index = KeyIndex([key("tg-live-new", ("tg-live-old", NOW + timedelta(hours=1)))], PEPPER)
    for _ in range(3):
        assert index.find("tg-live-new", NOW).id == "vk_1"
        assert index.find("tg-live-old", NOW).id == "vk_1"
    assert hmacs == ["tg-live-new", "tg-live-old"]
    assert all(type(d) is bytes and b"tg-live" not in d for d in index._seen)  # digests only
    # A rotated secret's grace ends for a secret found before as for any other.
    assert index.find("tg-live-old", NOW + timedelta(hours=1)) is None
    assert index.find("tg-live-new", NOW + timedelta(days=400)).id == "vk_1"


def test_a_secret_that_matches_no_key_is_hashed_each_time_and_never_kept(hmacs):
    index = KeyIndex([key("tg-live-new")], PEPPER)
    for _ in range(3):
        assert index.find("tg-live-guess", NOW) is None
    assert hmacs == ["tg-live-guess"] * 3 and index._seen == {}
    # Another process's index (or the next config's) keeps digests of its own.
    other = KeyIndex([key("tg-live-new")], PEPPER)
    index.find("tg-live-new", NOW), other.find("tg-live-new", NOW)
    assert set(index._seen).isdisjoint(other._seen)


def test_the_newest_secrets_found_are_kept(monkeypatch, hmacs):
    monkeypatch.setattr(KeyIndex, "SEEN", 2)
    index = KeyIndex([key("tg-a", ("tg-b", NOW + timedelta(hours=1)),
                          ("tg-c", NOW + timedelta(hours=1)))], PEPPER)
    for secret in ("tg-a", "tg-b", "tg-c", "tg-c", "tg-b", "tg-a"):
        assert index.find(secret, NOW) is not None
    assert hmacs == ["tg-a", "tg-b", "tg-c", "tg-a"]
