"""`headct.local.triton.parent_death_signal` (what ties `make serve`'s gateway and tritonserver to the
launcher): a child started with it gets SIGTERM when its starting process is SIGKILLed, even in a session
of its own; without it the child stays. Only from the main thread (the signal follows the forking thread).
The same with the real stack: tests/integration/test_launcher_death.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from headct.local.triton import parent_death_signal

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

ROOT = Path(__file__).resolve().parents[2]

# A launcher that starts `sleep` like headct/local/serve.py starts its children, prints its pid and waits.
LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys, time
    from headct.local.triton import parent_death_signal
    preexec = parent_death_signal() if sys.argv[1] == "tied" else None
    child = subprocess.Popen(["sleep", "60"], start_new_session=True, preexec_fn=preexec)
    print(child.pid, flush=True)
    time.sleep(60)
    """
)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _orphan_after_launcher_killed(mode: str, wait_s: float) -> tuple[int, bool]:
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, mode], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert launcher.stdout is not None
    child = int(launcher.stdout.readline())
    try:
        assert _alive(child)
        launcher.kill()  # SIGKILL: no handler, no finally in the launcher runs
        launcher.wait()
        deadline = time.monotonic() + wait_s
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        return child, _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_child_is_stopped_when_its_launcher_is_killed() -> None:
    _, alive = _orphan_after_launcher_killed("tied", wait_s=5.0)
    assert not alive


def test_without_it_the_child_outlives_its_launcher() -> None:
    """What `make serve` did before: the gateway, in its own session, stayed."""
    _, alive = _orphan_after_launcher_killed("untied", wait_s=1.0)
    assert alive


def test_not_from_another_thread() -> None:
    """From a thread that may end before the child should, the signal would come too early: none."""
    assert parent_death_signal() is not None
    found: list[object] = []
    thread = threading.Thread(target=lambda: found.append(parent_death_signal()))
    thread.start()
    thread.join()
    assert found == [None]
