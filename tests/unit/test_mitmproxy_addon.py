"""The mitmproxy host's own process."""

from __future__ import annotations

import gc

from mitmproxy.test import taddons


async def test_the_mitmproxy_host_puts_what_it_started_with_out_of_the_collectors_sight(
        config_dir, monkeypatch):
    """Once running, mitmproxy's and the gateway's start-up objects are frozen: a full
    collection no longer scans them (it paused the host 78 ms, before)."""
    from addon.tollgate_addon import TollgateAddon

    monkeypatch.setenv("TOLLGATE_KEY_PEPPER", "heap-pepper")
    addon = TollgateAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, tollgate_config=str(config_dir / "gateway.yaml"))
        assert addon.gateway is not None
        try:
            before = gc.get_freeze_count()
            await addon.running()
            frozen = gc.get_freeze_count()
        finally:
            gc.unfreeze()
            addon.sink.stop()
            await addon.gateway.close()
    assert before == 0 and frozen > 1000
