import random
from collections import Counter

from tollgate.config.schema import RoutingTarget
from tollgate.routing import weighted_order


def test_weighted_order_spreads_first_picks_by_weight_and_keeps_fallbacks():
    targets = [RoutingTarget(model_provider="a", weight=3),
               RoutingTarget(model_provider="b", weight=1),
               RoutingTarget(model_provider="c", weight=0)]
    rng = random.Random(7)
    firsts = Counter()
    for _ in range(4000):
        order = [t.model_provider for t in weighted_order(targets, rng)]
        assert sorted(order) == ["a", "b", "c"] and order[-1] == "c"
        firsts[order[0]] += 1
    assert firsts["c"] == 0
    assert 0.70 < firsts["a"] / 4000 < 0.80  # 3:1
