"""Latency / throughput statistics of one load run (pure functions, no I/O: unit-tested)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


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
