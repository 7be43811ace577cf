"""Envoy host: the ext_proc gRPC service that adapts Envoy's messages to the tollgate core."""
