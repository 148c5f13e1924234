"""The worker pool of a `headct batch` run (`execute`): scans scored on threads, rows recorded on the
calling thread (the journal has one writer), a bounded queue so that a 100 000-scan archive costs no
memory, and after Ctrl-C the scans in flight kept (their answers are paid for).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from headct.client.batch.discovery import Scan
from headct.client.batch.rows import Row


def _drain(
    pending: set[Future[Row | None]], record: Callable[[Row], None], abandon: Callable[[], None]
) -> None:
    """After Ctrl-C: keep the scans in flight (their answers are paid for); a second Ctrl-C abandons them."""
    try:
        for future in pending:
            if not future.cancel():
                with contextlib.suppress(Exception):
                    if (row := future.result()) is not None:
                        record(row)
    except KeyboardInterrupt:
        abandon()


def _record_done(
    done: list[Future[Row | None]], pending: set[Future[Row | None]], record: Callable[[Row], None]
) -> None:
    """Record the finished scans' rows. When one of them raised (Ctrl-C inside a scan), the others are
    put back into `pending` first, so that `_drain` still records them."""
    for index, future in enumerate(done):
        try:
            row = future.result()
        except BaseException:
            pending.update(done[index + 1 :])
            raise
        if row is not None:
            record(row)


def execute(
    scans: Iterable[Scan],
    score: Callable[[Scan], Row | None],
    record: Callable[[Row], None],
    *,
    workers: int,
    stop: threading.Event,
    abandon: Callable[[], None],
) -> None:
    """`score` every scan on `workers` threads, `record` each row on this thread (the journal has one
    writer). At most 2 x `workers` scans are queued, so a 100 000-scan archive costs no memory."""
    todo: Iterator[Scan] = iter(scans)
    pending: set[Future[Row | None]] = set()
    with ThreadPoolExecutor(workers, thread_name_prefix="headct-batch") as pool:
        try:
            while True:
                while len(pending) < 2 * workers and (scan := next(todo, None)) is not None:
                    pending.add(pool.submit(score, scan))
                if not pending:
                    return
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _record_done(list(done), pending, record)
        except BaseException:
            stop.set()
            _drain(pending, record, abandon)
            raise
