"""Tool rules as RE2 regular expressions: matching takes time linear in the tool name,
whatever the pattern, so no rule and no request can stall the gateway."""

from __future__ import annotations

from functools import lru_cache

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern is reported in the config error instead


class RuleError(ValueError):
    pass


@lru_cache(maxsize=1024)
def compiled(pattern: str) -> re2._Regexp:
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise RuleError(f"invalid regex {pattern!r}: {reason} (rules use RE2 syntax: no "
                        "backreferences or lookaround)") from None


def matches(pattern: str, name: str) -> bool:
    return compiled(pattern).search(name) is not None
