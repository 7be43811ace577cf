"""Envoy host: the ext_proc gRPC service that adapts Envoy's messages to the tollgate core."""

import os

# Envoy opens two or three ext_proc streams per request. gRPC's EventEngine listener spends
# about 0.5 ms more CPU per request on them than its classic one (on a 2-core box: the
# poller thread goes from ~0.6 to ~0.1 ms per request); it must be chosen before gRPC starts.
# An operator's own GRPC_EXPERIMENTS wins.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_listener")
