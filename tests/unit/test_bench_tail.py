"""bench.tail reads the sidecar's p50 goal as its ratio: tollgate's added p50 over plain
Envoy's, each over the direct call of the same round."""

import pytest

from bench.tail import GOAL_RATIO, over_plain


def test_a_round_at_the_goal_reads_its_ratio_and_each_added_p50_is_over_the_direct_call():
    at_goal = {"direct p50": 1.2, "plain envoy p50": 1.5, "tollgate envoy p50": 2.2}
    assert over_plain(at_goal) == pytest.approx(GOAL_RATIO) == pytest.approx(1.0 / 0.3)
    slower_machine = {k: v + 0.4 for k, v in at_goal.items()}  # every path alike
    assert over_plain(slower_machine) == pytest.approx(GOAL_RATIO)
    assert over_plain({**at_goal, "tollgate envoy p50": 2.5}) == pytest.approx(1.3 / 0.3)
