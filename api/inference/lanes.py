"""Priority lanes: ``stat`` (an emergency read: answer now), ``routine`` (the default) and ``bulk``
(archives and cohorts: throughput, never at the expense of the others).

A prediction's lane goes with it from the edge to Triton's queue:

- the caller names it (REST ``?priority=`` or the ``X-HeadCT-Priority`` header, gRPC
  ``PredictOptions.priority``); an API key may be limited to some lanes (``lanes=`` in the keys file,
  api/auth.py), and a key that may not send routine gets its best allowed lane by default;
- admission (api/inference/admission.py) keeps a queue budget per lane, hands a freed slot to the best
  lane waiting and lets bulk hold only part of the slots, so STAT never waits behind bulk's queue;
- the preprocessing pool (api/inference/workers.py) starts waiting jobs in lane order;
- the micro-batcher (api/inference/batching.py) closes a batch at once for a STAT scan, and a batch
  goes to Triton with the best lane of its members;
- Triton queues the request by its ``priority`` (1 = stat, 2 = routine, 3 = bulk): the repository
  writer gives the model's dynamic batcher `headct.contract.PRIORITY_LEVELS` levels.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from typing import Final

from api.problems import ProblemCode, ProblemError
from headct import contract

PRIORITY_HEADER: Final = "X-HeadCT-Priority"


class Lane(enum.StrEnum):
    """A priority lane, in priority order (the first is served first)."""

    STAT = "stat"
    ROUTINE = "routine"
    BULK = "bulk"

    @property
    def rank(self) -> int:
        """0 for the most urgent lane; smaller is served first."""
        return _RANKS[self]

    @property
    def triton_priority(self) -> int:
        """The Triton request priority (1 is the highest of `contract.PRIORITY_LEVELS`)."""
        return self.rank + 1


_RANKS: Final = {lane: rank for rank, lane in enumerate(Lane)}
ALL_LANES: Final = frozenset(Lane)
DEFAULT_LANE: Final = Lane.ROUTINE
assert len(Lane) == contract.PRIORITY_LEVELS
assert DEFAULT_LANE.triton_priority == contract.DEFAULT_PRIORITY_LEVEL


def parse_lanes(text: str) -> frozenset[Lane]:
    """``"routine,bulk"`` -> {ROUTINE, BULK}; raises ValueError naming an unknown lane."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in Lane.__members__.values()]
    if unknown or not names:
        raise ValueError(f"lanes must be a comma-separated subset of {[lane.value for lane in Lane]}")
    return frozenset(Lane(name) for name in names)


def resolve_lane(requested: str | None, allowed: Collection[Lane] = ALL_LANES) -> Lane:
    """The lane of one prediction: the one `requested` (case-insensitive), or by default routine — or
    the best lane the caller's key `allowed` when routine is not one. Raises 400 ``invalid_priority``
    for an unknown name and 403 ``priority_not_allowed`` for a lane the key may not use."""
    if requested is None or not requested.strip():
        if DEFAULT_LANE in allowed or not allowed:
            return DEFAULT_LANE
        return min(allowed, key=lambda lane: lane.rank)
    name = requested.strip().lower()
    if name not in Lane.__members__.values():
        raise ProblemError(
            ProblemCode.INVALID_PRIORITY,
            "priority must be one of stat, routine, bulk",
            field="priority",
            expected="stat | routine | bulk",
        )
    lane = Lane(name)
    if allowed and lane not in allowed:
        raise ProblemError(
            ProblemCode.PRIORITY_NOT_ALLOWED,
            f"this API key may not send {lane.value} predictions",
            field="priority",
            expected=" | ".join(sorted(item.value for item in allowed)),
        )
    return lane
