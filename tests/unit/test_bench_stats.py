"""Benchmark statistics: percentiles, summaries, throughput and ratios (benchmarks/stats.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from benchmarks.cpu import busy_fraction, machine_cpu_ticks
from benchmarks.load import closed_loop
from benchmarks.stats import (
    LatencySummary,
    LoadResult,
    bootstrap_p50_ratio_interval,
    percentile,
    ratio,
)


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = list(np.random.default_rng(1).exponential(size=37))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_is_in_milliseconds() -> None:
    summary = LatencySummary.of([0.1, 0.2, 0.3, 0.4])
    assert summary.count == 4
    assert summary.p50_ms == pytest.approx(250.0)
    assert summary.min_ms == pytest.approx(100.0)
    assert summary.max_ms == pytest.approx(400.0)
    assert summary.mean_ms == pytest.approx(250.0)


def test_throughput_counts_only_successes() -> None:
    result = LoadResult("x", 4, completed=10, errors=3, wall_s=5.0, latency=None)
    assert result.throughput == pytest.approx(2.0)
    assert LoadResult("x", 4, completed=0, errors=3, wall_s=5.0, latency=None).throughput == 0.0


def test_ratio_refuses_missing_or_zero_denominator() -> None:
    assert ratio(3.0, 2.0) == pytest.approx(1.5)
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(1.0, None) is None


def test_closed_loop_spends_exactly_the_budget_and_counts_errors() -> None:
    calls = 0

    async def send() -> dict[str, float]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.001)
        if calls % 5 == 0:
            raise RuntimeError("boom")
        return {"decode": 1.0}

    result, extras = asyncio.run(closed_loop("t", send, concurrency=3, requests=20, warmup=2))
    assert calls == 22  # warm-up requests are sent but not counted
    assert result.completed + result.errors == 20
    assert result.errors == 4
    assert len(extras) == result.completed
    assert result.error_samples == ("RuntimeError: boom",)


def test_bootstrap_interval_brackets_the_ratio_and_narrows_with_more_rounds() -> None:
    rng = np.random.default_rng(3)

    def sample(rounds: int) -> tuple[list[float], list[float], list[float]]:
        load = rng.normal(1.0, 0.15, rounds)  # shared-machine noise: hits every path of a round alike
        gateway = list(0.40 * load + rng.normal(0, 0.02, rounds))
        prepare = list(0.30 * load + rng.normal(0, 0.02, rounds))
        infer = list(0.06 * load + rng.normal(0, 0.005, rounds))
        return gateway, prepare, infer

    few = sample(8)
    many = sample(200)
    low, high = bootstrap_p50_ratio_interval(many[0], [many[1], many[2]])
    point = float(np.median(many[0]) / (np.median(many[1]) + np.median(many[2])))
    assert low <= point <= high
    assert low < 0.40 / 0.36 < high  # the true ratio
    few_low, few_high = bootstrap_p50_ratio_interval(few[0], [few[1], few[2]])
    assert high - low < few_high - few_low


def test_bootstrap_interval_rejects_unpaired_or_empty_samples() -> None:
    with pytest.raises(ValueError):
        bootstrap_p50_ratio_interval([1.0, 2.0], [[1.0]])
    with pytest.raises(ValueError):
        bootstrap_p50_ratio_interval([], [[]])
    with pytest.raises(ValueError):
        bootstrap_p50_ratio_interval([1.0], [[1.0]], confidence=1.0)


def test_machine_busy_fraction_from_proc_stat() -> None:
    idle, total = machine_cpu_ticks()
    assert 0 <= idle <= total
    assert busy_fraction((100, 400), (150, 600)) == pytest.approx(0.75)  # 50 idle of 200 ticks
    assert busy_fraction((100, 400), (100, 400)) is None  # no time passed: unknown, not 0 or 1
