"""ext_proc as several processes, as the rendered Envoy configuration sees it: where each
listens, and the routes that send a request's later streams to the process that decided it."""

from __future__ import annotations

import pytest

from extproc import envoy_config
from extproc.envoy_config import EXTPROC_PROCESS_HEADER, FILTER_ROLE_HEADER
from tests.unit.test_envoy_fallback import config, key, provider
from tollgate.headers import GATEWAY_PREFIX


def test_processes_listen_beside_the_first_address():
    assert envoy_config.process_targets("unix:/run/tg/extproc.sock", 3) == [
        "unix:/run/tg/extproc.sock", "unix:/run/tg/extproc-1.sock",
        "unix:/run/tg/extproc-2.sock"]
    assert envoy_config.process_targets("10.0.0.5:7000", 2) == ["10.0.0.5:7000",
                                                                "10.0.0.5:7001"]
    assert envoy_config.process_targets("unix:/x.sock", 1) == ["unix:/x.sock"]


def test_each_process_decides_beside_its_ext_proc_address():
    from extproc.listen import Listener

    unix = envoy_config.process_listeners(Listener("unix:/run/tg/extproc.sock"), 2)
    assert [(w.target, w.decider) for w in unix] == [
        ("unix:/run/tg/extproc.sock", "unix:/run/tg/extproc.decide.sock"),
        ("unix:/run/tg/extproc-1.sock", "unix:/run/tg/extproc-1.decide.sock")]
    tcp = envoy_config.process_listeners(Listener("10.0.0.5:7000", insecure_tcp=True), 2)
    assert [(w.target, w.decider, w.insecure_tcp) for w in tcp] == [
        ("10.0.0.5:7000", "10.0.0.5:7002", True), ("10.0.0.5:7001", "10.0.0.5:7003", True)]


def test_one_process_renders_as_before():
    cfg = config([provider("a")], [key("k")])
    routes = envoy_config.route_config(cfg)["virtual_hosts"][0]["routes"]
    assert len(routes) == 4 and routes[-1]["match"] == {"prefix": "/"}
    decider, cluster = envoy_config.extproc_clusters(["unix:/x.sock"])
    assert cluster["name"] == envoy_config.EXTPROC_CLUSTER
    assert decider["name"] == envoy_config.DECIDER_CLUSTER
    (endpoint,) = decider["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"pipe": {"path": "/x.decide.sock"}}


def _service(route: dict, filter_name: str) -> dict | None:
    per_route = route.get("typed_per_filter_config", {}).get(filter_name)
    return per_route["overrides"].get("grpc_service") if per_route else None


@pytest.mark.parametrize("processes", [2, 3])
def test_each_requests_later_streams_go_to_the_process_that_decided_it(processes):
    cfg = config([provider("a"), provider("b")], [key("k", on=["5xx"])])
    routes = envoy_config.route_config(cfg, processes)["virtual_hosts"][0]["routes"]
    assert len(routes) == 4 * processes  # fallback or not, extra headers or not
    for route in routes:
        # Every route names one process; none would send a stream to just any of them.
        (pinned,) = [h for h in route["match"]["headers"] if h["name"] == EXTPROC_PROCESS_HEADER]
        process = int(pinned["string_match"]["exact"])
        cluster = envoy_config.process_cluster(process)
        assert cluster == f"{envoy_config.EXTPROC_CLUSTER}_{process}"
        assert _service(route, "tollgate.decide") is None  # decisions spread over all
    # A reshaped response's rewrite stream goes to the process its decision named.
    (rewrite,) = [f for f in envoy_config.http_filters(1 << 20, processes)
                  if f["name"] == "tollgate.rewrite"]
    matchers = rewrite["typed_config"]["xds_matcher"]["matcher_list"]["matchers"]
    assert len(matchers) == processes
    for i, matcher in enumerate(matchers):
        when = {p["single_predicate"]["input"]["typed_config"]["header_name"]:
                p["single_predicate"]["value_match"]["exact"]
                for p in matcher["predicate"]["and_matcher"]["predicate"]}
        assert when == {envoy_config.REWRITE_HEADER: "1", EXTPROC_PROCESS_HEADER: str(i)}
        delegate = matcher["on_match"]["action"]["typed_config"]["typed_config"]
        service = delegate["typed_config"]["grpc_service"]
        assert service["envoy_grpc"]["cluster_name"] == envoy_config.process_cluster(i)
        assert service["initial_metadata"] == [{"key": FILTER_ROLE_HEADER, "value": "rewrite"}]
    clusters = envoy_config.extproc_clusters(
        envoy_config.process_targets("unix:/x/extproc.sock", processes))
    assert [c["name"] for c in clusters] == [
        envoy_config.DECIDER_CLUSTER, envoy_config.EXTPROC_CLUSTER] + [
        name for i in range(processes)
        for name in (envoy_config.process_cluster(i), f"{envoy_config.DECIDER_CLUSTER}_{i}")]
    for spread in clusters[:2]:  # decisions, and proxy replies' log, go to any process
        endpoints = spread["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert len(endpoints) == processes
    # The meter posts to the decision service named by the process the decision set.
    meter = envoy_config.meter_filter()["typed_config"]["default_source_code"]["inline_string"]
    assert f'local CLUSTER = "{envoy_config.DECIDER_CLUSTER}"' in meter
    assert 'CLUSTER .. "_" .. decided["process"]' in meter
    for i, c in enumerate(clusters[2:][1::2]):
        (endpoint,) = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
        socket = "/x/extproc.decide.sock" if i == 0 else f"/x/extproc-{i}.decide.sock"
        assert endpoint["endpoint"]["address"] == {"pipe": {"path": socket}}
    # Each request's end is reported to its own process.
    logs = envoy_config.response_end_logs(processes)
    assert len(logs) == processes
    for i, entry in enumerate(logs):
        assert entry["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"][
            "cluster_name"] == envoy_config.process_cluster(i)
        assert envoy_config._metadata_is("process", str(i)) in \
            entry["filter"]["and_filter"]["filters"]
    # A client's own header of that name is dropped before any route is matched.
    early = envoy_config.EARLY_MUTATIONS["typed_config"]["mutations"]
    assert {"remove_on_match": {"key_matcher": {"prefix": GATEWAY_PREFIX}}} in early
    assert EXTPROC_PROCESS_HEADER.startswith(GATEWAY_PREFIX)
