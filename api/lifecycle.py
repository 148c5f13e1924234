"""Graceful shutdown on SIGTERM, whatever starts the gateway (`python -m api`, `uvicorn api.main:app`,
`python -m headct.local.serve`, one or several uvicorn workers).

Uvicorn alone, on SIGTERM, closes its listening socket at once and waits for open connections. For
Kubernetes that is too early: the pod is still an endpoint for a few seconds, and readiness never had a
chance to turn false. So the app installs its own SIGTERM handler at startup (in the main thread, on
top of uvicorn's, which it keeps) and on the first SIGTERM:

1. starts draining: new predictions (REST and gRPC) get 503 ``shutting_down`` with Retry-After,
   ``/readyz`` answers 503 and the gRPC health service NOT_SERVING; the listener stays open;
2. waits until every admitted request has finished (or `shutdown_grace_s` is spent), and at least
   `shutdown_delay_s`;
3. hands the signal to uvicorn's handler, with uvicorn's own connection wait cut to what is left of the
   grace period, so the process exits within `shutdown_grace_s` (plus process teardown).

A second SIGTERM, or SIGINT (Ctrl-C), goes straight to uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

from api.inference.admission import Admission

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(
        self,
        admission: Admission,
        *,
        grace_s: float,
        delay_s: float = 0.0,
        on_drain: list[Callable[[], Awaitable[None]]] | None = None,
    ) -> None:
        self.admission = admission
        self.grace_s = grace_s
        self.delay_s = min(delay_s, grace_s)
        self.on_drain = on_drain or []
        self._previous: Any = None
        self._installed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._deadline: float | None = None

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def remaining_s(self) -> float:
        """What is left of the grace period (all of it while not draining)."""
        if self._deadline is None or self._loop is None:
            return self.grace_s
        return max(0.0, self._deadline - self._loop.time())

    def install(self) -> bool:
        """Take over SIGTERM (main thread only; elsewhere, e.g. under a test client, do nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._loop = asyncio.get_running_loop()
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True
        return True

    def uninstall(self) -> None:
        if self._installed and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None or self._loop.is_closed():
            self._forward(signum, frame)  # second SIGTERM: no more patience
            return
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain_then_exit())

    async def drain(self) -> bool:
        """Stop admitting and wait for in-flight requests; True when they all finished in time."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        started = loop.time()
        if self._deadline is None:
            self._deadline = started + self.grace_s
        self.admission.draining = True
        log.info(
            "draining: %d request(s) in progress, up to %.1f s", self.admission.active, self.remaining_s()
        )
        for callback in self.on_drain:
            try:
                await callback()
            except Exception:  # a failing hook must not stop the drain
                log.exception("drain hook failed")
        idle = await self.admission.wait_idle(self.remaining_s())
        if not idle:
            log.warning("grace period over with %d request(s) still running", self.admission.active)
        linger = started + self.delay_s - loop.time()
        if linger > 0:
            await asyncio.sleep(min(linger, self.remaining_s()))
        return idle

    async def drain_then_exit(self) -> None:
        await self.drain()
        self._forward(signal.SIGTERM, None)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous
        server = getattr(previous, "__self__", None)
        config = getattr(server, "config", None)
        if config is not None and hasattr(config, "timeout_graceful_shutdown"):
            # uvicorn: what is left of the grace period for its own wait on connections
            config.timeout_graceful_shutdown = max(0.5, self.remaining_s())
        self.uninstall()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
