"""The seam between the gateway and whatever runs the model: `InferenceBackend`.

`api.inference.triton.TritonModel` is the production implementation (Triton over gRPC); unit tests use
fakes. The prediction service (`api.inference.service.PredictionService`) and the HTTP/gRPC transports
depend only on this protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from api.inference.batching import BatchAnswer
from api.inference.lanes import DEFAULT_LANE, Lane
from api.problems import ProblemError
from headct.model_card import ModelCard


class InferenceBackend(Protocol):
    """A served FM-HCT model: readiness, its model card, and batched inference."""

    model_name: str

    async def is_ready(self) -> bool:
        """Whether the model can answer now (false while loading, after a crash, ...)."""
        ...

    async def card(self) -> ModelCard:
        """The card of the model being served (tasks, thresholds, groups); raises ProblemError (503)
        when it cannot be read or is refused."""
        ...

    async def infer_batch(
        self,
        batch: np.ndarray,
        timeout_s: float | None = None,
        outputs: Sequence[str] = (),
        *,
        lane: Lane = DEFAULT_LANE,
    ) -> BatchAnswer | Mapping[str, np.ndarray]:
        """Preprocessed scans [N, 3, 96, 96, 96] float16 -> the named outputs, each [N, width]; `lane` is
        the best priority lane in the batch (the backend queues it accordingly, where it can)."""
        ...

    def unavailable(self, detail: str) -> ProblemError:
        """The 503 this backend answers while it cannot serve (with its Retry-After)."""
        ...

    def invalidate_card(self, reason: str) -> None:
        """Forget the cached card: the next `card()` reads it again."""
        ...
