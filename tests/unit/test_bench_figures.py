"""bench.quick's regression guard: figures of this checkout against the baseline revision's
figures of the same run (synthetic times: nothing here is timed)."""

import json
import shutil
import subprocess
import sys

from bench.latency import _Url
from bench.quick import compare, figures, stored_baseline, with_tables_of
from tests.conftest import make_config
from tests.harness import ROOT
from tollgate.config.load import load_config

PATHS = ("direct", "plain envoy", "mitmdump")


def _run(tollgate_ms: float, baseline_ms: float) -> tuple[dict[str, list[float]],
                                                           dict[str, float]]:
    """A run's times (ms, per path and stream part) and CPU seconds per path."""
    p50 = {"direct": 1.0, "plain envoy": 1.2, "mitmdump": 2.0,
           "tollgate envoy": tollgate_ms, "abc1234 envoy": baseline_ms}
    times = {name: [ms] * 3 for name, ms in p50.items()}
    for name, ms in p50.items():
        times[f"{name} sse first"] = [ms] * 3
        times[f"{name} sse total"] = [ms * 1.2] * 3
    cpu = {"provider": 1.0, "plain envoy": 0.5, "mitmdump": 1.0,
           "tollgate envoy": tollgate_ms, "abc1234 envoy": baseline_ms}
    return times, cpu


def test_each_revision_has_its_own_figures_from_the_same_references():
    times, cpu = _run(tollgate_ms=3.0, baseline_ms=2.4)
    now, then = figures(times, cpu, 1), figures(times, cpu, 1, "abc1234")
    assert now["envoy: p50 / direct p50"] == 3.0
    assert then["envoy: p50 / direct p50"] == 2.4
    assert then["envoy: p50 / plain envoy p50"] == 2.0
    assert set(now) == set(then)  # only the Envoy host ran: no mitmproxy figures
    assert not any(name.startswith("mitmproxy") for name in now)


def test_a_figure_more_than_15_percent_worse_than_the_revisions_is_flagged_and_no_other():
    times, cpu = _run(tollgate_ms=3.0, baseline_ms=2.5)  # +20%
    worse = compare(figures(times, cpu, 1), figures(times, cpu, 1, "abc1234"))
    assert len(worse) == len(figures(times, cpu, 1))
    assert worse[0].startswith("envoy: p50 / direct p50: 3.000, baseline 2.500 (+20%)")
    times, cpu = _run(tollgate_ms=3.0, baseline_ms=2.7)  # +11%
    assert compare(figures(times, cpu, 1), figures(times, cpu, 1, "abc1234")) == []
    times, cpu = _run(tollgate_ms=2.0, baseline_ms=3.0)  # better
    assert compare(figures(times, cpu, 1), figures(times, cpu, 1, "abc1234")) == []


def test_a_fallback_key_is_a_figure_of_its_own_when_it_was_measured():
    times, cpu = _run(tollgate_ms=3.0, baseline_ms=2.4)
    assert not any("fallback" in name for name in figures(times, cpu, 1))
    for who, ms in (("tollgate", 3.6), ("abc1234", 6.0)):  # its own process: its own CPU
        times[f"{who} envoy fallback"] = [ms] * 3
        cpu[f"{who} envoy fallback"] = ms
    now, then = figures(times, cpu, 1), figures(times, cpu, 1, "abc1234")
    assert now["envoy: fallback key p50 / plain envoy p50"] == 3.0
    assert then["envoy: fallback key p50 / plain envoy p50"] == 5.0
    assert now["envoy: p50 / plain envoy p50"] == 2.5  # the plain key's, as before
    assert compare(then, now) == ["envoy: fallback key p50 / plain envoy p50: 5.000, "
                                  "baseline 3.000 (+67%)"]


def test_the_envoy_host_on_redis_has_figures_of_its_own_when_it_was_measured():
    times, cpu = _run(tollgate_ms=3.0, baseline_ms=3.0)  # on SQLite, the same
    assert not any("Redis" in name for name in figures(times, cpu, 1))
    for who, ms in (("tollgate", 4.8), ("abc1234", 3.6)):
        times[f"{who} envoy redis"] = [ms] * 3
        times[f"{who} envoy redis sse first"] = [ms / 2] * 3
        times[f"{who} envoy redis sse total"] = [ms] * 3
        cpu[f"{who} envoy redis"] = ms
    now, then = figures(times, cpu, 1), figures(times, cpu, 1, "abc1234")
    assert now["envoy: Redis p50 / plain envoy p50"] == 4.0
    assert now["envoy: Redis SSE first byte / plain envoy"] == 2.0
    assert then["envoy: Redis p50 / plain envoy p50"] == 3.0
    assert now["envoy: p50 / plain envoy p50"] == 2.5  # the SQLite state's, as before
    assert compare(now, then) == [
        "envoy: Redis p50 / plain envoy p50: 4.000, baseline 3.000 (+33%)",
        "envoy: Redis SSE first byte / plain envoy: 2.000, baseline 1.500 (+33%)"]


