"""How `headct batch` retries one scan: which statuses are worth another try and how long to wait.

429 and 503 are retried after the gateway's ``Retry-After`` (with backoff and jitter, capped), 502 / 504
and connection errors after a backoff (`RetryPolicy`), so that a cohort job backs off while clinical
scans fill the gateway.
"""

from __future__ import annotations

import dataclasses
import email.utils
from datetime import UTC, datetime
from typing import Final

# Retried: busy, going away / not ready, and the gateway's or Triton's timeouts.
RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delay-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How patient to be with one scan. The wait before retry n (from 0) is the gateway's
    ``Retry-After`` or ``backoff_s * 2**n``, whichever is longer (a bulk job should back off while
    clinical scans fill the gateway, and never come back before it was told), capped at `max_wait_s`,
    plus up to 25 % jitter so that workers told the same ``Retry-After`` do not return in lockstep."""

    max_retries: int = 10
    max_wait_s: float = 60.0
    backoff_s: float = 1.0

    def delay(self, attempt: int, retry_after: str | None, jitter: float) -> float:
        told = parse_retry_after(retry_after) or 0.0
        base = min(self.max_wait_s, max(told, self.backoff_s * 2**attempt))
        return base * (1.0 + 0.25 * jitter)
