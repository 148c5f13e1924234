"""`make serve`'s launcher (`python -m headct.local.serve`) killed outright — SIGKILL to it alone, as a
supervisor that gives up after SIGTERM, `timeout -s KILL` or a CI runner ending the job does — takes its
gateway and its tritonserver with it within seconds: no process is left (the gateway runs in its own
session, out of reach of the launcher's group) and every port is free for the next `make serve`, instead of
a gateway answering 503 on its port forever. Graceful SIGTERM: tests/integration/test_serve.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from benchmarks.memory import PROC, process_tree
from headct.local.gateway import LocalGateway
from tests.stack import start_serve

pytestmark = pytest.mark.integration

# The gateway drains first (nothing is in flight here), then uvicorn and the preprocessing pool stop;
# tritonserver unloads the model and its Python-backend stub exits.
GONE_WITHIN_S = 10.0
SHM = "triton_python_backend_shm_region_"  # the Python backend's regions in /dev/shm


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _bindable(port: int) -> bool:
    """What the next `make serve` does with the port (servers set SO_REUSEADDR, so a TIME_WAIT left by
    our own probes does not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _holding(ports: dict[str, int]) -> list[int]:
    """Live processes (ours, anywhere in /proc) whose command line or ``HEADCT_*`` environment names one
    of `ports`: tritonserver has them on its command line, the gateway in its environment."""
    needles = [f"={port}".encode() for port in ports.values()]
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or another user's
        words = [w for w in text.split(b"\0") if w.startswith((b"--", b"HEADCT_"))]
        if any(w.endswith(n) for w in words for n in needles) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_killing_the_launcher_stops_the_gateway_and_triton(tmp_path: Path) -> None:
    serve, ports, log = start_serve(tmp_path)
    descendants: list[int] = []
    try:
        LocalGateway("unused", port=ports["port"], log_path=log, process=serve).wait_ready(180)
        descendants = process_tree(serve.pid)[1:]
        commands = {pid: _cmdline(pid) for pid in descendants}
        assert any("tritonserver" in c for c in commands.values()), commands
        assert any(c.split()[1:3] == ["-m", "api"] for c in commands.values() if c), commands
        assert all(_listening(port) for port in ports.values()), ports

        killed = time.monotonic()
        os.kill(serve.pid, signal.SIGKILL)  # the launcher alone, not its process group
        serve.wait(timeout=10)
        deadline = killed + GONE_WITHIN_S
        while True:
            alive = [pid for pid in descendants if _alive(pid)]
            busy = {name: port for name, port in ports.items() if _listening(port) or not _bindable(port)}
            holding = _holding(ports)
            if not (alive or busy or holding) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - killed
        print(f"\nlauncher SIGKILLed: {len(descendants)} children gone, ports free after {elapsed:.2f} s")
        leftovers = {pid: _cmdline(pid) for pid in {*alive, *holding}}
        assert not busy and not leftovers, (
            f"{elapsed:.1f} s after SIGKILL to the launcher: ports still taken {busy}, processes left "
            f"{leftovers}\n{log.read_text(errors='replace')[-4000:]}"
        )
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        # Only on failure: what this test started must not outlive it, nor the shared memory of a
        # Python-backend stub killed here (a Triton that stops on SIGTERM removes its own).
        regions = [
            w for pid in descendants if _alive(pid) for w in _cmdline(pid).split() if w.startswith(SHM)
        ]
        for pid in descendants:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for region in regions:
            (Path("/dev/shm") / region).unlink(missing_ok=True)
