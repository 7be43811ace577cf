"""mitmproxy's hooks, each dispatched from a table of the handlers it has.

mitmproxy looks a hook's handlers up each time the hook fires: it walks every loaded addon
(nearly forty in mitmdump, each script's own addons among them) and asks each for a method
of the hook's name. A request fires eight hooks (`requestheaders`, `request`,
`responseheaders`, `response`, each followed by an `update` that no addon of mitmdump
hears), and the walk cost 70-90 µs a hook: plain mitmdump spent 0.35 ms of each request's
time on it, and 0.56 ms of its CPU, more than the gateway's own decision. Here a hook's
handlers are looked up once, with mitmproxy's own lookup, and kept while the same addons
are loaded; a hook no addon hears costs nothing.

The handlers run as mitmproxy runs them: in the order of its addon chain, each top-level
addon's under its own `safecall` (an error is logged, the next addon still hears the hook),
and `AddonHalt` stops the hook. The table is looked up again when an addon is added,
removed or reloaded (a script edited), and when options change (`forget`, from the
tollgate addon's `configure`: a new order of `scripts`). An addon that gives itself a hook
method once loaded is heard from the next of those on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, hooks
from mitmproxy.addonmanager import AddonManager, safecall

# Per top-level addon: its handlers of the hook, in mitmproxy's order (it and its own
# addons); None where mitmproxy's lookup refuses one (not callable): mitmproxy's dispatch
# then runs for it and logs why, each time, as it always has.
Handlers = list[tuple[Any, list[Callable[..., Any]] | None]]


class _Table:
    def __init__(self) -> None:
        self.loaded: tuple[object, ...] = ()
        self.hooks: dict[str, Handlers] = {}

    def handlers(self, manager: AddonManager, event: hooks.Hook) -> Handlers:
        # The chain's addons and every registered one (a script's, too): adding, removing
        # and reloading an addon each changes one or the other. Held, not their ids: a
        # reloaded script's new module and addons may be made where the old ones were.
        loaded = (*manager.chain, *manager.lookup.values())
        if loaded != self.loaded:
            self.loaded, self.hooks = loaded, {}
        found = self.hooks.get(event.name)
        if found is None:
            found = self.hooks[event.name] = list(_lookup(manager, event))
        return found

    def forget(self) -> None:
        self.loaded, self.hooks = (), {}


def _lookup(manager: AddonManager, event: hooks.Hook):
    for addon in manager.chain:
        try:
            funcs: list[Callable[..., Any]] | None = \
                [func for _, func in manager._iter_hooks(addon, event)]
        except exceptions.AddonManagerError:
            funcs = None
        if funcs != []:
            yield addon, funcs


_TABLE = _Table()


async def trigger_event(self: AddonManager, event: hooks.Hook) -> None:
    """`AddonManager.trigger_event`, from the table."""
    args = event.args()
    for addon, funcs in _TABLE.handlers(self, event):
        try:
            with safecall():
                if funcs is None:
                    await self.invoke_addon(addon, event)
                    continue
                for func in funcs:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
        except exceptions.AddonHalt:
            return


def heard(manager: AddonManager, event: hooks.Hook) -> bool:
    """Whether any loaded addon has a handler of `event`'s hook."""
    return bool(_TABLE.handlers(manager, event))


def forget() -> None:
    """Look every hook's handlers up again when it next fires."""
    _TABLE.forget()


def install() -> None:
    """Every mitmproxy hook of this process is dispatched from the table (once, though the
    tollgate script may be reloaded)."""
    AddonManager.trigger_event = trigger_event  # type: ignore[method-assign]
