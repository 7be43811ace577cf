"""bench.filters: each part it takes out of tollgate's rendered Envoy is taken out alone, the
rest left as rendered, and Envoy accepts what is left."""

import copy

import pytest
import yaml

from bench.breakdown import connection_managers
from bench.filters import CONSTANT_HEAD, PARTS, without_exchange, without_filter
from bench.latency import _Url
from tests.conftest import make_config
from tests.harness import envoy_validates, free_port, tollgate


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("filters")
    config = make_config(tmp, _Url("http://127.0.0.1:9"), _Url("http://127.0.0.1:9"))
    return yaml.safe_load(tollgate("envoy", "render", "--listen",
                                   f"127.0.0.1:{free_port()}", config=config).stdout)


def _decide_code(bootstrap):
    (hcm,) = connection_managers(bootstrap)
    (decide,) = [f for f in hcm["http_filters"] if f["name"] == "tollgate.decide"]
    return decide["typed_config"]["default_source_code"]["inline_string"]


def _parts(bootstrap):
    (hcm,) = connection_managers(bootstrap)
    return ([f["name"] for f in hcm["http_filters"]],
            [log["name"] for log in hcm.get("access_log", [])], _decide_code(bootstrap))


@pytest.mark.parametrize("part", list(PARTS))
def test_each_part_is_taken_out_alone_and_envoy_accepts_the_rest(rendered, part, tmp_path):
    bootstrap = copy.deepcopy(rendered)
    PARTS[part](bootstrap)
    filters, logs, code = _parts(bootstrap)
    was_filters, was_logs, was_code = _parts(rendered)
    if part == "no meter":
        assert filters == [f for f in was_filters if f != "tollgate.meter"] != was_filters
        assert (logs, code) == (was_logs, was_code)
    elif part == "no end log":
        assert logs == [n for n in was_logs if n != "tollgate.response_end"] != was_logs
        assert (filters, code) == (was_filters, was_code)
    else:
        assert "client_head(handle, kind)" in was_code and CONSTANT_HEAD not in was_code
        assert f'["x-tollgate-head"] = {CONSTANT_HEAD}' in code
        assert code.count("base64Escape(client_head") == 0
        assert (filters, logs) == (was_filters, was_logs)
    # Nothing but that part changed elsewhere in the bootstrap.
    assert {k: v for k, v in bootstrap.items() if k != "static_resources"} == \
        {k: v for k, v in rendered.items() if k != "static_resources"}
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    envoy_validates(path)


def test_a_part_the_configuration_no_longer_has_is_refused_not_measured_as_nothing(rendered):
    bootstrap = copy.deepcopy(rendered)
    with pytest.raises(ValueError, match="no filter"):
        without_filter("tollgate.nothing")(bootstrap)
    PARTS["no end log"](bootstrap)
    with pytest.raises(ValueError, match="no access log"):
        PARTS["no end log"](bootstrap)
    PARTS["no client head"](bootstrap)
    with pytest.raises(ValueError, match="needs updating"):
        PARTS["no client head"](bootstrap)
    without_filter("tollgate.decide")(bootstrap)
    with pytest.raises(ValueError, match=r"no filter 'tollgate\.decide'"):
        without_exchange([])(bootstrap)


def test_no_exchange_applies_the_decision_from_lua_with_no_call(rendered, tmp_path):
    decided = [("x-tollgate-set-authorization", 'Bearer s"k\\1'),
               ("x-tollgate-meta-request_id", "req_1")]
    bootstrap = copy.deepcopy(rendered)
    without_exchange(decided)(bootstrap)
    code = _decide_code(bootstrap)
    assert "httpCall" not in code and "httpCall" in _decide_code(rendered)
    assert code.startswith('local ANSWERED = {[":status"] = "200", '
                           '["x-tollgate-set-authorization"] = "Bearer s\\"k\\\\1", '
                           '["x-tollgate-meta-request_id"] = "req_1"}\n')
    assert 'ANSWERED, (client_head(handle, kind) and "")' in code  # the head still gathered
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    envoy_validates(path)
    with pytest.raises(ValueError, match="needs updating"):
        without_exchange(decided)(bootstrap)
