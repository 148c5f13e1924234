"""Resume and lock for `headct batch`: the journal next to the output (``OUTPUT.journal``).

Every finished scan is appended at once to the journal (one JSON line each, flushed and fsynced), so
Ctrl-C, SIGKILL or a power cut lose at most the scans in flight. The journal is folded into the output
(`fold`: the output's rows, then the journal's, the later row of a scan winning; written to a temporary
file, then renamed over the output) at the start and end of every run, also after Ctrl-C. Scans whose
row is ``ok`` or ``refused`` are skipped, so rerunning the same command finishes the job. The journal is
also the run's lock (``flock``): two runs cannot write the same output.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from headct.client.batch.discovery import InputError
from headct.client.batch.rows import COLUMNS, DONE, Row
from headct.client.batch.table import read_output, write_output

JOURNAL_SUFFIX: Final = ".journal"


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + JOURNAL_SUFFIX)


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
