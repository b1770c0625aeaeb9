"""A short soak (bench/soak.py) in every test run: 20 seconds of mixed traffic with random faults,
then no leak, every answer exact or explicitly failed, and metrics equal to what the clients saw.
`make soak` runs the same for minutes."""

from __future__ import annotations

import asyncio
import os
import random

from bench.soak import soak

SECONDS = float(os.environ.get("BFF_SOAK_SECONDS", "20"))


def test_a_short_soak_leaks_nothing_and_every_answer_is_exact_or_an_explicit_error() -> None:
    seed = random.SystemRandom().randrange(2**32)

    report = asyncio.run(soak(SECONDS, users=6, seed=seed))

    print(report.summary())
    assert not report.problems, f"seed {seed}:\n{report.summary()}"
    outcomes = report.tally.outcomes
    # The run did what it is for: streams completed, were cut, abandoned early and late.
    for outcome in ("text:complete", "ui:complete", "data:complete", "run:ok"):
        assert outcomes[outcome] > 0, outcome
    assert sum(count for name, count in outcomes.items() if name.endswith(":cut")) > 0
    assert sum(count for name, count in outcomes.items() if name.endswith(":gave_up")) > 0
    assert sum(count for name, count in outcomes.items() if name.endswith(":left")) > 0
