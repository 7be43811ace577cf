"""Virtual keys: secret generation, HMAC hashing, O(1) lookup and key state."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tollgate.config.schema import VirtualKey
from tollgate.errors import GatewayError
from tollgate.statedir import state_dir

SECRET_PREFIX = "tg"
# How much of a secret `virtual-keys list` shows: not enough to use, enough to tell keys apart.
KEY_PREFIX_CHARS = len(SECRET_PREFIX) + 10


def generate_secret(env: str) -> str:
    return f"{SECRET_PREFIX}-{env}-{secrets.token_urlsafe(32)}"


def hash_secret(secret: str, pepper: bytes | hmac.HMAC) -> str:
    """The secret's HMAC under the pepper; or under an HMAC already keyed with it, which
    spares each lookup the key schedule (about a quarter of its time on a request's path)."""
    keyed = hmac.new(pepper, digestmod=hashlib.sha256) if isinstance(pepper, bytes) \
        else pepper.copy()
    # surrogateescape: a header's raw bytes (not UTF-8) still hash, and simply match no key
    keyed.update(secret.encode("utf-8", "surrogateescape"))
    return keyed.hexdigest()


def display_prefix(secret: str) -> str:
    return secret[:KEY_PREFIX_CHARS]


class PepperMismatch(ValueError):
    """The pepper here is not the one the config's keys were made with."""


def pepper_fingerprint(pepper: bytes) -> str:
    """Names a pepper without revealing it (an HMAC under the pepper of a fixed text)."""
    return hmac.new(pepper, b"tollgate pepper fingerprint", hashlib.sha256).hexdigest()[:16]


def pepper_file(config_path: Path) -> Path:
    return state_dir(config_path) / "pepper"


def load_pepper(env_var: str, config_path: Path, fingerprint: str | None = None) -> bytes:
    """The HMAC pepper: from the environment, else a generated file beside the config.

    The file fallback keeps a single-machine setup working out of the box; production
    deployments set the environment variable from their secret store. With `fingerprint`
    (the config's keys were made with a pepper), no new pepper is generated, and one that
    does not match is refused: PepperMismatch says where the pepper comes from.
    """
    value = os.environ.get(env_var)
    path = pepper_file(config_path)
    if value:
        pepper, source = value.encode(), f"${env_var}"
    else:
        try:
            pepper, source = path.read_bytes().strip(), str(path)
        except FileNotFoundError:
            if fingerprint:
                raise PepperMismatch(_mismatch(fingerprint, env_var, path,
                                               "neither is set here")) from None
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = secrets.token_urlsafe(32).encode()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(fresh)
            return fresh
    if fingerprint and not hmac.compare_digest(pepper_fingerprint(pepper), fingerprint):
        raise PepperMismatch(_mismatch(fingerprint, env_var, path, f"the one from {source} "
                                       f"has {pepper_fingerprint(pepper)}"))
    return pepper


def _mismatch(fingerprint: str, env_var: str, path: Path, found: str) -> str:
    return (f"the virtual keys in this config were made with the pepper whose fingerprint "
            f"is {fingerprint}, and {found}: every key would be refused as unknown. "
            f"The pepper comes from ${env_var} when it is set, else from the file {path}. "
            f"Carry the original with the config: set ${env_var} from your secret store on "
            f"every gateway, or copy the pepper file from the directory the keys were made in.")


@dataclass(frozen=True)
class _Entry:
    key: VirtualKey
    secret_hash: str
    valid_until: datetime | None  # set for a rotated-out secret in its grace period


class KeyIndex:
    """hash -> key, built once per config load, so a lookup is one HMAC and one dict probe.

    A secret that matched a key is found again by a BLAKE2b digest of it under a key of
    this process's own (a single hash: half an HMAC's time on a request's path, where it is
    cold). Only such digests are kept, the newest `SEEN`, never a secret; one that matched
    nothing is hashed anew each time."""

    SEEN = 4096

    def __init__(self, keys: list[VirtualKey], pepper: bytes):
        self._keyed = hmac.new(pepper, digestmod=hashlib.sha256)
        self._by_hash: dict[str, _Entry] = {}
        for vk in keys:
            self._by_hash[vk.secret_hash] = _Entry(vk, vk.secret_hash, None)
            for prev in vk.previous_secrets:
                self._by_hash.setdefault(prev.secret_hash, _Entry(vk, prev.secret_hash,
                                                                 prev.expires_at))
        self._salt = os.urandom(hashlib.blake2b.MAX_KEY_SIZE)
        self._seen: dict[bytes, _Entry] = {}

    def find(self, secret: str, now: datetime) -> VirtualKey | None:
        entry = self.entry(secret, now)
        return None if entry is None else entry.key

    def entry(self, secret: str, now: datetime) -> _Entry | None:
        """The key `secret` is one of, and until when (None: as long as the key) it is."""
        presented = secret.encode("utf-8", "surrogateescape")
        seen = hashlib.blake2b(presented, key=self._salt).digest()
        entry = self._seen.get(seen)
        if entry is None:
            digest = hash_secret(secret, self._keyed)
            entry = self._by_hash.get(digest)
            if entry is None or not hmac.compare_digest(entry.secret_hash, digest):
                return None
            if len(self._seen) >= self.SEEN:
                del self._seen[next(iter(self._seen))]  # the oldest
            self._seen[seen] = entry
        if entry.valid_until is not None and now >= _aware(entry.valid_until):
            return None
        return entry


def presented_secrets(headers: Mapping[str, str]) -> list[str]:
    """Candidate secrets: `Authorization: Bearer` and `x-api-key`, on every route.

    Anthropic SDKs may send the key either way, so both are accepted everywhere.
    """
    found = []
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        found.append(token.strip())
    api_key = headers.get("x-api-key", "").strip()
    if api_key and api_key not in found:
        found.append(api_key)
    return found


def by_prefix(keys: list[VirtualKey], headers: dict[str, str]) -> VirtualKey | None:
    """The key whose shown prefix was presented, when only that much of a secret is known
    (a proxy's log keeps no more) and exactly one key has it. This names whose request it
    was; it proves nothing, so it is never used to let a request through."""
    presented = {s for s in presented_secrets(headers) if len(s) == KEY_PREFIX_CHARS}
    found = [k for k in keys if k.secret_prefix and k.secret_prefix in presented]
    return found[0] if len(found) == 1 else None


def authenticate(index: KeyIndex, headers: Mapping[str, str], now: datetime | None = None
                 ) -> VirtualKey:
    return authenticated(index, headers, now)[0]


def authenticated(index: KeyIndex, headers: Mapping[str, str], now: datetime | None = None
                  ) -> tuple[VirtualKey, datetime | None]:
    """The key the headers present, and until when the secret they present is one of its
    own (None: as long as the key is): a rotated-out secret's grace ends before its key."""
    now = now or datetime.now(UTC)
    candidates = presented_secrets(headers)
    if not candidates:
        raise GatewayError("invalid_api_key",
                           "No virtual key provided. Send it as `Authorization: Bearer <key>` "
                           "or `x-api-key: <key>`.")
    entry = next((e for s in candidates if (e := index.entry(s, now)) is not None), None)
    if entry is None:
        raise GatewayError("invalid_api_key",
                           "Unknown virtual key. Check the key your app loads, or create one "
                           "with `tollgate virtual-keys create`.")
    until = None if entry.valid_until is None else _aware(entry.valid_until)
    return usable(entry.key, now), until


def usable(key: VirtualKey, now: datetime | None = None) -> VirtualKey:
    """The key, unless it is revoked, disabled or expired (then the refusal that says so)."""
    now = now or datetime.now(UTC)
    if key.status == "revoked":
        raise GatewayError("virtual_key_revoked",
                           f"Virtual key {key.id} ({key.name}) has been revoked. "
                           "Use another key or create a new one.")
    if key.status == "disabled":
        raise GatewayError("virtual_key_disabled",
                           f"Virtual key {key.id} ({key.name}) is disabled. "
                           f"Re-enable it with `tollgate virtual-keys enable {key.id}`.")
    if key.expires_at is not None and now >= _aware(key.expires_at):
        raise GatewayError("virtual_key_expired",
                           f"Virtual key {key.id} ({key.name}) expired at "
                           f"{_aware(key.expires_at).isoformat()}. Rotate or create a key.")
    return key


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
