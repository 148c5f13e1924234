"""`headct batch`: score a whole archive, one row per scan, in a Parquet (or CSV) table.

    headct batch /archive --out results.parquet [--embeddings] [--concurrency 4] [--priority bulk]
    headct batch manifest.csv --out results.csv

The input is a folder tree or a CSV manifest (`discover`). In a tree, every NIfTI (.nii, .nii.gz) or
NRRD file is one scan, and so is every folder that directly holds DICOM files (a ``.dcm`` name or
``DICM`` at byte 128): its own files are uploaded, not its subfolders', which are scans of their own.
A manifest has a ``path`` column (relative to the manifest's folder, or absolute) and optionally a
``scan_id`` column. A scan's id is its path relative to the input (never anything read from the file).

Each scan gets one request (`score_scan`), sent with ``priority=bulk`` by default so that a cohort job
queues behind clinical scans. 429 and 503 are retried after the gateway's ``Retry-After`` (with backoff
and jitter, capped), 502 / 504 and connection errors after a backoff. Outcomes, in the ``status`` column:
``ok`` (findings, model version and sha256, warnings, optionally the CLS embedding), ``refused`` (a 4xx
problem about the scan itself, e.g. ``not_head``, recorded with its code: final) and ``failed`` (retries
used up, a 5xx, an unreadable local file: tried again by the next run). A problem about the request
rather than the scan (a wrong API key, a lane the key may not use, an unknown task) stops the run: every
other scan would get it too.

Resume: every finished scan is appended at once to a journal next to the output (``OUTPUT.journal``,
one JSON line each, flushed and fsynced), so Ctrl-C, SIGKILL or a power cut lose at most the scans in
flight. The journal is folded into the output (`fold`: the output's rows, then the journal's, the later
row of a scan winning; written to a temporary file, then renamed over the output) at the start and end
of every run, also after Ctrl-C. Scans whose row is ``ok`` or ``refused`` are skipped, so rerunning the
same command finishes the job. The journal is also the run's lock (``flock``): two runs cannot write the
same output.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import email.utils
import fcntl
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

import httpx
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from headct.client.http import HeadCTClient, HeadCTProblem

Row = dict[str, Any]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_INTERRUPTED: Final = 130

VOLUME_SUFFIXES: Final = (".nii", ".nii.gz", ".nrrd")
DONE: Final = frozenset({"ok", "refused"})
JOURNAL_SUFFIX: Final = ".journal"

# Retried: busy, going away / not ready, and the gateway's or Triton's timeouts.
_RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
# About the request, not the scan: every scan would get them, so the run stops.
_RUN_STATUSES: Final = frozenset({401, 403, 404, 405})
_RUN_CODES: Final = frozenset({"unknown_task", "invalid_include", "invalid_request", "invalid_priority"})

# The row of one scan: the names of api/schemas.py's PredictResponse, flattened one level.
FINDING_TYPE: Final = pa.struct(
    [
        ("name", pa.string()),
        ("probability", pa.float64()),
        ("threshold", pa.float64()),
        ("positive", pa.bool_()),
    ]
)
WARNING_TYPE: Final = pa.struct([("code", pa.string()), ("detail", pa.string())])
FIELDS: Final = (
    pa.field("scan_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("problem_code", pa.string()),
    pa.field("problem_status", pa.int16()),
    pa.field("problem_detail", pa.string()),
    pa.field("findings", pa.list_(FINDING_TYPE)),
    pa.field("warnings", pa.list_(WARNING_TYPE)),
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("model_sha256", pa.string()),
    pa.field("input_source_format", pa.string()),
    pa.field("input_shape", pa.list_(pa.int32())),
    pa.field("input_spacing_mm", pa.list_(pa.float64())),
    pa.field("request_id", pa.string()),
    pa.field("priority", pa.string()),  # the lane the gateway ran it in
    pa.field("attempts", pa.int16()),
    pa.field("finished_at", pa.string()),
)
COLUMNS: Final = (*(field.name for field in FIELDS), "embedding")
# Held as JSON text in a CSV output.
_NESTED: Final = frozenset({"findings", "warnings", "input_shape", "input_spacing_mm", "embedding"})
_INTEGERS: Final = frozenset({"problem_status", "attempts"})


class InputError(ValueError):
    """The input or output cannot be used (a usage error: exit 2)."""


class RunAborted(Exception):
    """A problem about the request rather than the scan (see the module docstring)."""

    def __init__(self, problem: HeadCTProblem) -> None:
        self.problem = problem
        super().__init__(str(problem))


# --- what to score ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scan:
    """One scan: its id in the output and what to upload (`whole_tree` False: a folder's own files)."""

    scan_id: str
    path: Path
    whole_tree: bool = True


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` name or the Part 10 preamble's ``DICM`` magic (most archives name files IM0001...)."""
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def discover_tree(root: Path) -> list[Scan]:
    """Every NIfTI / NRRD file and every folder that directly holds DICOM files; hidden names skipped."""
    scans = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        here = Path(folder)
        visible = sorted(name for name in names if not name.startswith("."))
        volumes = [name for name in visible if name.lower().endswith(VOLUME_SUFFIXES)]
        scans += [Scan((here / name).relative_to(root).as_posix(), here / name) for name in volumes]
        if any(is_dicom_file(here / name) for name in visible if name not in volumes):
            scans.append(Scan(here.relative_to(root).as_posix(), here, whole_tree=False))
    return sorted(scans, key=lambda scan: scan.scan_id)


def read_manifest(manifest: Path) -> list[Scan]:
    """A CSV with a ``path`` column (relative to the manifest's folder, or absolute) and an optional
    ``scan_id`` column (default: the path as written)."""
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise InputError(f"{manifest}: no `path` column")
        scans = []
        for line, record in enumerate(reader, start=2):
            written = (record.get("path") or "").strip()
            if not written:
                raise InputError(f"{manifest}, line {line}: empty path")
            path = Path(written) if Path(written).is_absolute() else manifest.parent / written
            scans.append(Scan((record.get("scan_id") or "").strip() or written, path))
    repeated = [scan_id for scan_id, n in Counter(s.scan_id for s in scans).items() if n > 1]
    if repeated:
        raise InputError(f"{manifest}: scan ids listed more than once: {', '.join(repeated[:5])}")
    return scans


def discover(source: Path) -> list[Scan]:
    """The scans of a folder tree or of a ``.csv`` manifest."""
    if source.is_dir():
        scans = discover_tree(source)
    elif source.is_file() and source.name.lower().endswith(".csv"):
        scans = read_manifest(source)
    else:
        raise InputError(f"{source}: not a folder or a .csv manifest")
    if not scans:
        raise InputError(f"{source}: no scans found (NIfTI, NRRD or folders of DICOM files)")
    return scans


# --- one scan ------------------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    tasks: tuple[str, ...] = ()
    embeddings: bool = False
    priority: str | None = "bulk"
    concurrency: int = 4
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    progress: bool = True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _row(scan_id: str, status: str, attempts: int, **values: Any) -> Row:
    row: Row = dict.fromkeys(COLUMNS)
    row.update(scan_id=scan_id, status=status, attempts=attempts, finished_at=_now(), **values)
    return row


def ok_row(scan_id: str, result: dict[str, Any], attempts: int) -> Row:
    """A prediction as a row: its findings and warnings as the API names them, model and input flattened."""
    model, scan = result.get("model") or {}, result.get("input") or {}
    return _row(
        scan_id,
        "ok",
        attempts,
        findings=[{key: f.get(key) for key in FINDING_TYPE.names} for f in result.get("findings", [])],
        warnings=[{key: w.get(key) for key in WARNING_TYPE.names} for w in result.get("warnings", [])],
        model_name=model.get("name"),
        model_version=model.get("version"),
        model_sha256=model.get("sha256"),
        input_source_format=scan.get("source_format"),
        input_shape=scan.get("shape"),
        input_spacing_mm=scan.get("spacing_mm"),
        request_id=result.get("request_id"),
        priority=result.get("priority"),
        embedding=result.get("embedding"),
    )


def problem_row(scan_id: str, problem: HeadCTProblem, attempts: int) -> Row:
    """A gateway problem: ``refused`` when it is about the scan (4xx), else ``failed`` (tried again)."""
    refused = 400 <= problem.status < 500 and problem.status not in _RETRY_STATUSES
    return _row(
        scan_id,
        "refused" if refused else "failed",
        attempts,
        problem_code=problem.code,
        problem_status=problem.status,
        problem_detail=problem.detail,
        request_id=problem.request_id,
    )


def failure_row(scan_id: str, code: str, error: Exception, attempts: int) -> Row:
    """A failure on this side of the wire (no connection, an unreadable local file)."""
    return _row(
        scan_id, "failed", attempts, problem_code=code, problem_detail=f"{type(error).__name__}: {error}"
    )


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
            if problem.status not in _RETRY_STATUSES:
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


# --- the table -----------------------------------------------------------------------------------


def _embedding_type(rows: list[Row], embedding_dim: int | None) -> pa.DataType | None:
    """A fixed-size list when every embedding has one length (the model's `embedding_dim`); a plain list
    if runs of different models left different lengths; None (no column) when there is none."""
    lengths = {len(row["embedding"]) for row in rows if row.get("embedding") is not None}
    if not lengths and embedding_dim is None:
        return None
    if len(lengths) > 1:
        return pa.list_(pa.float32())
    return pa.list_(pa.float32(), lengths.pop() if lengths else embedding_dim)


def _finding_columns(rows: list[Row]) -> dict[str, pa.Array]:
    """``<finding>_probability`` / ``<finding>_positive`` per finding, in the model's order: what most
    analyses read, without unnesting ``findings``."""
    names = list(dict.fromkeys(f["name"] for row in rows for f in row.get("findings") or ()))
    by_row = [{f["name"]: f for f in row.get("findings") or ()} for row in rows]
    columns = {}
    for name in names:
        columns[f"{name}_probability"] = pa.array(
            [found[name]["probability"] if name in found else None for found in by_row], pa.float64()
        )
        columns[f"{name}_positive"] = pa.array(
            [found[name]["positive"] if name in found else None for found in by_row], pa.bool_()
        )
    return columns


def rows_to_table(rows: list[Row], *, as_text: bool = False, embedding_dim: int | None = None) -> pa.Table:
    """The output table; `as_text` holds the nested columns as JSON text (for CSV). A row without an
    embedding (refused, failed) holds a vector of nulls, not a null: pyarrow before 26 cannot read a
    null entry of a fixed-size list back from Parquet (apache/arrow#35692), and 26 needs numpy 2."""
    typed = [*FIELDS]
    embedding = _embedding_type(rows, embedding_dim)
    if embedding is not None:
        typed.append(pa.field("embedding", embedding))
    columns: dict[str, pa.Array] = {}
    for field in typed:
        values = [row.get(field.name) for row in rows]
        if field.name == "embedding" and not as_text and pa.types.is_fixed_size_list(field.type):
            values = [[None] * field.type.list_size if v is None else v for v in values]
        if as_text and field.name in _NESTED:
            columns[field.name] = pa.array(
                [None if v is None else json.dumps(v) for v in values], pa.string()
            )
        else:
            columns[field.name] = pa.array(values, field.type)
        if field.name == "problem_detail":
            columns |= _finding_columns(rows)
    return pa.table(columns)


def output_format(output: Path) -> str:
    return "csv" if output.name.lower().endswith(".csv") else "parquet"


def write_output(rows: Iterable[Row], output: Path, fmt: str, embedding_dim: int | None = None) -> None:
    """Sorted by scan id, into a temporary file that is fsynced and renamed over `output`: a reader, or a
    kill halfway, sees the old table or the new one, never half of one."""
    ordered = sorted(rows, key=lambda row: row["scan_id"])
    table = rows_to_table(ordered, as_text=fmt == "csv", embedding_dim=embedding_dim)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        if fmt == "csv":
            pa_csv.write_csv(table, partial)
        else:
            pq.write_table(table, partial)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)


def _decode_text(row: Row) -> Row:
    """A row read back: JSON text (CSV) decoded, a vector of nulls (see `rows_to_table`) as None."""
    if row.get("embedding") is not None and all(v is None for v in row["embedding"]):
        row["embedding"] = None
    for name in _NESTED & row.keys():
        if isinstance(row[name], str):
            row[name] = json.loads(row[name])
    for name in _INTEGERS & row.keys():
        if isinstance(row[name], str):
            row[name] = int(row[name])
    return row


def read_output(output: Path, fmt: str) -> list[Row]:
    """The rows of an earlier run's output (its ``<finding>_*`` columns are derived and dropped)."""
    if not output.exists():
        return []
    if fmt == "csv":
        options = pa_csv.ConvertOptions(
            column_types=dict.fromkeys(COLUMNS, pa.string()), null_values=[""], strings_can_be_null=True
        )
        table = pa_csv.read_csv(
            output, parse_options=pa_csv.ParseOptions(newlines_in_values=True), convert_options=options
        )
    else:
        table = pq.read_table(output)
    kept = table.select([name for name in COLUMNS if name in table.column_names])
    return [_decode_text(dict.fromkeys(COLUMNS) | row) for row in kept.to_pylist()]


# --- the journal ---------------------------------------------------------------------------------


class Journal:
    """``OUTPUT.journal``: one JSON line per finished scan, appended, flushed and fsynced as it comes (see
    the module docstring). Held under an exclusive ``flock`` while open: the lock of the run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise InputError(f"another `headct batch` is writing {path}") from None
        text = self._read()
        if text and not text.endswith("\n"):  # torn by a kill mid-line: start afresh
            self._write("\n")
        self.empty = not text

    def _read(self) -> str:
        self._file.seek(0)
        return self._file.read()

    def _write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def rows(self) -> list[Row]:
        """The rows written so far; a line torn by a kill is skipped (its scan is scored again)."""
        rows = []
        for line in self._read().splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict) and {"scan_id", "status"} <= row.keys():
                    rows.append(dict.fromkeys(COLUMNS) | row)
        return rows

    def append(self, row: Row) -> None:
        self.empty = False
        self._write(json.dumps(row, separators=(",", ":")) + "\n")

    def clear(self) -> None:
        self._file.truncate(0)
        os.fsync(self._file.fileno())
        self.empty = True

    def close(self, remove: bool) -> None:
        if remove:
            self.path.unlink(missing_ok=True)
        self._file.close()


def merge(rows: Iterable[Row]) -> dict[str, Row]:
    """One row per scan, the later winning, except that a ``failed`` row never hides a finished one."""
    merged: dict[str, Row] = {}
    for row in rows:
        earlier = merged.get(row["scan_id"])
        if earlier is None or row["status"] in DONE or earlier["status"] not in DONE:
            merged[row["scan_id"]] = row
    return merged


def fold(output: Path, fmt: str, journal: Journal, embedding_dim: int | None = None) -> dict[str, Row]:
    """The output's rows and then the journal's, merged, written back to `output`; the journal emptied."""
    pending = journal.rows()
    rows = merge([*read_output(output, fmt), *pending])
    if pending or not output.exists():
        write_output(rows.values(), output, fmt, embedding_dim)
    journal.clear()
    return rows


def is_done(row: Row | None, options: BatchOptions) -> bool:
    """Skipped by a rerun: scored (with its embedding when one is asked for) or refused."""
    if row is None or row["status"] not in DONE:
        return False
    return not (options.embeddings and row["status"] == "ok" and row.get("embedding") is None)


# --- the run -------------------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    """Scans per second (rich's own speed columns are for bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} scans/s" if speed else "-.-- scans/s", style="progress.data.speed")


def progress_display(err: TextIO, enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tally]}"),
        console=Console(file=err),
        disable=not enabled,
    )


@dataclasses.dataclass
class RunStats:
    scored: int = 0
    skipped: int = 0
    seconds: float = 0.0
    tally: Counter[str] = dataclasses.field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


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
                for future in done:
                    if (row := future.result()) is not None:
                        record(row)
        except BaseException:
            stop.set()
            _drain(pending, record, abandon)
            raise


def summarize(rows: Iterable[Row], output: Path, stats: RunStats) -> str:
    """What the output holds (ok / refused by code / failed by code), the models, and this run's rate."""
    rows = list(rows)
    status = Counter(row["status"] for row in rows)

    def by_code(kind: str) -> str:
        codes = Counter(row["problem_code"] for row in rows if row["status"] == kind)
        ordered = sorted(codes.items(), key=lambda item: (-item[1], item[0]))
        return f" ({', '.join(f'{code} {n}' for code, n in ordered)})" if codes else ""

    models = sorted(
        {(row["model_version"], row["model_sha256"] or "") for row in rows if row["status"] == "ok"}
    )
    lines = [
        f"{len(rows)} scans in {output}: ok {status['ok']}, refused {status['refused']}{by_code('refused')}, "
        f"failed {status['failed']}{by_code('failed')}",
        f"this run: {stats.scored} scans in {stats.seconds:.1f} s ({stats.rate:.2f} scans/s), "
        f"{stats.skipped} already done",
    ]
    lines += [f"model {version} (sha256 {sha[:12]})" for version, sha in models]
    if len(models) > 1:
        lines.append("note: the rows come from more than one model")
    return "\n".join(lines)


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


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + JOURNAL_SUFFIX)


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
