"""Peak memory of a process tree, sampled from /proc in a background thread.

RSS is summed over the gateway and every descendant (preprocessing workers). Forked workers share pages
copy-on-write, so the RSS sum counts shared pages once per process: it over-states real use (the
conservative figure the target is checked against). PSS (`smaps_rollup`), which splits shared pages
between their users, is sampled alongside as the closer estimate of what the tree really costs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


def children_by_parent() -> dict[int, list[int]]:
    """ppid -> child pids, for every process visible in /proc now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the ppid; the command name (field 2) may contain spaces, so split after its ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that exist now."""
    children = children_by_parent()
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _kib_field(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory_kib(root: int, *, pss: bool = True) -> tuple[int, int, int]:
    """(RSS sum, PSS sum, process count) of the tree rooted at `root`, in KiB."""
    per_pid = tree_rss_by_pid_kib(root)
    pss_total = sum(_kib_field(PROC / str(pid) / "smaps_rollup", "Pss:") for pid in per_pid) if pss else 0
    return sum(per_pid.values()), pss_total, len(per_pid)


def tree_rss_by_pid_kib(root: int) -> dict[int, int]:
    """RSS (KiB) of each process of the tree rooted at `root`."""
    return {pid: _kib_field(PROC / str(pid) / "status", "VmRSS:") for pid in process_tree(root)}


@dataclass
class PeakMemory:
    rss_mb: float = 0.0
    pss_mb: float = 0.0
    processes: int = 0
    samples: int = 0
    #: the largest RSS each process reached (the root and every worker), MB
    per_process_rss_mb: dict[int, float] = field(default_factory=dict)


class TreeMemorySampler:
    """Context manager: samples the tree every `interval_s` and keeps the peaks."""

    def __init__(self, root: int, interval_s: float = 0.05) -> None:
        self.root = root
        self.interval_s = interval_s
        self.peak = PeakMemory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            per_pid = tree_rss_by_pid_kib(self.root)
            rss, count = sum(per_pid.values()), len(per_pid)
            pss = sum(_kib_field(PROC / str(pid) / "smaps_rollup", "Pss:") for pid in per_pid)
            peak = self.peak
            for pid, kib in per_pid.items():
                peak.per_process_rss_mb[pid] = max(peak.per_process_rss_mb.get(pid, 0.0), kib / 1024.0)
            peak.rss_mb = max(peak.rss_mb, rss / 1024.0)
            peak.pss_mb = max(peak.pss_mb, pss / 1024.0)
            peak.processes = max(peak.processes, count)
            peak.samples += 1
            time.sleep(self.interval_s)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
