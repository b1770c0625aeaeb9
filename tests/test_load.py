"""The bounded multi-replica load test (bench/replicas_load.py), run small so `make test` covers it.

`python -m bench.replicas_load --users 200` runs the same thing bigger.
"""

from __future__ import annotations

from bench.replicas_load import LoadConfig, run
from tests.conftest import require_tool

SMALL = LoadConfig(users=20, rounds=3, cap=2, relays_per_minute=3, abandon_every=4, time_limit=90.0)


def test_many_users_streaming_through_two_replicas_get_exact_answers_or_429s_and_leak_no_slot() -> None:
    require_tool("redis-server")

    report = run(SMALL)

    assert report.problems == [], report.summary()
    admitted = report.admitted
    # Limits were really hit, by both kinds of refusal (judged in detail by the load test itself) ...
    assert set(report.refusals()) == {"rate_limited", "too_many_streams"}
    # ... and every answer is accounted for: admitted and read to the end byte-exact, admitted and
    # abandoned by the browser, or refused with a 429 and a Retry-After.
    assert len(report.outcomes) == SMALL.users * SMALL.rounds * (SMALL.cap + 1)
    assert all(o.exact or o.abandoned for o in admitted)
    assert any(o.abandoned for o in admitted) and any(o.exact for o in admitted)
    assert len(admitted) + sum(report.refusals().values()) == len(report.outcomes)
    assert report.leaked_slots == {} and report.open_streams == [0.0, 0.0]
