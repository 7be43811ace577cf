"""bench.lean reads wrk's latency distribution in any of its units, and gives each path's
median over its rounds and what it adds over the direct call and over its plain proxy."""

import pytest

from bench.lean import figures, latency, table

WRK = """Running 2s test @ http://127.0.0.1:1/v1/chat/completions
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  300.00us   9.10ms   95.00%
  Latency Distribution
     50%  {p50}
     75%    1.25ms
     90%    1.40ms
     99%  {p99}
  1600 requests in 2.00s, 1.10MB read
Requests/sec:    800.00
"""


@pytest.mark.parametrize(("p50", "p99", "expected"), [
    ("1.14ms", "2.50ms", (1.14, 2.5)),
    ("870.00us", "1.02ms", (0.87, 1.02)),
    ("1.10s", "2.00s", (1100.0, 2000.0)),
])
def test_the_p50_and_p99_are_read_in_ms_whatever_unit_wrk_prints(p50, p99, expected):
    assert latency(WRK.format(p50=p50, p99=p99)) == pytest.approx(expected)


def test_an_output_without_the_distribution_is_refused():
    with pytest.raises(ValueError, match="no 50% latency"):
        latency("unable to connect to 127.0.0.1:1 Connection refused")


def test_each_figure_is_the_median_of_the_rounds_and_the_hosts_are_set_against_their_proxy():
    measured = figures({
        "direct": [(0.16, 0.40), (0.17, 0.50), (0.18, 0.45)],
        "plain envoy": [(0.25, 0.70), (0.24, 0.90), (0.26, 0.80)],
        "tollgate envoy": [(1.10, 2.0), (1.30, 2.2), (1.20, 2.1)],
    })
    assert measured["tollgate envoy"] == pytest.approx((1.20, 2.1))
    lines = table("JSON answer", measured)
    assert lines[-2].split() == ["tollgate", "envoy", "1.200", "2.100", "+1.030", "+1.650"]
    assert lines[-1] == "tollgate envoy over plain envoy: +0.950 ms at the p50"
