"""CPU seconds consumed by process trees (/proc/<pid>/stat utime + stime).

On a shared, oversubscribed machine wall-clock throughput swings with the other tenants' load, but the
CPU time our own processes burn per scan does not: it is the noise-robust view of the same comparison
(a path that needs more CPU-seconds per scan is slower on a quiet machine too, when CPU-bound).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from benchmarks.memory import PROC, process_tree

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one live process (0 if it is gone)."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ')' of the command name: field 3 is index 0, so utime (14) / stime (15) are 11 / 12.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def tree_cpu_seconds(root: int, exclude: Iterable[int] = ()) -> float:
    """CPU seconds of `root` and its live descendants, minus the subtrees rooted at `exclude`."""
    skip: set[int] = set()
    for pid in exclude:
        skip.update(process_tree(pid))
    return sum(process_cpu_seconds(pid) for pid in process_tree(root) if pid not in skip)


class CpuMeter:
    """CPU seconds of named process groups between `start()` and `stop()`."""

    def __init__(self, groups: dict[str, tuple[int, tuple[int, ...]]]) -> None:
        self.groups = groups  # name -> (root pid, roots of subtrees to leave out)
        self._start: dict[str, float] = {}

    def snapshot(self) -> dict[str, float]:
        return {name: tree_cpu_seconds(root, exclude) for name, (root, exclude) in self.groups.items()}

    def start(self) -> None:
        self._start = self.snapshot()

    def stop(self) -> dict[str, float]:
        end = self.snapshot()
        return {name: round(end[name] - self._start.get(name, 0.0), 3) for name in end}


def machine_cpu_ticks() -> tuple[int, int]:
    """(idle, total) jiffies of all cores since boot, from the first line of /proc/stat."""
    fields = [int(value) for value in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields)


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Share of the machine's CPU capacity in use (by anyone) between two `machine_cpu_ticks()`."""
    total = after[1] - before[1]
    if total <= 0:
        return None
    return 1.0 - (after[0] - before[0]) / total