def test_the_paced_stream_table_gives_what_each_path_adds_per_event():
    """bench.paced: medians of each path's time to its first byte and from it to the
    finishing event, against the direct call's; the second per event after the first."""
    from bench.paced import table

    times = {"direct": [(1.0, 100.0), (1.2, 101.0), (0.8, 99.0)],
             "plain envoy": [(1.4, 100.5), (1.3, 101.5), (1.5, 100.0)],
             "tollgate envoy": [(2.0, 102.0), (2.2, 103.0), (1.8, 101.0)]}
    rows = table(times, events=21)
    assert rows[0].split() == ["path", "first", "+first", "body", "+body", "+per", "event"]
    cells = {row[:20].strip(): row[20:].split() for row in rows[2:]}
    assert cells == {
        "direct": ["1.000", "+0.000", "100.000", "+0.000", "+0.0000"],
        "plain envoy": ["1.400", "+0.400", "100.500", "+0.500", "+0.0250"],
        "tollgate envoy": ["2.000", "+1.000", "102.000", "+2.000", "+0.1000"]}


def test_the_body_size_rows_give_what_each_path_adds_and_tollgate_beyond_its_proxy():
    """bench.bodies: per path, the median added to the direct call for a JSON answer and a
    stream; for a tollgate host, what it adds beyond the plain proxy it runs in."""
    from bench.bodies import body, rows

    times = {"direct json": [1.0, 2.0, 3.0], "direct stream": [2.0, 2.0, 2.0],
             "plain envoy json": [2.5, 2.5, 2.5], "plain envoy stream": [2.1, 2.2, 2.3],
             "tollgate envoy json": [4.0, 5.0, 6.0], "tollgate envoy stream": [6.0, 7.0, 8.0]}
    got = rows(2048, times, ["plain envoy", "tollgate envoy"])
    assert [row.split() for row in got] == [
        ["2.0", "KiB", "plain", "envoy", "+0.500", "+0.200"],
        ["2.0", "KiB", "tollgate", "envoy", "+3.000", "+5.000", "+2.500", "+4.800"]]
    small, agent = json.loads(body(2, True)), json.loads(body(2000, False))
    assert small["stream"] is True and "stream_options" not in small  # the SDK's default
    assert len(agent["messages"]) == 2000 and "stream" not in agent
    assert len(body(2000, False)) > 1000 * 1024


def test_the_body_size_figures_are_each_hosts_p50_over_the_direct_calls_for_big_bodies():
    """bench.bodies compares, for bodies of 64 KiB and more, each host's p50 over the direct
    call's with the other revision's of the same run; a small body has none (it is
    bench.quick's)."""
    from bench.bodies import figures

    times = {"direct json": [2.0], "direct stream": [4.0],
             "tollgate envoy json": [3.0], "tollgate envoy stream": [6.0],
             "abc1234 envoy json": [2.5], "abc1234 envoy stream": [6.0]}
    assert figures(1024, times, "tollgate") == {}
    now, then = figures(100 * 1024, times, "tollgate"), figures(100 * 1024, times, "abc1234")
    assert now == {"envoy 100 KiB json: p50 / direct p50": 1.5,
                   "envoy 100 KiB stream: p50 / direct p50": 1.5}
    assert compare(now, then) == ["envoy 100 KiB json: p50 / direct p50: 1.500, baseline "
                                  "1.250 (+20%)"]


def test_a_revision_measured_beside_this_checkout_reads_the_tables_it_shipped_with(tmp_path):
    """A later price table can hold fields an earlier revision's code refuses (its models
    forbid unknown fields): the revision's gateway reads its own tables, this checkout's
    its own, from configs otherwise the same."""
    config = make_config(tmp_path / "now", _Url("http://127.0.0.1:1"),
                         _Url("http://127.0.0.1:2"))
    code = tmp_path / "code"
    (code / "config").mkdir(parents=True)
    for name in ("prices", "models"):
        shutil.copyfile(ROOT / "config" / f"{name}.yaml", code / "config" / f"{name}.yaml")
    table = code / "config" / "prices.yaml"
    table.write_text(table.read_text().replace("gpt-5:\n    {input: 1.25,",
                                               "gpt-5:\n    {input: 9.75,"))
    theirs = config.with_name("gateway-then.yaml")
    shutil.copyfile(config, theirs)
    with_tables_of(theirs, code)
    then, now = load_config(theirs), load_config(config)
    assert then.prices.path == table and now.prices.path == config.with_name("prices.yaml")
    assert (then.prices.lookup("gpt-5").input, now.prices.lookup("gpt-5").input) == (9.75, 1.25)
    assert f'models: "{code}/config/models.yaml"' in theirs.read_text()
    assert then.config.model_providers == now.config.model_providers


