"""Policy rules as RE2 regular expressions: matching takes time linear in the candidate
(a tool name, an MCP server, a URL, a model), whatever the pattern, so no rule and no request
can stall the gateway.

`host:example.com` is a helper for URL rules: any URL whose host is example.com or one of its
subdomains (any scheme, port, user or path); `host:*.example.com` only its subdomains."""

from __future__ import annotations

from functools import lru_cache

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern is reported in the config error instead


class RuleError(ValueError):
    pass


HOST = "host:"


def expanded(pattern: str) -> str:
    """The RE2 a rule stands for (a `host:` helper becomes one on the URL's host)."""
    if not pattern.startswith(HOST):
        return pattern
    host = pattern.removeprefix(HOST).strip().lower()
    subdomains_only = host.startswith("*.")
    host = host.removeprefix("*.")
    if not host or any(c in host for c in "/:@?#* "):
        raise RuleError(f"invalid host rule {pattern!r}: use host:example.com (it and its "
                        "subdomains) or host:*.example.com (its subdomains)")
    labels = r"([^/?#@]*\.)" + ("" if subdomains_only else "?")
    return (r"(?i)^[a-z][a-z0-9+.-]*://([^/?#@]*@)?" + labels + re2.escape(host)
            + r"(:\d+)?([/?#]|$)")


@lru_cache(maxsize=1024)
def compiled(pattern: str) -> re2._Regexp:
    try:
        return re2.compile(expanded(pattern), _OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise RuleError(f"invalid regex {pattern!r}: {reason} (rules use RE2 syntax: no "
                        "backreferences or lookaround)") from None


def matches(pattern: str, name: str) -> bool:
    return compiled(pattern).search(name) is not None
