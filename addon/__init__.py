"""mitmproxy host: `tollgate_addon.py` adapts mitmproxy flows to the tollgate core."""

from pathlib import Path

SCRIPT = Path(__file__).with_name("tollgate_addon.py")
