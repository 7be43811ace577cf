"""The mitmproxy host's hooks, dispatched from a table of each hook's handlers."""

from __future__ import annotations

import logging

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.addonmanager import AddonManager
from mitmproxy.http import HTTPFlow
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow

from addon import hook_table

hook_table.install()  # as loading the tollgate addon does


class _Hears:
    """Notes each request it hears in `heard`, under its name."""

    def __init__(self, name: str, heard: list[str]) -> None:
        self.name, self.heard = name, heard

    def request(self, flow: HTTPFlow) -> None:
        self.heard.append(self.name)


class _HearsLater(_Hears):
    async def request(self, flow: HTTPFlow) -> None:
        self.heard.append(self.name)


class _Holds:
    """Holds addons of its own, as mitmproxy's script loader holds each script's."""

    def __init__(self, name: str, *addons: object) -> None:
        self.name, self.addons = name, list(addons)


@pytest.fixture
def lookups(monkeypatch) -> list[object]:
    """The addons mitmproxy's own lookup of a hook's handlers has walked, one entry a walk."""
    walked: list[object] = []
    original = AddonManager._iter_hooks

    def counted(self, addon, event):
        walked.append(addon)
        return original(self, addon, event)

    monkeypatch.setattr(AddonManager, "_iter_hooks", counted)
    return walked


async def _request(master, flow: HTTPFlow | None = None) -> None:
    await master.addons.trigger_event(HttpRequestHook(flow or tflow.tflow()))


async def test_a_hook_is_heard_in_mitmproxys_order_from_handlers_looked_up_once(lookups):
    heard: list[str] = []
    first, inner, later, last = (_Hears("first", heard), _Hears("inner", heard),
                                 _HearsLater("later", heard), _Hears("last", heard))
    with taddons.context(first, _Holds("holder", inner, later), last, loadcore=False) as tctx:
        lookups.clear()  # (loading them walked them too)
        for _ in range(5):
            await _request(tctx.master)
        assert heard == ["first", "inner", "later", "last"] * 5
        assert len(lookups) == 3  # one walk from each top-level addon, for all five


async def test_an_addon_added_removed_or_reloaded_is_heard_as_loaded():
    heard: list[str] = []
    one, two = _Hears("one", heard), _Hears("two", heard)
    holder = _Holds("scripts", _Hears("script", heard))
    with taddons.context(one, holder, loadcore=False) as tctx:
        addons = tctx.master.addons
        await _request(tctx.master)
        addons.add(two)
        await _request(tctx.master)
        addons.remove(one)
        await _request(tctx.master)
        # A script edited: its module's addon removed and the new one registered in its place.
        addons.remove(holder.addons[0])
        holder.addons = [addons.register(_Hears("script v2", heard))]
        await _request(tctx.master)
    assert heard == ["one", "script", "one", "script", "two", "script", "two",
                     "script v2", "two"]


async def test_a_new_order_of_scripts_is_followed_once_options_change(config_dir,
                                                                      monkeypatch):
    from addon.tollgate_addon import TollgateAddon

    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", "table-pepper")
    heard: list[str] = []
    tollgate = TollgateAddon()
    holder = _Holds("scripts", _Hears("a", heard), _Hears("b", heard))
    with taddons.context(tollgate, holder) as tctx:
        tctx.configure(tollgate, tollgate_config=str(config_dir / "gateway.yaml"))
        try:
            await _request(tctx.master)
            holder.addons.reverse()  # as the script loader reorders them, on `scripts`
            tctx.configure(tollgate, tollgate_config=str(config_dir / "gateway.yaml"))
            await _request(tctx.master)
        finally:
            await tollgate.done()
    assert heard == ["a", "b", "b", "a"]


class _Fails:
    def request(self, flow: HTTPFlow) -> None:
        raise ValueError("broken addon")


class _Halts:
    def request(self, flow: HTTPFlow) -> None:
        raise exceptions.AddonHalt()


async def _two_requests_after(addon: object, caplog) -> tuple[list[str], list[str]]:
    """What an addon after `addon` heard of two requests, and the errors logged meanwhile."""
    heard: list[str] = []
    with taddons.context(addon, _Hears("after", heard), loadcore=False) as tctx, \
            caplog.at_level(logging.ERROR):
        await _request(tctx.master)
        await _request(tctx.master)
    return heard, [r.getMessage() for r in caplog.records]


async def test_a_failing_handler_is_logged_and_the_next_addon_still_hears_the_hook(caplog):
    heard, errors = await _two_requests_after(_Fails(), caplog)
    assert heard == ["after", "after"]
    assert errors == ["Addon error: broken addon"] * 2


async def test_an_addon_that_halts_a_hook_keeps_it_from_the_addons_after_it():
    heard: list[str] = []
    with taddons.context(_Hears("before", heard), _Halts(), _Hears("after", heard),
                         loadcore=False) as tctx:
        await _request(tctx.master)
    assert heard == ["before"]


class _NotCallable:
    request = "not a handler"


async def test_a_handler_mitmproxy_refuses_is_refused_each_time_as_mitmproxy_does(caplog):
    heard, errors = await _two_requests_after(_NotCallable(), caplog)
    assert heard == ["after", "after"]
    assert len(errors) == 2 and all("not callable" in e for e in errors)


class _View:
    def update(self, flows: list) -> None:
        pass


def test_a_hook_no_addon_hears_is_known_to_be_unheard():
    flow = tflow.tflow()
    with taddons.context(_Hears("one", []), loadcore=True) as tctx:
        assert not hook_table.heard(tctx.master.addons, hooks.UpdateHook([flow]))
        assert hook_table.heard(tctx.master.addons, HttpRequestHook(flow))
        tctx.master.addons.add(_View())
        assert hook_table.heard(tctx.master.addons, hooks.UpdateHook([flow]))


async def test_loading_the_tollgate_addon_puts_the_table_in_place(config_dir, monkeypatch,
                                                                   lookups):
    """The addon's module installs the table as it loads (here, in mitmproxy's test master
    with mitmproxy's core addon): each hook's handlers are then looked up once."""
    import importlib

    import addon.tollgate_addon as module

    monkeypatch.delattr(AddonManager, "trigger_event")  # (restored after the test)
    module = importlib.reload(module)
    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", "table-pepper")
    tollgate = module.TollgateAddon()
    with taddons.context(tollgate) as tctx:
        tctx.configure(tollgate, tollgate_config=str(config_dir / "gateway.yaml"))
        try:
            walks = len(lookups)
            for _ in range(5):
                await tctx.master.addons.trigger_event(hooks.UpdateHook([tflow.tflow()]))
            assert len(lookups) - walks == len(tctx.master.addons.chain)
        finally:
            await tollgate.done()
