"""Latency / throughput statistics of one load run (pure functions, no I/O: unit-tested)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) with linear interpolation between order statistics (numpy's default).

    Raises:
        ValueError: no values, or `q` outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencySummary:
    """Latency percentiles in milliseconds over `count` successful requests."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencySummary:
        ms = [s * 1000.0 for s in seconds]
        return cls(
            count=len(ms),
            mean_ms=sum(ms) / len(ms),
            p50_ms=percentile(ms, 50),
            p90_ms=percentile(ms, 90),
            p99_ms=percentile(ms, 99),
            min_ms=min(ms),
            max_ms=max(ms),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class LoadResult:
    """One closed-loop run: `concurrency` clients sending back-to-back until `completed + errors` requests."""

    label: str
    concurrency: int
    completed: int
    errors: int
    wall_s: float
    latency: LatencySummary | None
    error_samples: tuple[str, ...] = ()

    @property
    def throughput(self) -> float:
        """Successful scans per second over the run's wall time (0 when nothing succeeded)."""
        return self.completed / self.wall_s if self.wall_s > 0 and self.completed else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "completed": self.completed,
            "errors": self.errors,
            "wall_s": round(self.wall_s, 3),
            "scans_per_s": round(self.throughput, 4),
            "latency": self.latency.to_dict() if self.latency else None,
            "error_samples": list(self.error_samples),
        }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """`numerator / denominator`, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0 or math.isnan(denominator):
        return None
    return numerator / denominator


def bootstrap_p50_ratio_interval(
    numerator: Sequence[float],
    denominator_parts: Sequence[Sequence[float]],
    *,
    confidence: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``p50(numerator) / sum(p50(part) for part in denominator_parts)``.

    The samples are paired by index (round i of every path ran back to back), so rounds are resampled
    as a whole: a burst of load on the shared machine moves both sides of the ratio together.

    Raises:
        ValueError: empty or unequal-length samples, or `confidence` outside (0, 1).
    """
    columns = [numerator, *denominator_parts]
    n = len(numerator)
    if n == 0 or any(len(column) != n for column in columns):
        raise ValueError("bootstrap needs non-empty samples of equal length (paired by round)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    data = np.asarray(columns, dtype=np.float64)  # [paths, rounds]
    rounds = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    medians = np.median(data[:, rounds], axis=2)  # [paths, resamples]
    ratios = medians[0] / medians[1:].sum(axis=0)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return float(low), float(high)
