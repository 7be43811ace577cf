from tollgate.breaker import Breakers


def test_opens_after_repeated_failures_and_closes_after_cooldown():
    now = [100.0]
    b = Breakers(failures=3, cooldown=30, clock=lambda: now[0])
    assert b.order(["a", "b"]) == [0, 1]
    b.failure("a")
    b.failure("a")
    b.success("a")  # a success resets the count
    b.failure("a")
    b.failure("a")
    assert not b.is_open("a")
    b.failure("a")
    assert b.is_open("a") and b.order(["a", "b"]) == [1, 0]
    now[0] += 29
    assert b.is_open("a")
    now[0] += 2
    assert not b.is_open("a") and b.order(["a", "b"]) == [0, 1]


def test_every_provider_open_still_leaves_an_order():
    b = Breakers(failures=1, cooldown=30, clock=lambda: 0.0)
    b.failure("a")
    b.failure("b")
    assert b.order(["a", "b"]) == [0, 1]
