"""The `headct batch` run: which scans to score, one request per scan, a pool of workers, the exit code.

Each scan gets one request (`score_scan`), sent with ``priority=bulk`` by default so that a cohort job
queues behind clinical scans, and retried per its `RetryPolicy`. A problem about the request rather than
the scan (a wrong API key, a lane the key may not use, an unknown task) stops the run (`RunAborted`):
every other scan would get it too. `run_batch` discovers the scans, takes the journal (the run's lock),
folds a killed run's journal into the output, skips the scans already done (`is_done`), scores the rest
on `BatchOptions.concurrency` threads (`workers.execute`), and folds the journal again at the end.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TextIO

import httpx

from headct.client.batch.discovery import InputError, Scan, discover
from headct.client.batch.journal import Journal, fold, journal_path
from headct.client.batch.progress import RunStats, progress_display, summarize
from headct.client.batch.retry import RETRY_STATUSES, RetryPolicy
from headct.client.batch.rows import DONE, Row, failure_row, ok_row, problem_row
from headct.client.batch.table import output_format
from headct.client.batch.workers import execute
from headct.client.http import HeadCTClient, HeadCTProblem

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_INTERRUPTED: Final = 130

# About the request, not the scan: every scan would get them, so the run stops.
_RUN_STATUSES: Final = frozenset({401, 403, 404, 405})
_RUN_CODES: Final = frozenset({"unknown_task", "invalid_include", "invalid_request", "invalid_priority"})


class RunAborted(Exception):
    """A problem about the request rather than the scan (see the module docstring)."""

    def __init__(self, problem: HeadCTProblem) -> None:
        self.problem = problem
        super().__init__(str(problem))


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    tasks: tuple[str, ...] = ()
    embeddings: bool = False
    priority: str | None = "bulk"
    concurrency: int = 4
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    progress: bool = True


def score_scan(
    client: HeadCTClient, scan: Scan, options: BatchOptions, pause: Callable[[float], bool]
) -> Row | None:
    """One scan's row, retried per `options.retry`. `pause(seconds)` waits before a retry and returns
    True when the run is stopping: then None (nothing recorded; the next run scores the scan)."""
    attempt = 0
    while True:
        try:
            result = client.predict(
                scan.path,
                list(options.tasks) or None,
                options.embeddings,
                priority=options.priority,
                recursive=scan.whole_tree,
            )
            return ok_row(scan.scan_id, result, attempt + 1)
        except HeadCTProblem as problem:
            if problem.status in _RUN_STATUSES or problem.code in _RUN_CODES:
                raise RunAborted(problem) from problem
            final, retry_after = problem_row(scan.scan_id, problem, attempt + 1), problem.retry_after
            if problem.status not in RETRY_STATUSES:
                return final
        except httpx.TransportError as error:
            final, retry_after = failure_row(scan.scan_id, "transport_error", error, attempt + 1), None
        except (OSError, ValueError) as error:  # a vanished or unreadable file, an empty folder
            return failure_row(scan.scan_id, "local_file_error", error, attempt + 1)
        if attempt >= options.retry.max_retries:
            return final
        if pause(options.retry.delay(attempt, retry_after, random.random())):
            return None
        attempt += 1


def is_done(row: Row | None, options: BatchOptions) -> bool:
    """Skipped by a rerun: scored (with its embedding when one is asked for) or refused."""
    if row is None or row["status"] not in DONE:
        return False
    return not (options.embeddings and row["status"] == "ok" and row.get("embedding") is None)


def _score_all(
    client: HeadCTClient,
    todo: list[Scan],
    options: BatchOptions,
    journal: Journal,
    stats: RunStats,
    err: TextIO,
) -> None:
    """Score `todo`, journaling each row as it comes, under a progress bar with rate and ETA on `err`."""
    stop = threading.Event()
    started = time.perf_counter()
    with progress_display(err, options.progress and bool(todo)) as display:
        task = display.add_task("scoring", total=len(todo), tally="")

        def record(row: Row) -> None:
            journal.append(row)
            stats.scored += 1
            stats.tally[row["status"]] += 1
            display.update(
                task, advance=1, tally=", ".join(f"{k} {n}" for k, n in sorted(stats.tally.items()))
            )

        try:
            execute(
                todo,
                lambda scan: score_scan(client, scan, options, stop.wait),
                record,
                workers=options.concurrency,
                stop=stop,
                abandon=client.close,
            )
        finally:
            stats.seconds = time.perf_counter() - started


def _embedding_dim(client: HeadCTClient) -> int | None:
    """`GET /v1/models` before the first scan: a wrong key or a gateway that is down fails at once, not
    once per scan, and the served model's `embedding_dim` sizes the embedding column."""
    models = client.models().get("models") or [{}]
    dim = models[0].get("embedding_dim")
    return int(dim) if dim else None


def _run(
    scans: list[Scan],
    output: Path,
    fmt: str,
    journal: Journal,
    options: BatchOptions,
    client_factory: Callable[[], HeadCTClient],
    err: TextIO,
) -> int:
    rows = fold(output, fmt, journal)  # a killed run's journal first
    todo = [scan for scan in scans if not is_done(rows.get(scan.scan_id), options)]
    stats, code = RunStats(skipped=len(scans) - len(todo)), EXIT_OK
    print(
        f"headct batch: {len(scans)} scans, {stats.skipped} already done; scoring {len(todo)} with "
        f"{options.concurrency} workers, priority {options.priority or 'default'}",
        file=err,
    )
    with client_factory() as client:
        try:
            embedding_dim = _embedding_dim(client)
        except HeadCTProblem as problem:
            print(f"headct batch: {problem.status} {problem.code}: {problem.detail}", file=err)
            return EXIT_FAILED
        except httpx.TransportError as error:
            print(f"headct batch: cannot reach the gateway: {type(error).__name__}: {error}", file=err)
            return EXIT_UNREACHABLE
        try:
            _score_all(client, todo, options, journal, stats, err)
        except RunAborted as aborted:
            cause = aborted.problem
            print(f"headct batch: stopped: {cause.status} {cause.code}: {cause.detail}", file=err)
            code = EXIT_FAILED
        except KeyboardInterrupt:
            print("headct batch: interrupted; run the same command again to go on", file=err)
            code = EXIT_INTERRUPTED
    rows = fold(output, fmt, journal, embedding_dim if options.embeddings else None)
    print(summarize(rows.values(), output, stats), file=err)
    wanted = {scan.scan_id for scan in scans}
    if code == EXIT_OK and any(rows[s]["status"] == "failed" for s in wanted if s in rows):
        code = EXIT_FAILED
    return code


def run_batch(
    source: Path,
    output: Path,
    options: BatchOptions,
    client_factory: Callable[[], HeadCTClient],
    *,
    fmt: str | None = None,
    err: TextIO | None = None,
) -> int:
    """The whole `headct batch` command; returns its exit code: 0 every scan scored or refused, 1 some
    failed (or a problem stopped the run), 2 usage, 3 the gateway unreachable, 130 interrupted."""
    err = err or sys.stderr
    try:
        scans = discover(source)
        journal = Journal(journal_path(output))
    except (InputError, OSError) as error:
        print(f"headct batch: {error}", file=err)
        return EXIT_USAGE
    try:
        return _run(scans, output, fmt or output_format(output), journal, options, client_factory, err)
    finally:
        journal.close(remove=journal.empty)
