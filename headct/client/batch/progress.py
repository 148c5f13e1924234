"""What a `headct batch` run shows on stderr: a rich progress bar with rate and ETA while it scores, and
a summary of the output (outcomes by code, the models) and of the run (`RunStats`) when it ends.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

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

from headct.client.batch.rows import Row


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