def test_the_slowest_requests_are_told_in_step_with_the_batches_or_not():
    """bench.tail: 1 when every slow request came at the same moment of the access log's
    period, whichever periods; 0 when they are spread evenly over it."""
    from bench.tail import in_step

    assert abs(in_step([k * 0.1 + 0.083 for k in range(30)], period=0.1) - 1) < 1e-9
    assert in_step([k * 0.01 for k in range(30)], period=0.1) < 1e-9
    assert in_step([0.02, 0.07, 1.02, 1.07], period=0.1) < 1e-9  # half a period apart
    assert 0.9 < in_step([0.081, 0.089, 2.085, 3.083], period=0.1) < 1
    assert in_step([]) == 0


def test_the_benchmarks_say_whether_the_gateways_python_is_an_optimized_build(monkeypatch):
    import sysconfig

    import bench.latency
    from bench.latency import interpreter

    flags = {"CONFIG_ARGS": "'--enable-shared' '--enable-optimizations' '--with-lto'",
             "Py_ENABLE_SHARED": 1}
    monkeypatch.setattr(sysconfig, "get_config_var", flags.get)
    maps = "7f00-7f01 r-xp 0 08:01 1 /opt/py/lib/libpython3.13.so.1.0\n"
    monkeypatch.setattr(bench.latency, "_maps", lambda: maps)
    with_ = "configured with --enable-optimizations --with-lto"
    assert interpreter().endswith(f"{with_}, libpython shared")
    # Debian's python3: its sysconfig is its shared build's, its executable has it linked in.
    maps = "5600-5601 r-xp 0 08:01 1 /usr/bin/python3.13\n"
    assert interpreter().endswith(f"{with_}, libpython linked in")
    flags["CONFIG_ARGS"] = "'--prefix=/root/.pyenv/versions/3.13.0' '--enable-shared'"
    assert interpreter().endswith("configured without --enable-optimizations --with-lto, "
                                  "libpython linked in")
    maps = None  # (no /proc: sysconfig says)
    assert interpreter().endswith("libpython shared")
    flags.clear()  # (no configure arguments at all: a Windows build)
    assert interpreter().endswith("configured without --enable-optimizations --with-lto, "
                                  "libpython linked in")


def test_long_answers_compare_with_the_revisions_code_only(tmp_path):
    """The stored figures are of the short answer: a run with --answer-words reads none, and
    may not overwrite them."""
    stored = tmp_path / "baseline.json"
    stored.write_text(json.dumps({"revision": "abc1234", "figures": {"envoy: x": 1.0}}))
    assert stored_baseline(stored)["figures"] == {"envoy: x": 1.0}
    assert stored_baseline(stored, answer_words=500) == {}
    assert stored_baseline(tmp_path / "none.json") == {}
    refused = subprocess.run([sys.executable, "-m", "bench.quick", "--answer-words", "500",
                              "--update-baseline", "--baseline", str(stored)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--update-baseline without --answer-words" in \
        refused.stderr
    assert json.loads(stored.read_text())["figures"] == {"envoy: x": 1.0}


def test_envoys_parts_are_taken_out_of_the_rendered_listener_by_name(tmp_path):
    """bench.instructions' split: the named filters and access logs leave the listener,
    and nothing else does."""
    import yaml

    from bench.instructions import SPLIT, _without
    from extproc.envoy_config import listener

    cfg = load_config(make_config(tmp_path, _Url("http://127.0.0.1:9"),
                                  _Url("http://127.0.0.1:9"))).config
    rendered = yaml.safe_dump({"static_resources": {
        "listeners": [listener(cfg, "127.0.0.1", 8080, str(tmp_path / "outage.log"))]}})

    def names(text: str) -> tuple[list[str], list[str]]:
        manager = yaml.safe_load(text)["static_resources"]["listeners"][0][
            "filter_chains"][0]["filters"][0]["typed_config"]
        return [f["name"] for f in manager["http_filters"]], \
            [a["name"] for a in manager["access_log"]]

    filters, logs = names(rendered)
    for taken in SPLIT.values():
        assert set(taken) <= {*filters, *logs}  # each names what the renderer makes
        left_filters, left_logs = names(_without(rendered, taken))
        assert left_filters == [f for f in filters if f not in taken]
        assert left_logs == [a for a in logs if a not in taken]
    assert "tollgate.decide" in names(_without(rendered, SPLIT["tollgate envoy, no meter"]))[0]
